"""The signed study manifest and wire declarations, and the receiver's budgets they
are held to.

The sender offers a study as a signed manifest ("study-manifest", envelope version
:data:`MANIFEST_VERSION`) that commits only to what is known without reading a file:
the study UID, whether it is de-identified, the instance ``count`` and an upper bound
``total`` on the bytes of all instances. The receiver holds them to
:data:`MAX_INSTANCES` and :data:`MAX_STUDY_SIZE` when it is opened.

As instances are de-identified (when shared so) and encoded, the sender declares
each in signed "study-wire" envelopes (:class:`WireDeclaration`, at most
:data:`MAX_DECLARATIONS` per envelope): index, wire size, BLAKE2b-256 of the wire
bytes and the instance's entry (:class:`ManifestEntry`: UIDs, place in its series,
syntax, size and SHA-256 of the file as sent). The per-instance size cap and the
expansion budget (:func:`within_budget`) are checked per declaration, before any
chunk of that instance is requested; the receiver holds the entries together to
``count`` and ``total``, one index per UID and one entry per index.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack

from crypto.envelope import SignedEnvelope
from crypto.errors import CryptoError
from crypto.identity import Identity
from node.core.ids import is_dicom_uid
from node.dicom import wirecodec
from peer_transport.transfer.errors import DecompressionBomb, MalformedMessage
from peer_transport.transfer.messages import (
    CHUNK_SIZE,
    MAX_CONTROL_MESSAGE,
    MAX_MANIFEST_SIZE,
    TRANSFER_ID_SIZE,
)

MANIFEST_TYPE = "study-manifest"
# The signed envelope's version: a node that speaks another version of the manifest
# refuses it with "'study-manifest' version 2 is not supported (need 3)".
MANIFEST_VERSION = 3
WIRE_TYPE = "study-wire"
# Declarations per signed envelope: one control message (an entry with 64-character
# UIDs and its declaration take about 330 bytes; 32 of them fit in 16 KiB).
MAX_DECLARATIONS = 32
WIRE_DIGEST_SIZE = 32
MAX_INSTANCES = 100_000
# Receiver budgets, checked when the signed manifest is opened, before anything is fetched
# or decoded. A decoded instance is held in memory (about three times, while it is
# rebuilt), so its size is what a sender can make the receiver allocate.
MAX_INSTANCE_SIZE = 1 << 30  # bytes of one decoded instance
MAX_STUDY_SIZE = 64 << 30  # bytes of all decoded instances of one study
# Above EXPANSION_FLOOR, an instance may decode to at most MAX_EXPANSION times its wire
# size (lossless coding of real images gains 2-10x; a blank 512x512 slice is below the
# floor). The sender sends an instance that compresses better than this as it is.
MAX_EXPANSION = 1024
EXPANSION_FLOOR = 16 << 20
# An encoding is never much larger than its file (the codec sends a file as it is when
# coding does not pay), so the spool and the assembly of one instance stay near its size.
WIRE_SLACK = 64 << 10


def within_budget(size: int, wire_size: int) -> bool:
    """Whether an instance of ``size`` decoded bytes sent as ``wire_size`` bytes fits the
    receiver's per-instance budget, its expansion limit, and is not padded on the wire."""
    return (
        size <= MAX_INSTANCE_SIZE
        and size <= max(EXPANSION_FLOOR, wire_size * MAX_EXPANSION)
        and wire_size <= size + size // 64 + WIRE_SLACK
    )


@dataclass(frozen=True)
class ManifestEntry:
    sop_instance_uid: str
    series_instance_uid: str
    series_number: int
    instance_number: int
    transfer_syntax: str
    size: int
    sha256: bytes

    def to_value(self) -> list[Any]:
        return [
            self.sop_instance_uid,
            self.series_instance_uid,
            self.series_number,
            self.instance_number,
            self.transfer_syntax,
            self.size,
            self.sha256,
        ]

    @classmethod
    def from_value(cls, raw: Any) -> ManifestEntry:
        types = (str, str, int, int, str, int, bytes)
        if not (
            isinstance(raw, list)
            and len(raw) == len(types)
            and all(type(v) is t for v, t in zip(raw, types, strict=True))
        ):
            raise MalformedMessage("manifest entry has the wrong fields")
        entry = cls(*raw)
        if len(entry.sha256) != 32 or not 0 <= entry.size <= wirecodec.MAX_WIRE_SIZE:
            raise MalformedMessage("manifest entry has out-of-range values")
        if not (
            is_dicom_uid(entry.sop_instance_uid)
            and is_dicom_uid(entry.series_instance_uid)
            and (entry.transfer_syntax == "" or is_dicom_uid(entry.transfer_syntax))
        ):
            raise MalformedMessage(
                "manifest entry has a malformed UID (a DICOM UID is digits and dots, at most 64)"
            )
        if entry.size > MAX_INSTANCE_SIZE:
            raise DecompressionBomb(
                f"manifest declares instance {entry.sop_instance_uid} as {entry.size} bytes: "
                f"over this node's limit of {MAX_INSTANCE_SIZE} bytes per instance"
            )
        return entry


