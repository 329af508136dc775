"""Addenda: the only way to amend a signed report, without I/O.

A report is final once signed. The consultant amends it with a signed
:class:`Addendum` bound to the exact signed report bytes (their SHA-256) and
numbered 1, 2, ... in order; the referring node verifies it on arrival (signer =
the consultant who accepted the case and wrote the report, this consult, this
report, the next number) and files it as a new SR that names the report's SR as
its predecessor. An addendum never changes the report: both are kept and shown.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from consult.errors import BadReport, LocalConsultError, MalformedMessage
from consult.requests import check_consult_id
from crypto.envelope import SignedEnvelope, open_signed
from crypto.errors import CryptoError
from crypto.identity import Identity, NodeId

ADDENDUM_TYPE = "consult-addendum"
MAX_ADDENDUM_WIRE = 64 * 1024  # checked before anything is decoded
MAX_ADDENDUM_CHARS = 20_000
MAX_ADDENDA = 20  # per report: an amendment, not a chat channel
MAX_NAME_CHARS = 200


def report_digest(report_wire: bytes) -> bytes:
    return hashlib.sha256(report_wire).digest()


@dataclass(frozen=True)
class Addendum:
    """Text added to one exact signed report by its author, number ``number`` (from 1)."""

    consult_id: str
    report_sha256: bytes
    number: int
    author: NodeId
    author_name: str
    text: str
    at: int

    def __post_init__(self) -> None:
        if not self.text.strip():
            raise LocalConsultError("an addendum needs its text: say what changes and why")
        if len(self.text) > MAX_ADDENDUM_CHARS:
            raise LocalConsultError(f"an addendum is limited to {MAX_ADDENDUM_CHARS} characters")
        if len(self.author_name) > MAX_NAME_CHARS:
            raise LocalConsultError(f"the author's name is limited to {MAX_NAME_CHARS} characters")
        if not 1 <= self.number <= MAX_ADDENDA:
            raise LocalConsultError(f"a report takes at most {MAX_ADDENDA} addenda")
        if len(self.report_sha256) != 32:
            raise LocalConsultError("an addendum names its report by its 32-byte SHA-256")

    def to_body(self) -> dict[str, Any]:
        return {
            "consult": self.consult_id,
            "report": self.report_sha256,
            "number": self.number,
            "author": self.author.digest,
            "name": self.author_name,
            "text": self.text,
            "at": self.at,
        }

    def to_wire(self, author: Identity) -> bytes:
        if author.node_id != self.author:
            raise LocalConsultError("an addendum can only be signed by its author's node key")
        return SignedEnvelope.create(author, ADDENDUM_TYPE, self.to_body()).to_wire()

    @classmethod
    def from_wire(cls, data: bytes) -> Addendum:
        """Check size (before decoding), signature and that the signer is the named author."""
        envelope, raw = open_signed(
            data, ADDENDUM_TYPE, MAX_ADDENDUM_WIRE, what="addendum", error=MalformedMessage
        )
        try:
            consult_id = check_consult_id(raw["consult"], "addendum")  # whole id, no prefix
            digest, number, author = raw["report"], raw["number"], raw["author"]
            name, text, at = raw["name"], raw["text"], raw["at"]
            if not (
                isinstance(digest, bytes)
                and isinstance(author, bytes)
                and len(author) == 32
                and isinstance(name, str)
                and isinstance(text, str)
                and all(isinstance(v, int) and not isinstance(v, bool) for v in (number, at))
            ):
                raise TypeError("field types")
            addendum = cls(consult_id, digest, number, NodeId(author), name, text, at)
        except (KeyError, TypeError, LocalConsultError, CryptoError) as exc:
            raise MalformedMessage(f"addendum is malformed: {exc}") from exc
        if envelope.signer_id != addendum.author:
            raise MalformedMessage("addendum is signed by a node other than its named author")
        return addendum


def verify_addendum(
    data: bytes, *, consult_id: str, report_wire: bytes, author: NodeId, number: int
) -> Addendum:
    """An addendum as it must arrive: well signed, by ``author`` (the consultant who
    accepted the case and signed the report), for this consult, amending exactly
    ``report_wire``, and numbered ``number`` (the next one here)."""
    try:
        addendum = Addendum.from_wire(data)
    except MalformedMessage as exc:
        raise BadReport(str(exc)) from exc
    if addendum.author != author:
        raise BadReport(
            f"addendum for consult {consult_id[:8]} is signed by {addendum.author.short()}, "
            f"but the report was written by {author.short()}: not filed"
        )
    if addendum.consult_id != consult_id:
        raise BadReport(f"addendum is for consult {addendum.consult_id[:8]}, not {consult_id[:8]}")
    if addendum.report_sha256 != report_digest(report_wire):
        raise BadReport(
            f"addendum amends another version of the report of consult {consult_id[:8]}: "
            "not filed; ask the consultant to send it again"
        )
    if addendum.number != number:
        raise BadReport(
            f"addendum {addendum.number} of consult {consult_id[:8]} arrived, "
            f"addendum {number} was expected next"
        )
    return addendum
