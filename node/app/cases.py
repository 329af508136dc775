"""What every part of a node's consult work reads about one case: which study it shared
and under which UIDs, who the other party is, and the signed messages that name it.

Plain functions of the runtime's stores and identity, shared by the request side
(:mod:`node.app.consults`), the study desk (:mod:`node.app.studies`) and the report
desk (:mod:`node.app.reports`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from consult.errors import LocalConsultError
from consult.report import PatientStudy
from consult.requests import Role, State, check_consult_id
from crypto import canonical
from crypto.envelope import SignedEnvelope
from node.app.errors import RuntimeError_
from node.core.config import NodeHome
from node.core.ids import local_name
from node.dicom.deid import PseudonymMap
from node.dicom.sharing import PSEUDONYM_KEY_PURPOSE
from peer_transport.connection import RequestRefused

if TYPE_CHECKING:
    from collections.abc import Mapping

    from node.app.runtime import NodeRuntime

# A study is served (and may be fetched again, e.g. after a crash) only while the case
# is in the consultant's hands.
SERVABLE = frozenset({State.ACCEPTED, State.TRANSFERRING, State.IN_REVIEW})


@dataclass(frozen=True)
class Share:
    """A study as it leaves this node for one consult (de-identified unless stated)."""

    original_study_uid: str
    shared_study_uid: str
    deidentified: bool


def pseudonym_map_path(home: NodeHome, consult_id: str) -> Path:
    """Where a consult's pseudonym map lives in a home (also for a request made offline)."""
    return home.data_dir / "pseudonyms" / f"{local_name(consult_id)}.map"


def map_path(rt: NodeRuntime, consult_id: str) -> Path:
    return pseudonym_map_path(rt.home, consult_id)


def map_key(rt: NodeRuntime) -> bytes:
    return rt.identity.derive_key(PSEUDONYM_KEY_PURPOSE)


def pseudonyms_of(rt: NodeRuntime, consult_id: str) -> PseudonymMap | None:
    """The consult's pseudonym map, if it shared the study de-identified from here."""
    path = map_path(rt, consult_id)
    return PseudonymMap.load(path, map_key(rt)) if path.exists() else None


def share_of(rt: NodeRuntime, consult_id: str, prior: str = "") -> Share:
    """What a consult of ours shared, from the database and the pseudonym map (restart-safe):
    its study, or the ``prior`` (a shared UID the signed request lists)."""
    request = rt.consults.get(consult_id).request
    if prior and prior not in request.priors:
        raise RequestRefused("not-shared", "this study was not shared with your node")
    shared_uid = prior or request.study_uid
    path = map_path(rt, consult_id)
    if not path.exists():
        if request.deidentified:
            # Recorded without a pseudonym map (e.g. `consult request --out`): never send
            # the identified study under a request that promises a de-identified one.
            raise RequestRefused(
                "no-pseudonyms",
                f"consult {consult_id[:8]} has no pseudonym map on the requesting node: "
                "ask the requester to send the request again from its node",
            )
        return Share(shared_uid, shared_uid, False)
    original = PseudonymMap.load(path, map_key(rt)).relink_uid(shared_uid)
    return Share(original, shared_uid, True)


@dataclass(frozen=True)
class UidMapping:
    """The UIDs of one consult's study as this node stores them and as the consult shares
    them; a UID outside the share passes through unchanged both ways."""

    shared: Mapping[str, str] = field(default_factory=dict)  # original -> pseudonym
    local: Mapping[str, str] = field(default_factory=dict)  # pseudonym -> original

    def to_shared(self, uid: str) -> str:
        return self.shared.get(uid, uid)

    def from_shared(self, uid: str) -> str:
        return self.local.get(uid, uid)


def uid_mapping(rt: NodeRuntime, consult_id: str) -> UidMapping:
    """How this node's UIDs appear in a consult's live session.

    Only the requesting node of a de-identified share translates: every UID the share
    issued, and every UID of the original study in the store (pseudonyms are keyed and
    deterministic, so an instance not sent yet maps as it will be sent). The consultant
    and an identified share see the study under the UIDs the session uses.
    """
    path = map_path(rt, consult_id)
    if rt.consults.info(consult_id).role is not Role.REQUESTER or not path.exists():
        return UidMapping()
    pseudonyms = PseudonymMap.load(path, map_key(rt))
    study = pseudonyms.relink_uid(rt.consults.get(consult_id).request.study_uid)
    for row in rt.store.instances(study):
        pseudonyms.pseudo_uid(row.series_uid)
        pseudonyms.pseudo_uid(row.sop_instance_uid)
    shared = dict(pseudonyms.uids)
    return UidMapping(shared, {pseudo: uid for uid, pseudo in shared.items()})


def signer(wire: bytes) -> bytes:
    """The public key that signed an envelope (checked where the message is verified)."""
    return SignedEnvelope.from_wire(wire).signer


def requester_key(rt: NodeRuntime, consult_id: str) -> bytes:
    """The requesting node's public key: the signer of the request we received."""
    wire = rt.consults.info(consult_id).request_wire
    if wire is None:
        raise RuntimeError_(f"consult {consult_id[:8]} has no signed request on this node")
    return signer(wire)


async def consultant_key(rt: NodeRuntime, consult_id: str) -> bytes | None:
    """Requesting side: the public key of the consultant who accepted the consult (None
    before anyone did, or if its address is not known here)."""
    info = rt.consults.info(consult_id)
    if info.role is not Role.REQUESTER or info.peer_id is None:
        return None
    found = await rt.directory.resolve(info.peer_id, rt.now())
    return found.record.public_key if found is not None else None


async def other_party_key(rt: NodeRuntime, consult_id: str) -> bytes | None:
    """The other party's public key: the requester's, or the accepted consultant's."""
    if rt.consults.info(consult_id).role is Role.CONSULTANT:
        return requester_key(rt, consult_id)
    return await consultant_key(rt, consult_id)


def signed_consult_id(wire: bytes, what: str = "report") -> str:
    """The whole consult id a signed message names (never resolved as a prefix)."""
    body = canonical.decode(SignedEnvelope.from_wire(wire).payload)
    consult_id = body.get("consult") if isinstance(body, dict) else None
    if not isinstance(consult_id, str):
        raise LocalConsultError(f"{what} does not name its consult")
    return check_consult_id(consult_id, what)


def patient_of(rt: NodeRuntime, study_uid: str) -> PatientStudy:
    row = rt.store.study(study_uid)
    return PatientStudy(
        patient_name=row.patient_name,
        patient_id=row.patient_id,
        patient_birth_date=row.patient_birth_date,
        patient_sex=row.patient_sex,
        accession_number=row.accession_number,
        study_date=row.study_date,
        study_time=row.study_time,
    )


__all__ = [
    "PSEUDONYM_KEY_PURPOSE",
    "SERVABLE",
    "Share",
    "UidMapping",
    "consultant_key",
    "map_key",
    "map_path",
    "other_party_key",
    "patient_of",
    "pseudonym_map_path",
    "pseudonyms_of",
    "requester_key",
    "share_of",
    "signed_consult_id",
    "signer",
    "uid_mapping",
]