def chunk_count(wire_size: int, chunk_size: int) -> int:
    """Chunks of ``chunk_size`` bytes in a wire encoding of ``wire_size`` bytes."""
    return math.ceil(wire_size / chunk_size)


def wire_digest(wire: bytes) -> bytes:
    """BLAKE2b-256 of a wire encoding, as declared in "study-wire"."""
    return hashlib.blake2b(wire, digest_size=WIRE_DIGEST_SIZE).digest()


@dataclass(frozen=True)
class WireDeclaration:
    """The sender's signed word on one instance's wire encoding."""

    index: int
    wire_size: int
    digest: bytes
    entry: ManifestEntry

    def to_value(self) -> list[Any]:
        return [self.index, self.wire_size, self.digest, self.entry.to_value()]

    @classmethod
    def from_value(cls, raw: Any) -> WireDeclaration:
        if not (
            isinstance(raw, list)
            and len(raw) == 4
            and type(raw[0]) is int
            and type(raw[1]) is int
            and isinstance(raw[2], bytes)
        ):
            raise MalformedMessage("wire declaration has the wrong fields")
        declaration = cls(raw[0], raw[1], raw[2], ManifestEntry.from_value(raw[3]))
        announced = declaration.wire_size == 0 and declaration.digest == b""
        if not (
            0 <= declaration.index < MAX_INSTANCES
            and (
                announced
                or (
                    0 < declaration.wire_size <= wirecodec.MAX_WIRE_SIZE
                    and len(declaration.digest) == WIRE_DIGEST_SIZE
                )
            )
        ):
            raise MalformedMessage("wire declaration has out-of-range values")
        return declaration

    @classmethod
    def announce(cls, index: int, entry: ManifestEntry) -> WireDeclaration:
        """The entry of an instance not encoded yet (wire size 0, no digest): the
        receiver lists it; its encoding is declared later with the same entry."""
        return cls(index, 0, b"", entry)

    @property
    def encoded(self) -> bool:
        return self.wire_size > 0

    def chunk_count(self, chunk_size: int) -> int:
        return chunk_count(self.wire_size, chunk_size)

    def check_budget(self) -> None:
        """Raise :class:`DecompressionBomb` when this encoding of its entry would expand
        past the receiver's limits (or is padded far beyond its file)."""
        entry = self.entry
        if not within_budget(entry.size, self.wire_size):
            raise DecompressionBomb(
                f"the sender declares instance {entry.sop_instance_uid} as {entry.size} bytes "
                f"from {self.wire_size} on the wire: outside this node's limits of "
                f"{MAX_INSTANCE_SIZE} bytes per instance, {MAX_EXPANSION}x expansion and "
                "a wire encoding about the size of the file; refused before any of it was fetched"
            )


def sign_wires(
    identity: Identity,
    transfer_id: bytes,
    study_uid: str,
    declarations: Sequence[WireDeclaration],
) -> bytes:
    """A signed "study-wire" envelope for at most :data:`MAX_DECLARATIONS` instances of
    study ``study_uid``."""
    if not 0 < len(declarations) <= MAX_DECLARATIONS:
        raise ValueError(f"a wire declaration holds 1 to {MAX_DECLARATIONS} instances")
    value = {"id": transfer_id, "study": study_uid, "wires": [d.to_value() for d in declarations]}
    return SignedEnvelope.create(identity, WIRE_TYPE, value).to_wire()


@dataclass(frozen=True)
class WireBatch:
    """An opened "study-wire" envelope."""

    signer: bytes
    transfer_id: bytes
    study_uid: str
    declarations: tuple[WireDeclaration, ...]


def open_wires(data: bytes) -> WireBatch:
    """Verify a signed "study-wire" envelope. Raises MalformedMessage."""
    try:
        envelope = SignedEnvelope.from_wire(data, MAX_CONTROL_MESSAGE)
        value = envelope.verify(WIRE_TYPE)
    except CryptoError as exc:
        raise MalformedMessage(f"wire declaration refused: {exc}") from exc
    if not (
        isinstance(value, dict)
        and set(value) == {"id", "study", "wires"}
        and isinstance(value["study"], str)
        and isinstance(value["id"], bytes)
        and len(value["id"]) == TRANSFER_ID_SIZE
        and isinstance(value["wires"], list)
        and 0 < len(value["wires"]) <= MAX_DECLARATIONS
    ):
        raise MalformedMessage("wire declaration has the wrong fields")
    declarations = tuple(WireDeclaration.from_value(w) for w in value["wires"])
    return WireBatch(envelope.signer, value["id"], value["study"], declarations)


