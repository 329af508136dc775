"""The frame codec: what travels inside one data-channel message, sans-IO.

A frame is a msgpack array ``[code, field, ...]``. Each frame type is a frozen
dataclass with ``to_wire()``; :func:`decode` turns bytes back into one of them.
The size cap is checked before msgpack sees a byte, and every field's type is
checked after, so a peer can only ever cause a :class:`RemoteProtocolError`.

After the handshake, frames are encrypted (``crypto.channel``) before they
become data-channel messages; :data:`MAX_MESSAGE` is aiortc's limit on what the
data channel carries, :data:`MAX_FRAME` leaves room for the encryption, and
:data:`MAX_BULK_PAYLOAD` / :data:`MAX_PAYLOAD` are what callers may put in one
frame.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack

from peer_transport.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError

MAX_MESSAGE = 65536  # aiortc's maximum data-channel message
MAX_FRAME = MAX_MESSAGE - 64  # secretstream header + tag, datagram counter + tag
MAX_PAYLOAD = MAX_FRAME - 32  # msgpack array, code and the small fields
MAX_BULK_PAYLOAD = MAX_PAYLOAD - 16
MAX_TEXT = 4096  # kinds, error codes and reasons
MAX_FIELDS = 4
_UINT64 = (1 << 64) - 1


@dataclass(frozen=True)
class Frame:
    CODE: ClassVar[int] = -1

    def to_wire(self) -> bytes:
        values = [getattr(self, f.name) for f in dataclasses.fields(self)]
        packed: bytes = msgpack.packb([self.CODE, *values], use_bin_type=True)
        if len(packed) > MAX_FRAME:
            raise LocalProtocolError(
                f"{type(self).__name__} frame is {len(packed)} bytes, limit is {MAX_FRAME}: "
                "split the payload"
            )
        return packed


@dataclass(frozen=True)
class Handshake(Frame):
    """One session-handshake message (step 1 Init, 2 Resp, 3 Fin); plaintext inside DTLS."""

    CODE: ClassVar[int] = 0
    step: int
    data: bytes


@dataclass(frozen=True)
class Ready(Frame):
    """The responder's first encrypted frame: the session is open both ways."""

    CODE: ClassVar[int] = 1


@dataclass(frozen=True)
class Request(Frame):
    CODE: ClassVar[int] = 2
    id: int
    kind: str
    body: bytes


@dataclass(frozen=True)
class Response(Frame):
    CODE: ClassVar[int] = 3
    id: int
    body: bytes


@dataclass(frozen=True)
class ErrorReply(Frame):
    CODE: ClassVar[int] = 4
    id: int
    code: str
    message: str


@dataclass(frozen=True)
class Ping(Frame):
    CODE: ClassVar[int] = 5
    seq: int


@dataclass(frozen=True)
class Pong(Frame):
    CODE: ClassVar[int] = 6
    seq: int


@dataclass(frozen=True)
class Message(Frame):
    """A one-way application message on the control channel (e.g. transfer requests)."""

    CODE: ClassVar[int] = 7
    data: bytes


@dataclass(frozen=True)
class Bulk(Frame):
    CODE: ClassVar[int] = 8
    seq: int
    data: bytes


@dataclass(frozen=True)
class BulkAck(Frame):
    """The receiver has consumed every bulk frame up to and including ``seq``."""

    CODE: ClassVar[int] = 9
    seq: int


@dataclass(frozen=True)
class Live(Frame):
    CODE: ClassVar[int] = 10
    data: bytes


@dataclass(frozen=True)
class Presence(Frame):
    CODE: ClassVar[int] = 11
    data: bytes


@dataclass(frozen=True)
class Close(Frame):
    CODE: ClassVar[int] = 12
    code: str
    reason: str


FRAME_TYPES: tuple[type[Frame], ...] = (
    Handshake,
    Ready,
    Request,
    Response,
    ErrorReply,
    Ping,
    Pong,
    Message,
    Bulk,
    BulkAck,
    Live,
    Presence,
    Close,
)
_BY_CODE = {t.CODE: t for t in FRAME_TYPES}
_SCHEMA = {t: [(f.name, f.type) for f in dataclasses.fields(t)] for t in FRAME_TYPES}


def _check(frame_type: type[Frame], name: str, type_name: Any, value: Any) -> Any:
    where = f"{frame_type.__name__}.{name}"
    if type_name == "int":
        if type(value) is not int or not 0 <= value <= _UINT64:
            raise RemoteProtocolError(f"frame field {where} must be an unsigned 64-bit integer")
    elif type_name == "bytes":
        if not isinstance(value, bytes):
            raise RemoteProtocolError(f"frame field {where} must be bytes")
    elif type_name == "str":
        if not isinstance(value, str) or len(value) > MAX_TEXT:
            raise RemoteProtocolError(f"frame field {where} must be text of at most {MAX_TEXT}")
    else:  # pragma: no cover - a frame class with an unsupported field type
        raise LocalProtocolError(f"frame field {where} has unsupported type {type_name!r}")
    return value


def decode(data: bytes) -> Frame:
    """Bytes of one frame (already decrypted) -> the frame. Raises RemoteProtocolError."""
    if len(data) > MAX_FRAME:
        raise FrameTooLarge(f"frame is {len(data)} bytes, limit is {MAX_FRAME}")
    try:
        raw = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_array_len=MAX_FIELDS + 1,
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several undocumented types on garbage
        raise RemoteProtocolError(f"frame is not valid msgpack ({type(exc).__name__})") from exc
    if not isinstance(raw, list) or not raw or type(raw[0]) is not int:
        raise RemoteProtocolError("frame must be a msgpack array starting with a type code")
    frame_type = _BY_CODE.get(raw[0])
    if frame_type is None:
        raise RemoteProtocolError(f"unknown frame type {raw[0]}")
    schema = _SCHEMA[frame_type]
    if len(raw) != len(schema) + 1:
        raise RemoteProtocolError(
            f"{frame_type.__name__} frame has {len(raw) - 1} fields, expected {len(schema)}"
        )
    values = [_check(frame_type, n, t, v) for (n, t), v in zip(schema, raw[1:], strict=True)]
    return frame_type(*values)


__all__ = [
    "FRAME_TYPES",
    "MAX_BULK_PAYLOAD",
    "MAX_FRAME",
    "MAX_MESSAGE",
    "MAX_PAYLOAD",
    "Bulk",
    "BulkAck",
    "Close",
    "ErrorReply",
    "Frame",
    "Handshake",
    "Live",
    "Message",
    "Ping",
    "Pong",
    "Presence",
    "Ready",
    "Request",
    "Response",
    "decode",
]
