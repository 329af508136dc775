"""The study transfer's messages, sans-IO: frozen dataclasses with ``to_wire`` / ``from_wire``.

A message is a msgpack array ``[kind, transfer id, field, ...]``; the kind strings and
field order are the wire format (``tests/peer_transport/golden/transfer_*.bin`` pin the
bytes). As in :mod:`peer_transport.frames`, the size cap is checked before msgpack sees
a byte and every field's type after, so a peer can only ever cause
:class:`~peer_transport.transfer.errors.MalformedMessage`.

Requests, cancel, finished, offer parts, wire declarations, hurries and resume
requests travel on the control channel; chunks on the bulk channel. :func:`peek` reads
the kind and transfer id alone (enough to route a chunk without decoding its data).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import msgpack

from peer_transport.transfer.errors import MalformedMessage

CHUNK_SIZE = 60 * 1024  # leaves room for headers under aiortc's 64 KiB message limit
MAX_CHUNK_MESSAGE = CHUNK_SIZE + 512
MAX_CONTROL_MESSAGE = 16 * 1024
MAX_MANIFEST_SIZE = 16 << 20
MAX_SEQS_PER_REQUEST = 256
CHUNK_DIGEST_SIZE = 16
TRANSFER_ID_SIZE = 16
MAX_OFFERS_ASSEMBLED = 4
MAX_REASON = 200  # characters of a cancel's reason that are sent


def chunk_digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=CHUNK_DIGEST_SIZE).digest()


def _ints(values: Any) -> bool:
    return isinstance(values, list) and all(type(v) is int and v >= 0 for v in values)


@dataclass(frozen=True)
class _Message:
    KIND: ClassVar[str] = ""

    transfer_id: bytes

    def _fields(self) -> list[Any]:
        return []

    def to_wire(self) -> bytes:
        packed: bytes = msgpack.packb(
            [self.KIND, self.transfer_id, *self._fields()], use_bin_type=True
        )
        return packed

    @classmethod
    def _parse(cls, transfer_id: bytes, fields: list[Any]) -> Self | None:
        """The message from its fields after the transfer id; None when they are wrong."""
        return cls(transfer_id) if not fields else None

    @classmethod
    def from_wire(cls, data: bytes) -> Self:
        """Bytes of one message of this kind -> the message. Raises MalformedMessage."""
        message = from_wire(data)
        if not isinstance(message, cls):
            raise MalformedMessage(
                f"expected a transfer {cls.KIND!r} message, got {message.KIND!r}"
            )
        return message


@dataclass(frozen=True)
class Request(_Message):
    """Receiver -> sender: send these chunks of this instance."""

    KIND: ClassVar[str] = "req"
    index: int
    seqs: tuple[int, ...]

    def _fields(self) -> list[Any]:
        return [self.index, list(self.seqs)]

    @classmethod
    def _parse(cls, transfer_id: bytes, fields: list[Any]) -> Self | None:
        if not (len(fields) == 2 and _ints(fields[0:1]) and _ints(fields[1])):
            return None
        if len(fields[1]) > MAX_SEQS_PER_REQUEST:
            raise MalformedMessage("chunk request asks for too many chunks at once")
        return cls(transfer_id, fields[0], tuple(fields[1]))


@dataclass(frozen=True)
class Chunk(_Message):
    """Sender -> receiver (bulk channel): bytes [seq*chunk_size, ...) of a wire encoding."""

    KIND: ClassVar[str] = "chunk"
    index: int
    seq: int
    digest: bytes
    data: bytes

    def _fields(self) -> list[Any]:
        return [self.index, self.seq, self.digest, self.data]

    @classmethod
    def _parse(cls, transfer_id: bytes, fields: list[Any]) -> Self | None:
        if not (
            len(fields) == 4
            and _ints(fields[0:2])
            and isinstance(fields[2], bytes)
            and isinstance(fields[3], bytes)
        ):
            return None
        return cls(transfer_id, *fields)


@dataclass(frozen=True)
class Cancel(_Message):
    KIND: ClassVar[str] = "cancel"
    reason: str

    def _fields(self) -> list[Any]:
        return [self.reason[:MAX_REASON]]

    @classmethod
    def _parse(cls, transfer_id: bytes, fields: list[Any]) -> Self | None:
        if not (len(fields) == 1 and isinstance(fields[0], str)):
            return None
        return cls(transfer_id, fields[0])


@dataclass(frozen=True)
class Finished(_Message):
    """Receiver -> sender: every instance is stored; the sender may drop its cache."""

    KIND: ClassVar[str] = "fin"


@dataclass(frozen=True)
class OfferPart(_Message):
    """Sender -> receiver: part of the signed manifest (it may exceed one message)."""

    KIND: ClassVar[str] = "offer"
    part: int
    total: int
    data: bytes

    def _fields(self) -> list[Any]:
        return [self.part, self.total, self.data]

    @classmethod
    def _parse(cls, transfer_id: bytes, fields: list[Any]) -> Self | None:
        if not (len(fields) == 3 and _ints(fields[0:2]) and isinstance(fields[2], bytes)):
            return None
        return cls(transfer_id, *fields)


@dataclass(frozen=True)
class ResumeRequest(_Message):
    """Receiver -> sender: I restarted holding an unfinished spool of this transfer;
    offer it again now."""

    KIND: ClassVar[str] = "resume"


@dataclass(frozen=True)
class Declare(_Message):
    """Sender -> receiver: a signed "study-wire" envelope declaring the wire encodings of
    instances just encoded (:func:`peer_transport.transfer.manifest.open_wires`)."""

    KIND: ClassVar[str] = "wire"
    data: bytes

    def _fields(self) -> list[Any]:
        return [self.data]

    @classmethod
    def _parse(cls, transfer_id: bytes, fields: list[Any]) -> Self | None:
        if not (len(fields) == 1 and isinstance(fields[0], bytes)):
            return None
        if len(fields[0]) > MAX_CONTROL_MESSAGE:
            raise MalformedMessage("wire declaration is over the control message limit")
        return cls(transfer_id, fields[0])


@dataclass(frozen=True)
class Hurry(_Message):
    """Receiver -> sender: encode (or declare again) this instance next; the viewer
    waits for it, or its declaration never came."""

    KIND: ClassVar[str] = "hurry"
    index: int

    def _fields(self) -> list[Any]:
        return [self.index]

    @classmethod
    def _parse(cls, transfer_id: bytes, fields: list[Any]) -> Self | None:
        if not (len(fields) == 1 and _ints(fields)):
            return None
        return cls(transfer_id, fields[0])


Message = Request | Chunk | Cancel | Finished | OfferPart | ResumeRequest | Declare | Hurry
_BY_KIND: dict[str, type[Message]] = {
    t.KIND: t for t in (Request, Chunk, Cancel, Finished, OfferPart, ResumeRequest, Declare, Hurry)
}


def to_wire(message: Message) -> bytes:
    return message.to_wire()


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
    """Bytes of one transfer message -> the message. Raises MalformedMessage."""
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
    message_type = _BY_KIND.get(kind)
    message = None if message_type is None else message_type._parse(args[0], args[1:])
    if message is None:
        raise MalformedMessage(f"unknown or malformed transfer message {kind!r}")
    return message


def offer_parts(signed_manifest: bytes, transfer_id: bytes) -> list[OfferPart]:
    pieces = [
        signed_manifest[i : i + CHUNK_SIZE] for i in range(0, len(signed_manifest), CHUNK_SIZE)
    ]
    return [OfferPart(transfer_id, i, len(pieces), p) for i, p in enumerate(pieces)]


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
