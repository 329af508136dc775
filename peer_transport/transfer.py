"""Study transfer protocol, sans-IO: messages in, messages and events out, time passed in.

The sender offers a study as a signed manifest ("study-manifest"): every instance
with its UIDs, original size and SHA-256, transfer syntax, place in its series and
the size of its wire encoding (:mod:`node.dicom.wirecodec`). The receiver *pulls*: it
skips instances it already has (same hash), then requests chunks of the wire
encodings, at most ``window`` chunks outstanding (the window is the credit; a
request is the application-level ack of what came before it). Every chunk carries
its own BLAKE2b hash; a damaged chunk is rejected and requested again, never
written. A chunk nobody asked for, or one that does not fit the declared size, is
rejected. When all chunks of an instance are verified the runner asks the receiver
to assemble it: check every size the encoding declares against the manifest (a
decompression bomb is refused before anything is allocated), decode, compare the
SHA-256 and the instance's own study/series/instance UIDs with the manifest, and
only then hand it to the store. The manifest itself is held to the receiver's
budgets (:data:`MAX_INSTANCE_SIZE`, :data:`MAX_STUDY_SIZE`, :data:`MAX_EXPANSION`)
and its UIDs to the DICOM grammar when it is opened.

What the receiver has verified lives in a :class:`Spool` directory, sealed at rest
(it may hold an identified study): part files, a state file (the instances stored,
rewritten atomically after each) and a journal with the receipt (nonce and tag) of
every chunk sealed into an unfinished part. Nothing here is fsynced, on purpose:
after a restart a journalled chunk counts only if its receipt still opens the bytes
in the part file, so a kill -9 or a power
cut costs at most the chunks in flight or lost with the page cache, never a wrong
byte. An instance becomes visible only through the store's own atomic, fsynced
commit (``node.dicom.store.Store.add_bytes``), which happens before the state file
calls it done.

A receiver restarted with an unfinished spool does not wait for the sender to
offer again on its own (after ``transfer_runner.REOFFER_AFTER``): it sends
:class:`ResumeRequest` for the transfer in its spool as soon as it is connected to
the manifest's signer (:func:`resume_request`), and a sender still serving that
transfer offers it again at once (:meth:`Sender.resume`). A request for a transfer
the sender does not serve (finished, withdrawn, another study) is ignored, not
refused: a refusal would tell the asker which transfers this node serves, and the
asker loses nothing by waiting for an offer. The sender's own re-offer stays as
the fallback for peers that do not ask.

Priority: :meth:`Receiver.prioritise` puts an instance (the slice on screen) ahead
of the queue; the rest follows in series order. Pause, resume and cancel are
transitions of a table-driven state machine; an illegal one raises
:class:`IllegalTransition`.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import secrets
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import msgpack
import nacl.bindings as sodium
import nacl.exceptions
import nacl.secret
from pydicom.tag import BaseTag

from crypto import canonical
from crypto.envelope import SignedEnvelope
from crypto.errors import CryptoError
from crypto.identity import Identity
from crypto.statetable import TransitionTable
from node.core.ids import is_dicom_uid
from node.dicom import wirecodec
from peer_transport.errors import LocalProtocolError, RemoteProtocolError, TransportError

MANIFEST_TYPE = "study-manifest"
CHUNK_SIZE = 60 * 1024  # leaves room for headers under aiortc's 64 KiB message limit
MAX_CHUNK_MESSAGE = CHUNK_SIZE + 512
MAX_CONTROL_MESSAGE = 16 * 1024
MAX_MANIFEST_SIZE = 16 << 20
MAX_INSTANCES = 100_000
MAX_SEQS_PER_REQUEST = 256
CHUNK_DIGEST_SIZE = 16
TRANSFER_ID_SIZE = 16
DEFAULT_WINDOW = 64  # chunks in flight: ~3.8 MiB, above the loopback bandwidth-delay product
DEFAULT_TIMEOUT = 5.0  # seconds before an unanswered chunk request is repeated
MAX_ACTIVE_INSTANCES = 16  # part files open at once on the receiver
MAX_INSTANCE_ATTEMPTS = 2  # an instance whose hash fails twice fails the transfer
REOFFER_MIN_INTERVAL = 1.0  # seconds between offers for resume requests with no request between
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
SPOOL_KEY_PURPOSE = "radmesh-spool-v1"  # the node's key for its receive spools


class TransferError(TransportError):
    """Base of the study transfer errors."""


class LocalTransferError(TransferError, LocalProtocolError):
    """This node used the protocol wrongly (a bug here, not the peer's fault)."""


class IllegalTransition(LocalTransferError):
    """An action is not allowed in the transfer's current state."""


class TransferCancelled(TransferError):
    """The transfer was cancelled (by this side's user, or the other side said so)."""


class RemoteTransferError(TransferError, RemoteProtocolError):
    """The peer sent something wrong; the transfer cannot trust it."""


class MalformedMessage(RemoteTransferError):
    """A transfer message could not be parsed."""


class ChunkRejected(RemoteTransferError):
    """A chunk was damaged, not requested, or does not fit the declared size."""


class InstanceRejected(RemoteTransferError):
    """An assembled instance does not match what the manifest declared."""


class ManifestMismatch(RemoteTransferError):
    """The peer's manifest and the data it sends disagree; the transfer is stopped."""


class DecompressionBomb(RemoteTransferError):
    """The peer declared more decoded data than its wire bytes or the receiver's budgets
    allow; refused before anything was allocated, and the peer is disconnected."""


def within_budget(size: int, wire_size: int) -> bool:
    """Whether an instance of ``size`` decoded bytes sent as ``wire_size`` bytes fits the
    receiver's per-instance budget, its expansion limit, and is not padded on the wire."""
    return (
        size <= MAX_INSTANCE_SIZE
        and size <= max(EXPANSION_FLOOR, wire_size * MAX_EXPANSION)
        and wire_size <= size + size // 64 + WIRE_SLACK
    )


# -- manifest ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestEntry:
    sop_instance_uid: str
    series_instance_uid: str
    series_number: int
    instance_number: int
    transfer_syntax: str
    size: int
    sha256: bytes
    wire_size: int

    def to_value(self) -> list[Any]:
        return [
            self.sop_instance_uid,
            self.series_instance_uid,
            self.series_number,
            self.instance_number,
            self.transfer_syntax,
            self.size,
            self.sha256,
            self.wire_size,
        ]

    @classmethod
    def from_value(cls, raw: Any) -> ManifestEntry:
        types = (str, str, int, int, str, int, bytes, int)
        if not (
            isinstance(raw, list)
            and len(raw) == len(types)
            and all(type(v) is t for v, t in zip(raw, types, strict=True))
        ):
            raise MalformedMessage("manifest entry has the wrong fields")
        entry = cls(*raw)
        if (
            len(entry.sha256) != 32
            or not 0 <= entry.size <= wirecodec.MAX_WIRE_SIZE
            or not 0 < entry.wire_size <= wirecodec.MAX_WIRE_SIZE
        ):
            raise MalformedMessage("manifest entry has out-of-range values")
        if not (
            is_dicom_uid(entry.sop_instance_uid)
            and is_dicom_uid(entry.series_instance_uid)
            and (entry.transfer_syntax == "" or is_dicom_uid(entry.transfer_syntax))
        ):
            raise MalformedMessage(
                "manifest entry has a malformed UID (a DICOM UID is digits and dots, at most 64)"
            )
        if not within_budget(entry.size, entry.wire_size):
            raise DecompressionBomb(
                f"manifest declares instance {entry.sop_instance_uid} as {entry.size} bytes "
                f"from {entry.wire_size} on the wire: outside this node's limits of "
                f"{MAX_INSTANCE_SIZE} bytes per instance, {MAX_EXPANSION}x expansion and "
                "a wire encoding about the size of the file"
            )
        return entry

    def chunk_count(self, chunk_size: int) -> int:
        return math.ceil(self.wire_size / chunk_size)


@dataclass(frozen=True)
class Manifest:
    transfer_id: bytes
    study_instance_uid: str
    entries: tuple[ManifestEntry, ...]
    chunk_size: int = CHUNK_SIZE
    deidentified: bool = False

    def to_value(self) -> dict[str, Any]:
        return {
            "id": self.transfer_id,
            "study": self.study_instance_uid,
            "entries": [e.to_value() for e in self.entries],
            "chunk": self.chunk_size,
            "deid": self.deidentified,
        }

    @classmethod
    def from_value(cls, raw: Any) -> Manifest:
        if not isinstance(raw, dict) or set(raw) != {"id", "study", "entries", "chunk", "deid"}:
            raise MalformedMessage("manifest has the wrong fields")
        tid, study, entries, chunk, deid = (
            raw[k] for k in ("id", "study", "entries", "chunk", "deid")
        )
        if not (
            isinstance(tid, bytes)
            and len(tid) == TRANSFER_ID_SIZE
            and isinstance(study, str)
            and isinstance(entries, list)
            and len(entries) <= MAX_INSTANCES
            and type(chunk) is int
            and 1024 <= chunk <= CHUNK_SIZE
            and isinstance(deid, bool)
        ):
            raise MalformedMessage("manifest has wrong field types or sizes")
        if not is_dicom_uid(study):
            raise MalformedMessage("manifest's study UID is not a DICOM UID (digits and dots)")
        parsed = tuple(ManifestEntry.from_value(e) for e in entries)
        if len({e.sop_instance_uid for e in parsed}) != len(parsed):
            raise MalformedMessage("manifest lists one SOP Instance UID twice")
        if sum(e.size for e in parsed) > MAX_STUDY_SIZE:
            raise DecompressionBomb(
                f"manifest declares {sum(e.size for e in parsed)} bytes: over this node's "
                f"limit of {MAX_STUDY_SIZE} bytes per study"
            )
        return cls(tid, study, parsed, chunk, deid)

    def sign(self, identity: Identity) -> bytes:
        return SignedEnvelope.create(identity, MANIFEST_TYPE, self.to_value()).to_wire()

    @classmethod
    def open(cls, data: bytes) -> tuple[bytes, Manifest]:
        """Verify a signed manifest; return (signer public key, manifest)."""
        try:
            envelope = SignedEnvelope.from_wire(data, MAX_MANIFEST_SIZE)
            value = envelope.verify(MANIFEST_TYPE)
        except CryptoError as exc:
            raise MalformedMessage(f"study manifest refused: {exc}") from exc
        return envelope.signer, cls.from_value(value)

    @property
    def total_size(self) -> int:
        return sum(e.size for e in self.entries)


def describe_instance(data: bytes) -> tuple[str, str, str, int, int, str]:
    """(study, series, SOP instance UID, series number, instance number, syntax) of a file.

    Raises :class:`node.dicom.wirecodec.BadInstance` for files that must not be sent:
    unreadable, truncated, or without the UIDs a receiver needs.
    """
    return _describe(wirecodec.parse_dicom(data), data)


def _describe(ds: Any, data: bytes) -> tuple[str, str, str, int, int, str]:
    try:
        study = str(ds.StudyInstanceUID)
        series = str(ds.SeriesInstanceUID)
        sop = str(ds.SOPInstanceUID)
        series_number = int(ds.get("SeriesNumber") or 0)
        instance_number = int(ds.get("InstanceNumber") or 0)
    except (AttributeError, ValueError, TypeError) as exc:
        raise wirecodec.BadInstance(f"DICOM file lacks study/series/instance UIDs: {exc}") from exc
    pixel = ds._dict.get(BaseTag(wirecodec.PIXEL_DATA_TAG))
    tell, length = getattr(pixel, "value_tell", None), getattr(pixel, "length", None)
    if (
        isinstance(tell, int)
        and isinstance(length, int)
        and length != 0xFFFFFFFF
        and tell + length > len(data)
    ):
        raise wirecodec.BadInstance(f"DICOM file {sop} is truncated: pixel data runs past its end")
    return study, series, sop, series_number, instance_number, wirecodec.transfer_syntax(ds)


def prepare_instance(
    data: bytes, cache: wirecodec.PixelCache | None = None
) -> tuple[ManifestEntry, str, bytes]:
    """Describe and encode one file: (manifest entry, study UID, wire bytes)."""
    study, series, sop, series_number, instance_number, syntax = describe_instance(data)
    if len(data) > MAX_INSTANCE_SIZE:
        raise wirecodec.BadInstance(
            f"instance {sop} is {len(data)} bytes; a receiver takes at most {MAX_INSTANCE_SIZE}"
        )
    if not all(map(is_dicom_uid, (study, series, sop))):
        raise wirecodec.BadInstance(
            f"instance {sop[:64]!r} has a malformed study, series or instance UID; "
            "a receiver refuses it"
        )
    encoded = wirecodec.encode(data, cache)  # its sha256 is the file's: not hashed twice
    wire = encoded.to_wire()
    if not within_budget(len(data), len(wire)):  # compresses beyond belief, or grew: as is
        encoded = wirecodec.WireInstance(
            wirecodec.Encoding.RAW, len(data), encoded.sha256, bytes(data)
        )
        wire = encoded.to_wire()
    entry = ManifestEntry(
        sop, series, series_number, instance_number, syntax, len(data), encoded.sha256, len(wire)
    )
    return entry, study, wire


def build_manifest(
    entries: Iterable[ManifestEntry],
    study_instance_uid: str,
    deidentified: bool = False,
    transfer_id: bytes | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> Manifest:
    """A manifest in series order (series number, series UID, instance number).

    The transfer id is derived from the content unless given: a sender restarted
    with the same study offers the same id, so a receiver resumes instead of
    starting over.
    """
    ordered = sorted(
        entries, key=lambda e: (e.series_number, e.series_instance_uid, e.instance_number)
    )
    content = [study_instance_uid, deidentified, chunk_size, [e.to_value() for e in ordered]]
    tid = (
        transfer_id
        or hashlib.blake2b(
            msgpack.packb(content, use_bin_type=True), digest_size=TRANSFER_ID_SIZE
        ).digest()
    )
    return Manifest(tid, study_instance_uid, tuple(ordered), chunk_size, deidentified)


# -- messages ------------------------------------------------------------------------------


def chunk_digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=CHUNK_DIGEST_SIZE).digest()


@dataclass(frozen=True)
class Request:
    """Receiver -> sender: send these chunks of this instance."""

    transfer_id: bytes
    index: int
    seqs: tuple[int, ...]


@dataclass(frozen=True)
class Chunk:
    """Sender -> receiver (bulk channel): bytes [seq*chunk_size, ...) of a wire encoding."""

    transfer_id: bytes
    index: int
    seq: int
    digest: bytes
    data: bytes


@dataclass(frozen=True)
class Cancel:
    transfer_id: bytes
    reason: str


@dataclass(frozen=True)
class Finished:
    """Receiver -> sender: every instance is stored; the sender may drop its cache."""

    transfer_id: bytes


@dataclass(frozen=True)
class OfferPart:
    """Sender -> receiver: part of the signed manifest (it may exceed one message)."""

    transfer_id: bytes
    part: int
    total: int
    data: bytes


@dataclass(frozen=True)
class ResumeRequest:
    """Receiver -> sender: I restarted holding an unfinished spool of this transfer;
    offer it again now."""

    transfer_id: bytes


Message = Request | Chunk | Cancel | Finished | OfferPart | ResumeRequest


def offer_parts(signed_manifest: bytes, transfer_id: bytes) -> list[OfferPart]:
    pieces = [
        signed_manifest[i : i + CHUNK_SIZE] for i in range(0, len(signed_manifest), CHUNK_SIZE)
    ]
    return [OfferPart(transfer_id, i, len(pieces), p) for i, p in enumerate(pieces)]


MAX_OFFERS_ASSEMBLED = 4


class OfferAssembler:
    """Collects the parts of signed manifests, bounded by MAX_MANIFEST_SIZE each and
    :data:`MAX_OFFERS_ASSEMBLED` transfers at a time (offers of several transfers on one
    connection may interleave)."""

    def __init__(self) -> None:
        self._parts: dict[bytes, dict[int, bytes]] = {}

    def add(self, part: OfferPart) -> bytes | None:
        if part.total * CHUNK_SIZE > MAX_MANIFEST_SIZE or not 0 <= part.part < part.total:
            raise MalformedMessage("study manifest offer is too large or malformed")
        if part.transfer_id not in self._parts and len(self._parts) >= MAX_OFFERS_ASSEMBLED:
            del self._parts[next(iter(self._parts))]  # the oldest unfinished offer goes
        parts = self._parts.setdefault(part.transfer_id, {})
        parts[part.part] = part.data
        if len(parts) < part.total:
            return None
        del self._parts[part.transfer_id]
        return b"".join(parts[i] for i in range(part.total))


def to_wire(message: Message) -> bytes:
    if isinstance(message, Request):
        value: list[Any] = ["req", message.transfer_id, message.index, list(message.seqs)]
    elif isinstance(message, Chunk):
        value = ["chunk", message.transfer_id, message.index, message.seq, message.digest]
        value.append(message.data)
    elif isinstance(message, Cancel):
        value = ["cancel", message.transfer_id, message.reason[:200]]
    elif isinstance(message, OfferPart):
        value = ["offer", message.transfer_id, message.part, message.total, message.data]
    elif isinstance(message, ResumeRequest):
        value = ["resume", message.transfer_id]
    else:
        value = ["fin", message.transfer_id]
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def _ints(values: Any) -> bool:
    return isinstance(values, list) and all(type(v) is int and v >= 0 for v in values)


def peek(data: bytes) -> tuple[str, bytes]:
    """(kind, transfer id) of a transfer message without decoding the rest (a chunk's
    data): enough to route it. Raises MalformedMessage."""
    if len(data) > MAX_CHUNK_MESSAGE:
        raise MalformedMessage(f"transfer message of {len(data)} bytes is over the limit")
    unpacker = msgpack.Unpacker(raw=False, max_bin_len=CHUNK_SIZE, max_str_len=256)
    unpacker.feed(data)
    try:
        if unpacker.read_array_header() < 2:
            raise MalformedMessage("transfer message has the wrong shape")
        kind, transfer_id = unpacker.unpack(), unpacker.unpack()
    except (ValueError, msgpack.UnpackException) as exc:
        raise MalformedMessage(f"transfer message is not valid msgpack: {exc}") from exc
    if not isinstance(kind, str) or not (
        isinstance(transfer_id, bytes) and len(transfer_id) == TRANSFER_ID_SIZE
    ):
        raise MalformedMessage("transfer message lacks a transfer id")
    return kind, transfer_id


def from_wire(data: bytes) -> Message:
    if len(data) > MAX_CHUNK_MESSAGE:
        raise MalformedMessage(f"transfer message of {len(data)} bytes is over the limit")
    try:
        raw = msgpack.unpackb(
            data, raw=False, max_bin_len=CHUNK_SIZE, max_str_len=256, max_array_len=512
        )
    except (ValueError, msgpack.UnpackException) as exc:
        raise MalformedMessage(f"transfer message is not valid msgpack: {exc}") from exc
    if not isinstance(raw, list) or not raw or not isinstance(raw[0], str):
        raise MalformedMessage("transfer message has the wrong shape")
    kind, args = raw[0], raw[1:]
    if not args or not isinstance(args[0], bytes) or len(args[0]) != TRANSFER_ID_SIZE:
        raise MalformedMessage("transfer message lacks a transfer id")
    if kind == "req" and len(args) == 3 and _ints(args[1:2]) and _ints(args[2]):
        if len(args[2]) > MAX_SEQS_PER_REQUEST:
            raise MalformedMessage("chunk request asks for too many chunks at once")
        return Request(args[0], args[1], tuple(args[2]))
    if (
        kind == "chunk"
        and len(args) == 5
        and _ints(args[1:3])
        and isinstance(args[3], bytes)
        and isinstance(args[4], bytes)
    ):
        return Chunk(args[0], args[1], args[2], args[3], args[4])
    if kind == "cancel" and len(args) == 2 and isinstance(args[1], str):
        return Cancel(args[0], args[1])
    if kind == "offer" and len(args) == 4 and _ints(args[1:3]) and isinstance(args[3], bytes):
        return OfferPart(args[0], args[1], args[2], args[3])
    if kind == "fin" and len(args) == 1:
        return Finished(args[0])
    if kind == "resume" and len(args) == 1:
        return ResumeRequest(args[0])
    raise MalformedMessage(f"unknown or malformed transfer message {kind!r}")


# -- state machine -------------------------------------------------------------------------


class State(StrEnum):
    OFFERED = "offered"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETE = "complete"
    CANCELLED = "cancelled"
    FAILED = "failed"


class Event(StrEnum):
    ACCEPT = "accept"
    DATA = "data"  # a chunk arrived or an instance was stored
    PAUSE = "pause"
    RESUME = "resume"
    CANCEL = "cancel"
    FAIL = "fail"
    FINISH = "finish"


TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.OFFERED, Event.ACCEPT): State.RUNNING,
    (State.OFFERED, Event.CANCEL): State.CANCELLED,
    (State.OFFERED, Event.FINISH): State.COMPLETE,  # the receiver had it all already
    (State.RUNNING, Event.DATA): State.RUNNING,
    (State.RUNNING, Event.PAUSE): State.PAUSED,
    (State.RUNNING, Event.CANCEL): State.CANCELLED,
    (State.RUNNING, Event.FAIL): State.FAILED,
    (State.RUNNING, Event.FINISH): State.COMPLETE,
    (State.PAUSED, Event.DATA): State.PAUSED,  # chunks already in flight still land
    (State.PAUSED, Event.RESUME): State.RUNNING,
    (State.PAUSED, Event.CANCEL): State.CANCELLED,
    (State.PAUSED, Event.FAIL): State.FAILED,
    (State.PAUSED, Event.FINISH): State.COMPLETE,
}