@dataclass(frozen=True)
class Manifest:
    """What the sender signs before it reads a file: the study, ``count`` instances of
    at most ``total_size`` bytes in all, the chunk size and the de-identification flag.

    ``entries`` is not signed here (each entry is, in its "study-wire" declaration): it
    holds the entries known locally, in index order: all of them on a sender that read
    them from its store, none on a receiver (:meth:`Receiver.view` fills them in).
    """

    transfer_id: bytes
    study_instance_uid: str
    count: int
    total_size: int
    chunk_size: int = CHUNK_SIZE
    deidentified: bool = False
    entries: tuple[ManifestEntry, ...] = field(default=(), compare=False)

    def to_value(self) -> dict[str, Any]:
        return {
            "id": self.transfer_id,
            "study": self.study_instance_uid,
            "count": self.count,
            "total": self.total_size,
            "chunk": self.chunk_size,
            "deid": self.deidentified,
        }

    @classmethod
    def from_value(cls, raw: Any) -> Manifest:
        keys = ("id", "study", "count", "total", "chunk", "deid")
        if not isinstance(raw, dict) or set(raw) != set(keys):
            raise MalformedMessage("manifest has the wrong fields")
        tid, study, count, total, chunk, deid = (raw[k] for k in keys)
        if not (
            isinstance(tid, bytes)
            and len(tid) == TRANSFER_ID_SIZE
            and isinstance(study, str)
            and type(count) is int
            and type(total) is int
            and total >= 0
            and type(chunk) is int
            and 1024 <= chunk <= CHUNK_SIZE
            and isinstance(deid, bool)
        ):
            raise MalformedMessage("manifest has wrong field types or sizes")
        if not 0 < count <= MAX_INSTANCES:
            raise MalformedMessage(
                f"manifest declares {count} instances: this node takes 1 to {MAX_INSTANCES}"
            )
        if not is_dicom_uid(study):
            raise MalformedMessage("manifest's study UID is not a DICOM UID (digits and dots)")
        if total > MAX_STUDY_SIZE:
            raise DecompressionBomb(
                f"manifest declares up to {total} bytes: over this node's "
                f"limit of {MAX_STUDY_SIZE} bytes per study"
            )
        return cls(tid, study, count, total, chunk, deid)

    def sign(self, identity: Identity) -> bytes:
        return SignedEnvelope.create(
            identity, MANIFEST_TYPE, self.to_value(), MANIFEST_VERSION
        ).to_wire()

    @classmethod
    def open(cls, data: bytes) -> tuple[bytes, Manifest]:
        """Verify a signed manifest; return (signer public key, manifest)."""
        try:
            envelope = SignedEnvelope.from_wire(data, MAX_MANIFEST_SIZE)
            value = envelope.verify(MANIFEST_TYPE, MANIFEST_VERSION)
        except CryptoError as exc:
            raise MalformedMessage(f"study manifest refused: {exc}") from exc
        return envelope.signer, cls.from_value(value)


def series_order(entry: ManifestEntry) -> tuple[int, str, int]:
    """The order instances are offered and sent in."""
    return (entry.series_number, entry.series_instance_uid, entry.instance_number)


def stream_manifest(
    study_instance_uid: str,
    count: int,
    total_size: int,
    source: bytes,
    deidentified: bool = False,
    chunk_size: int = CHUNK_SIZE,
) -> Manifest:
    """A manifest whose entries will come in declarations.

    The transfer id is BLAKE2b over what it commits to and ``source``, a digest of what
    the study is made from (the stored files' hashes, known without reading them): a
    sender restarted with the same study offers the same id, so a receiver resumes
    instead of starting over, and the same study changed in the store is another id.
    """
    content = [study_instance_uid, deidentified, chunk_size, count, total_size, source]
    tid = hashlib.blake2b(
        msgpack.packb(content, use_bin_type=True), digest_size=TRANSFER_ID_SIZE
    ).digest()
    return Manifest(tid, study_instance_uid, count, total_size, chunk_size, deidentified)


def build_manifest(
    entries: Iterable[ManifestEntry],
    study_instance_uid: str,
    deidentified: bool = False,
    transfer_id: bytes | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> Manifest:
    """A manifest of entries known now (the store's records, files in memory), in series
    order, its total exact; the transfer id derives from the entries unless given."""
    ordered = tuple(sorted(entries, key=series_order))
    source = hashlib.blake2b(
        msgpack.packb([e.to_value() for e in ordered], use_bin_type=True)
    ).digest()
    total = sum(e.size for e in ordered)
    manifest = stream_manifest(
        study_instance_uid, len(ordered), total, source, deidentified, chunk_size
    )
    return replace(manifest, transfer_id=transfer_id or manifest.transfer_id, entries=ordered)