TABLE = TransitionTable(
    TRANSITIONS,
    lambda state, event: IllegalTransition(
        f"cannot {event.value} a transfer that is {state.value}"
    ),
)


@dataclass
class Machine:
    state: State = State.OFFERED

    def fire(self, event: Event) -> State:
        self.state = TABLE.fire(self.state, event)
        return self.state


# -- spool: part files and the persisted receiver state ------------------------------------


_NONCE = sodium.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
_TAG = sodium.crypto_aead_xchacha20poly1305_ietf_ABYTES
RECEIPT_SIZE = _NONCE + _TAG
# Spools opened without a key are sealed all the same, with a key that dies with the
# process (tests, one-off tools); a node passes its own (SPOOL_KEY_PURPOSE) so that a
# restarted node resumes what it had.
_PROCESS_KEY = secrets.token_bytes(32)


class Spool:
    """A directory holding one transfer's manifest, state file and part files, sealed.

    What a peer sent may be a full identified study, so nothing here is in clear: each
    chunk is sealed (XChaCha20-Poly1305, a fresh random nonce per write) in place, at
    the offset its plain bytes would have, and the nonce and tag go back to the caller
    as a *receipt* (the receiver journals it, as it journalled chunk digests before);
    the manifest and state files are sealed whole (SecretBox). Part files keep the
    size and offsets of the wire encoding, so crash-safety reasoning is unchanged:
    a chunk counts only if its receipt opens the bytes on disk.
    """

    def __init__(self, root: Path, key: bytes | None = None) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = key or _PROCESS_KEY
        self._chunk_key = hashlib.blake2b(key, digest_size=32, person=b"radmesh-spoolc").digest()
        file_key = hashlib.blake2b(key, digest_size=32, person=b"radmesh-spoolf").digest()
        self._box = nacl.secret.SecretBox(file_key)

    def _part(self, index: int) -> Path:
        return self.root / f"{index}.part"

    def write_chunk(self, index: int, seq: int, offset: int, data: bytes) -> bytes:
        """Seal and write one chunk; returns its receipt (needed to read it back)."""
        nonce = secrets.token_bytes(_NONCE)
        sealed = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(
            data, struct.pack("<II", index, seq), nonce, self._chunk_key
        )
        fd = os.open(self._part(index), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, sealed[: len(data)], offset)
        finally:
            os.close(fd)
        return nonce + sealed[len(data) :]

    def read_chunk(
        self, index: int, seq: int, offset: int, length: int, receipt: bytes
    ) -> bytes | None:
        """The chunk written with ``receipt``, or None if the part does not hold it."""
        try:
            fd = os.open(self._part(index), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            sealed = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        if len(sealed) != length or len(receipt) != RECEIPT_SIZE:
            return None
        try:
            plain: bytes = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
                sealed + receipt[_NONCE:],
                struct.pack("<II", index, seq),
                receipt[:_NONCE],
                self._chunk_key,
            )
        except nacl.exceptions.CryptoError:
            return None
        return plain

    def has_part(self, index: int) -> bool:
        return self._part(index).exists()

    def read_part(self, index: int, chunks: Sequence[tuple[int, int, bytes]]) -> bytes:
        """A whole part from its (offset, length, receipt) chunks, in order. Raises
        :class:`node.dicom.wirecodec.CorruptInstance` if any chunk was damaged on disk."""
        out = []
        for seq, (offset, length, receipt) in enumerate(chunks):
            plain = self.read_chunk(index, seq, offset, length, receipt)
            if plain is None:
                raise wirecodec.CorruptInstance(f"chunk {seq} is missing or damaged in the spool")
            out.append(plain)
        return b"".join(out)

    def drop_part(self, index: int) -> None:
        self._part(index).unlink(missing_ok=True)

    def save(self, name: str, data: bytes) -> None:
        tmp = self.root / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self._box.encrypt(data))
        os.replace(tmp, self.root / name)  # atomic: a crash leaves the old or the new file

    def append(self, name: str, data: bytes) -> None:
        """Append to a file kept in clear (the journal: chunk numbers and receipts)."""
        fd = os.open(self.root / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as f:
            f.write(data)

    def save_clear(self, name: str, data: bytes) -> None:
        tmp = self.root / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, self.root / name)

    def load_clear(self, name: str) -> bytes | None:
        path = self.root / name
        return path.read_bytes() if path.exists() else None

    def remove(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def load(self, name: str) -> bytes | None:
        """A sealed file's contents; None when missing or unreadable with this key."""
        path = self.root / name
        if not path.exists():
            return None
        try:
            return bytes(self._box.decrypt(path.read_bytes()))
        except (nacl.exceptions.CryptoError, ValueError):
            return None


# -- progress ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    bytes_done: int  # original bytes of instances stored (or already present)
    bytes_total: int
    instances_done: int
    instances_total: int
    rate: float  # original bytes per second, smoothed
    eta: float | None  # seconds, None while unknown

    @property
    def fraction(self) -> float:
        return self.bytes_done / self.bytes_total if self.bytes_total else 1.0


# -- sender --------------------------------------------------------------------------------


class Sender:
    """Answers chunk requests for one offered study. Stateless apart from a small cache.

    One Sender serves one peer (the runner gives it that peer's messages only), so
    whoever sends it a :class:`ResumeRequest` is the recipient the study was offered to.
    """

    def __init__(self, manifest: Manifest, source: Callable[[int], bytes], signed: bytes) -> None:
        self.manifest = manifest
        self.signed = signed
        self.machine = Machine()
        self._source = source
        self._cached: tuple[int, bytes] | None = None
        self._offered_at: float | None = None
        self._requested_since_offer = False
        self.chunks_sent = 0

    def offer(self, now: float) -> list[OfferPart]:
        """The signed manifest, in parts, to send on the control channel."""
        self._offered_at, self._requested_since_offer = now, False
        return offer_parts(self.signed, self.manifest.transfer_id)

    def resume(self, request: ResumeRequest, now: float) -> list[OfferPart]:
        """Offer again at once for a receiver that restarted mid-transfer.

        Nothing for another transfer id, for a transfer that is over (a finished or
        cancelled share is never served again), or when the last offer went out less
        than REOFFER_MIN_INTERVAL ago and no request came since (a receiver repeating
        itself gets no flood of manifests).
        """
        recent = self._offered_at is not None and now - self._offered_at < REOFFER_MIN_INTERVAL
        if (
            request.transfer_id != self.manifest.transfer_id
            or self.machine.state not in (State.OFFERED, State.RUNNING)
            or (recent and not self._requested_since_offer)
        ):
            return []
        return self.offer(now)

    def _wire(self, index: int) -> bytes:
        if self._cached is None or self._cached[0] != index:
            wire = self._source(index)
            if len(wire) != self.manifest.entries[index].wire_size:
                raise LocalTransferError(f"wire encoding of instance {index} changed size")
            self._cached = (index, wire)
        return self._cached[1]

    def receive(self, message: Message) -> list[Chunk]:
        if message.transfer_id != self.manifest.transfer_id:
            raise MalformedMessage("message for another transfer")
        if isinstance(message, Cancel):
            self.machine.fire(Event.CANCEL)
            return []
        if isinstance(message, Finished):
            self.machine.fire(Event.FINISH)
            self._cached = None
            return []
        if not isinstance(message, Request):
            raise MalformedMessage(
                "the sender only takes requests, cancel and finished (resume goes to resume())"
            )
        if self.machine.state is State.OFFERED:
            self.machine.fire(Event.ACCEPT)
        self.machine.fire(Event.DATA)
        self._requested_since_offer = True
        if not 0 <= message.index < len(self.manifest.entries):
            raise MalformedMessage(f"request for instance {message.index}, not in the manifest")
        entry = self.manifest.entries[message.index]
        size = self.manifest.chunk_size
        if any(s >= entry.chunk_count(size) for s in message.seqs):
            raise MalformedMessage("request for a chunk past the end of the instance")
        wire = self._wire(message.index)
        out = []
        for seq in message.seqs:
            data = wire[seq * size : (seq + 1) * size]
            out.append(
                Chunk(self.manifest.transfer_id, message.index, seq, chunk_digest(data), data)
            )
        self.chunks_sent += len(out)
        return out


# -- receiver ------------------------------------------------------------------------------


def decode_part(part: bytes, entry: ManifestEntry, study_uid: str) -> bytes:
    """The original file of a received wire encoding, checked against its manifest entry.

    Every size the encoding declares is checked against the entry before anything is
    decoded (:class:`DecompressionBomb`); the decoded file must have the entry's hash
    and carry the entry's study, series and instance UIDs (:class:`ManifestMismatch`:
    a manifest that names one instance and delivers another is the sender's lie, not
    damage, and fetching it again would not help). Damage raises
    :class:`node.dicom.wirecodec.WireCodecError`.
    """
    wire = wirecodec.WireInstance.from_wire(part, entry.wire_size)
    if wire.sha256 != entry.sha256:
        raise wirecodec.CorruptInstance("its hash differs from the manifest")
    try:
        wirecodec.check_declared(wire, entry.size)
    except wirecodec.Oversized as exc:
        raise DecompressionBomb(
            f"instance {entry.sop_instance_uid} was refused before decoding: {exc}"
        ) from exc
    data = wirecodec.decode(wire)
    try:
        ds = wirecodec.parse_dicom(data)
        found = _describe(ds, data)[:3]
    except wirecodec.BadInstance as exc:
        raise ManifestMismatch(
            f"instance {entry.sop_instance_uid} is not a DICOM instance: {exc}"
        ) from exc
    if found != (study_uid, entry.series_instance_uid, entry.sop_instance_uid):
        raise ManifestMismatch(
            f"the bytes sent as instance {entry.sop_instance_uid} (study {study_uid}) carry "
            f"instance {found[2][:64]!r} of study {found[0][:64]!r}: refused, nothing stored. "
            "The sender's manifest does not describe what it sends; ask them to share again."
        )
    try:  # what a viewer here would allocate to show it
        wirecodec.check_pixels(ds, MAX_INSTANCE_SIZE)
    except wirecodec.Oversized as exc:
        raise DecompressionBomb(f"instance {entry.sop_instance_uid} was refused: {exc}") from exc
    except wirecodec.CorruptInstance:
        pass  # damaged frames are stored as sent: a viewer fails on them here as there
    return data


@dataclass
class _Partial:
    count: int
    verified: dict[int, bytes] = field(default_factory=dict)  # seq -> spool receipt
    outstanding: dict[int, float] = field(default_factory=dict)  # seq -> requested at


STATE_FILE = "state"
JOURNAL_FILE = "journal"  # (index, seq, receipt) of each chunk written to an unfinished part
_JOURNAL_RECORD = struct.Struct(f"<II{RECEIPT_SIZE}s")  # (index, seq, receipt)
MANIFEST_FILE = "manifest"


class Receiver:
    """Pulls one study. Drive it with :meth:`poll` (requests to send) and :meth:`receive`."""

    def __init__(
        self,
        signed_manifest: bytes,
        spool: Spool,
        have: Callable[[bytes], bool] = lambda _h: False,
        window: int = DEFAULT_WINDOW,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.sender_key, self.manifest = Manifest.open(signed_manifest)
        self.spool = spool
        self.window = window
        self.timeout = timeout
        self.machine = Machine()
        self.done: set[int] = set()
        self.ready: set[int] = set()  # every chunk verified, waiting to be assembled
        self._partials: dict[int, _Partial] = {}
        self._attempts: dict[int, int] = {}
        self._priority: list[int] = []
        self._first = 0  # every instance before this one is done
        self.chunks_received = 0
        self.chunks_requested = 0
        self.chunks_rerequested = 0
        self.chunks_rejected = 0
        self._rate = 0.0
        self._last: tuple[float, int] | None = None
        self._restore(signed_manifest)
        for i, entry in enumerate(self.manifest.entries):
            if i not in self.done and have(entry.sha256):
                self.done.add(i)  # already in the store: never requested

    # persistence

    def _restore(self, signed_manifest: bytes) -> None:
        self.spool.save(MANIFEST_FILE, signed_manifest)
        raw = self.spool.load(STATE_FILE)
        try:
            if raw is None:
                raise ValueError("no state yet")
            state = canonical.decode(raw, MAX_MANIFEST_SIZE)
            if state["id"] != self.manifest.transfer_id:
                raise ValueError("state of another transfer")
            total = len(self.manifest.entries)
            self.done = {i for i in state["done"] if 0 <= i < total}
            journal = self.spool.load_clear(JOURNAL_FILE) or b""
            usable = len(journal) - len(journal) % _JOURNAL_RECORD.size  # torn last record
            claimed: dict[int, dict[int, bytes]] = {}
            for index, seq, receipt in _JOURNAL_RECORD.iter_unpack(journal[:usable]):
                claimed.setdefault(index, {})[seq] = receipt
            for index, seqs in claimed.items():
                if 0 <= index < total and index not in self.done:
                    self._restore_part(index, seqs)
            self._persist()  # the journal now holds only what was found on disk
        except (CryptoError, KeyError, TypeError, ValueError, AttributeError):
            # No usable state (first start, another transfer, damage): start over, safely.
            self.done, self._partials, self.ready = set(), {}, set()
            self._persist()

    def _restore_part(self, index: int, claimed: dict[int, bytes]) -> None:
        """Keep the journalled chunks whose bytes really are in the part file (their
        receipt opens them: sealed, so damaged or missing bytes do not)."""
        count = self.manifest.entries[index].chunk_count(self.manifest.chunk_size)
        ok = {
            seq: receipt
            for seq, receipt in claimed.items()
            if 0 <= seq < count
            and self.spool.read_chunk(index, seq, *self._extent(index, seq), receipt) is not None
        }
        self._partials[index] = _Partial(count, ok)
        if len(ok) == count:
            self.ready.add(index)

    def _extent(self, index: int, seq: int) -> tuple[int, int]:
        """(offset, length) of chunk ``seq`` of instance ``index`` in its wire encoding."""
        size = self.manifest.chunk_size
        return seq * size, min(size, self.manifest.entries[index].wire_size - seq * size)

    def _save_state(self) -> None:
        state = {"id": self.manifest.transfer_id, "done": sorted(self.done)}
        self.spool.save(STATE_FILE, canonical.encode(state))

    def _persist(self) -> None:
        journal = b"".join(
            _JOURNAL_RECORD.pack(index, seq, receipt)
            for index, partial in self._partials.items()
            for seq, receipt in partial.verified.items()
        )
        # The journal first: a crash between the two leaves a state that is only older.
        self.spool.save_clear(JOURNAL_FILE, journal)
        self._save_state()

    @classmethod
    def resume(cls, spool: Spool, **kwargs: Any) -> Receiver:
        """Reopen a transfer from its spool after a restart."""
        signed = spool.load(MANIFEST_FILE)
        if signed is None:
            raise LocalTransferError(f"no transfer to resume in {spool.root}")
        return cls(signed, spool, **kwargs)

    # control

    @property
    def state(self) -> State:
        return self.machine.state

    def accept(self) -> None:
        self.machine.fire(Event.ACCEPT)
        if len(self.done) == len(self.manifest.entries):
            self._finish()

    def _finish(self) -> None:
        # The same study offered again later has the same transfer id: a state left
        # here would call instances done that the store may no longer hold.
        self.machine.fire(Event.FINISH)
        for name in (STATE_FILE, JOURNAL_FILE, MANIFEST_FILE):
            self.spool.remove(name)

    def pause(self) -> None:
        self.machine.fire(Event.PAUSE)

    def resume_transfer(self) -> None:
        self.machine.fire(Event.RESUME)

    def cancel(self, reason: str = "cancelled by the receiver") -> Cancel:
        self.machine.fire(Event.CANCEL)
        for index in list(self._partials):
            self.spool.drop_part(index)
        return Cancel(self.manifest.transfer_id, reason)

    def prioritise(self, index: int) -> None:
        """Fetch this instance next (the slice on screen), ahead of the series order."""
        if not 0 <= index < len(self.manifest.entries):
            raise LocalTransferError(f"instance {index} is not in this study")
        if index in self._priority:
            self._priority.remove(index)
        self._priority.insert(0, index)

    def index_of(self, sop_instance_uid: str) -> int:
        for i, entry in enumerate(self.manifest.entries):
            if entry.sop_instance_uid == sop_instance_uid:
                return i
        raise LocalTransferError(f"instance {sop_instance_uid} is not in this study")

    # requests

    def _order(self) -> Iterable[int]:
        seen = set()
        while self._first in self.done:  # instances before it are all done: skip them
            self._first += 1
        rest = range(self._first, len(self.manifest.entries))
        for index in itertools.chain(self._priority, list(self._partials), rest):
            if index not in seen:
                seen.add(index)
                yield index

    def _outstanding(self) -> int:
        return sum(len(p.outstanding) for p in self._partials.values())

    def poll(self, now: float) -> list[Request]:
        """The chunk requests to send now (new ones within the window, and timed-out ones)."""
        if self.state is not State.RUNNING:
            return []
        requests: list[Request] = []
        budget = self.window - self._outstanding()
        for partial_index, active in self._partials.items():
            stale = [s for s, t in active.outstanding.items() if now - t >= self.timeout]
            if stale:
                for s in stale:
                    active.outstanding[s] = now
                self.chunks_rerequested += len(stale)
                requests.append(Request(self.manifest.transfer_id, partial_index, tuple(stale)))
        for index in self._order():
            if budget <= 0:
                break
            if index in self.done or index in self.ready:
                continue
            partial = self._partials.get(index)
            if partial is None:
                if len(self._partials) >= MAX_ACTIVE_INSTANCES and index not in self._priority:
                    continue
                entry = self.manifest.entries[index]
                partial = _Partial(entry.chunk_count(self.manifest.chunk_size))
                self._partials[index] = partial
            wanted = [
                s
                for s in range(partial.count)
                if s not in partial.verified and s not in partial.outstanding
            ][: min(budget, MAX_SEQS_PER_REQUEST)]
            if not wanted:
                continue
            for s in wanted:
                partial.outstanding[s] = now
            budget -= len(wanted)
            self.chunks_requested += len(wanted)
            requests.append(Request(self.manifest.transfer_id, index, tuple(wanted)))
        return requests

    def receive(self, chunk: Chunk, now: float) -> int | None:
        """Verify and spool a chunk. Returns the instance index once all its chunks are in.

        Raises :class:`ChunkRejected` (the chunk is not written; it will be requested
        again when its request times out, or at once for a damaged one).
        """
        if self.state in (State.COMPLETE, State.CANCELLED, State.FAILED):
            raise ChunkRejected(f"chunk arrived after the transfer was {self.state.value}")
        self.machine.fire(Event.DATA)
        if chunk.transfer_id != self.manifest.transfer_id:
            raise ChunkRejected("chunk belongs to another transfer")
        partial = self._partials.get(chunk.index)
        if partial is None or chunk.seq not in partial.outstanding:
            self.chunks_rejected += 1
            raise ChunkRejected(
                f"chunk {chunk.seq} of instance {chunk.index} was not requested "
                "(duplicate, out of place or already verified); ignored"
            )
        entry = self.manifest.entries[chunk.index]
        size = self.manifest.chunk_size
        expected = min(size, entry.wire_size - chunk.seq * size)
        if len(chunk.data) != expected:
            self.chunks_rejected += 1
            raise ChunkRejected(
                f"chunk {chunk.seq} of instance {entry.sop_instance_uid} has {len(chunk.data)} "
                f"bytes where the manifest implies {expected}: the instance is not the size "
                "the sender declared"
            )
        if chunk_digest(chunk.data) != chunk.digest:
            self.chunks_rejected += 1
            del partial.outstanding[chunk.seq]  # ask again at the next poll
            raise ChunkRejected(
                f"chunk {chunk.seq} of instance {entry.sop_instance_uid} is damaged "
                "(hash mismatch); not written, requested again"
            )
        receipt = self.spool.write_chunk(chunk.index, chunk.seq, chunk.seq * size, chunk.data)
        del partial.outstanding[chunk.seq]
        partial.verified[chunk.seq] = receipt
        self.chunks_received += 1
        # Appending a record is far cheaper than rewriting the state for every chunk; it
        # is not fsynced: after a power cut, restore checks each record against the part.
        self.spool.append(JOURNAL_FILE, _JOURNAL_RECORD.pack(chunk.index, chunk.seq, receipt))
        if len(partial.verified) == partial.count:
            self.ready.add(chunk.index)
            return chunk.index
        return None

    def verify_part(self, index: int) -> bytes:
        """Decode a fully received instance and check it against the manifest.

        Reads only (safe in a worker thread: JPEG-LS decoding is the CPU-heavy part).
        Raises :class:`node.dicom.wirecodec.WireCodecError` or OSError (damage: pass it to
        :meth:`reject_part`), or :class:`DecompressionBomb` / :class:`ManifestMismatch`
        (the sender's doing: pass it to :meth:`refuse_part`).
        """
        partial = self._partials.get(index)
        if index not in self.ready or partial is None:
            raise LocalTransferError(f"instance {index} is not fully received")
        chunks = [
            (*self._extent(index, seq), partial.verified[seq]) for seq in range(partial.count)
        ]
        part = self.spool.read_part(index, chunks)
        return decode_part(part, self.manifest.entries[index], self.manifest.study_instance_uid)

    def reject_part(self, index: int, exc: Exception) -> TransferError:
        """Forget a received instance that failed :meth:`verify_part`; return the error.

        The instance is requested again from scratch; the second failure fails the
        transfer (:class:`ManifestMismatch`).
        """
        entry = self.manifest.entries[index]
        self.ready.discard(index)
        self._partials.pop(index, None)
        self.spool.drop_part(index)
        self._attempts[index] = self._attempts.get(index, 0) + 1
        self._persist()
        if self._attempts[index] >= MAX_INSTANCE_ATTEMPTS:
            self.machine.fire(Event.FAIL)
            return ManifestMismatch(
                f"instance {entry.sop_instance_uid} arrived twice but never matched the "
                f"signed manifest ({exc}). The sender's copy changed or the peer is "
                "misbehaving: ask them to share the study again."
            )
        return InstanceRejected(
            f"instance {entry.sop_instance_uid} does not match the manifest ({exc}); "
            "fetching it again"
        )

    def refuse_part(self, index: int, error: RemoteTransferError) -> RemoteTransferError:
        """Fail the transfer for an instance the sender misrepresented (a bomb, another
        instance than the manifest names): its part is dropped, nothing is stored, and
        ``error`` is returned for the caller to raise (and to drop the peer)."""
        self.ready.discard(index)
        self._partials.pop(index, None)
        self.spool.drop_part(index)
        self._persist()
        if self.state in (State.RUNNING, State.PAUSED):
            self.machine.fire(Event.FAIL)
        return error

    def assemble(self, index: int) -> bytes:
        """:meth:`verify_part`, raising the transfer error of :meth:`reject_part` or
        :meth:`refuse_part`."""
        try:
            return self.verify_part(index)
        except RemoteTransferError as exc:
            raise self.refuse_part(index, exc) from exc
        except (wirecodec.WireCodecError, OSError) as exc:
            raise self.reject_part(index, exc) from exc

    def stored(self, index: int, now: float) -> Finished | None:
        """The instance is committed to the store. Returns Finished when the study is."""
        self.machine.fire(Event.DATA)
        self.ready.discard(index)
        self._partials.pop(index, None)
        if index in self._priority:
            self._priority.remove(index)
        self.done.add(index)
        self.spool.drop_part(index)
        # The state only: the instance's journal records are ignored once it is done.
        self._save_state()
        size = self.manifest.entries[index].size
        if self._last is not None and now > self._last[0]:
            instant = size / (now - self._last[0])
            self._rate = instant if self._rate == 0 else 0.8 * self._rate + 0.2 * instant
        self._last = (now, size)
        if len(self.done) == len(self.manifest.entries):
            self._finish()
            return Finished(self.manifest.transfer_id)
        return None

    def progress(self) -> Progress:
        entries = self.manifest.entries
        done_bytes = sum(entries[i].size for i in self.done)
        total = self.manifest.total_size
        eta = (total - done_bytes) / self._rate if self._rate > 0 else None
        return Progress(done_bytes, total, len(self.done), len(entries), self._rate, eta)

    def missing(self) -> Sequence[int]:
        return [i for i in range(len(self.manifest.entries)) if i not in self.done]


def resume_request(spool: Spool, sender_key: bytes) -> ResumeRequest | None:
    """What a (re)started receiver asks ``sender_key`` for: the unfinished transfer in
    its spool, if that peer signed its manifest. None when there is nothing to ask
    (a finished transfer leaves no manifest; a damaged one is replaced by the next offer).
    """
    signed = spool.load(MANIFEST_FILE)
    if signed is None:
        return None
    try:
        signer, manifest = Manifest.open(signed)
    except MalformedMessage:
        return None
    return ResumeRequest(manifest.transfer_id) if signer == sender_key else None
