"""Presence: who is in the session, where their cursor is, what they look at.

Built on pycrdt ``Awareness`` (the Yjs awareness protocol), with time passed in
instead of read from the clock, so "gone within 5 s" and "at most 30 cursor
updates a second" are tested without sleeping.

- Each participant publishes a state: node, name, colour, tool, cursor
  (instance, frame, x, y), viewport (series, slice, window/level, zoom, pan)
  and whether they are presenting or following the presenter.
- :meth:`Presence.poll` returns the message to send now, if any: cursor moves
  are coalesced to at most :data:`MAX_RATE_HZ` messages a second, and an
  unchanged state is re-sent every :data:`HEARTBEAT_S` so peers know we are here.
- :meth:`Presence.expire` drops peers silent for :data:`GONE_AFTER_S`.
- Follow-the-presenter: a follower's viewport copies the presenter's until the
  follower moves on their own.

Awareness states arrive from peers the transport has authenticated; the
``node`` field is what they claim, and binding it to the connection's verified
node id is the runtime's job (it knows which connection a message came from).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import pycrdt

from consult.errors import MalformedMessage
from consult.ywire import read_varuint, varuint

GONE_AFTER_S = 5.0
HEARTBEAT_S = 1.5
MAX_RATE_HZ = 30.0
MAX_PRESENCE_MESSAGE = 16 * 1024
AWARENESS_BYTE = 1  # y-protocols message type for awareness
# Caps on what a peer's presence state may hold, checked on receive (check_state).
MAX_NAME_CHARS = 100
MAX_COLOUR_CHARS = 16
MAX_TOOL_CHARS = 32
MAX_NODE_CHARS = 80  # a node id as text
MAX_UID_CHARS = 64  # a DICOM UID
MAX_NUMBER = 1e9  # cursor and view numbers (pixels, window, level, zoom, pan)
_TEXT_CAPS = {
    "node": MAX_NODE_CHARS,
    "name": MAX_NAME_CHARS,
    "colour": MAX_COLOUR_CHARS,
    "tool": MAX_TOOL_CHARS,
}
_FLAGS = ("presenting", "following")
_CURSOR = {"sop_instance_uid": str, "frame": int, "x": float, "y": float}
_VIEWPORT = {
    "series_uid": str,
    "slice_index": int,
    "window": float,
    "level": float,
    "zoom": float,
    "pan_x": float,
    "pan_y": float,
}


@dataclass(frozen=True)
class Cursor:
    sop_instance_uid: str
    frame: int
    x: float
    y: float


@dataclass(frozen=True)
class Viewport:
    series_uid: str
    slice_index: int
    window: float
    level: float
    zoom: float = 1.0
    pan_x: float = 0.0
    pan_y: float = 0.0


@dataclass(frozen=True)
class Participant:
    client_id: int
    node: str
    name: str
    colour: str
    tool: str
    presenting: bool
    cursor: Cursor | None
    viewport: Viewport | None
    following: bool = False  # their viewport follows the presenter's

    @classmethod
    def from_state(cls, client_id: int, state: Any) -> Participant:
        try:
            cursor = state.get("cursor")
            viewport = state.get("viewport")
            return cls(
                client_id,
                str(state["node"]),
                str(state["name"])[:100],
                str(state["colour"])[:16],
                str(state.get("tool", ""))[:32],
                bool(state.get("presenting", False)),
                Cursor(
                    str(cursor["sop_instance_uid"]),
                    int(cursor["frame"]),
                    float(cursor["x"]),
                    float(cursor["y"]),
                )
                if cursor
                else None,
                Viewport(
                    str(viewport["series_uid"]),
                    int(viewport["slice_index"]),
                    float(viewport["window"]),
                    float(viewport["level"]),
                    float(viewport["zoom"]),
                    float(viewport["pan_x"]),
                    float(viewport["pan_y"]),
                )
                if viewport
                else None,
                bool(state.get("following", False)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MalformedMessage(f"presence state of client {client_id} is malformed") from exc


def _check_fields(what: str, value: Any, shape: dict[str, type]) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or set(value) != set(shape):
        raise MalformedMessage(f"presence {what} has the wrong fields")
    for name, kind in shape.items():
        field_value = value[name]
        if kind is str:
            ok = isinstance(field_value, str) and len(field_value) <= MAX_UID_CHARS
        elif kind is int:
            ok = type(field_value) is int and 0 <= field_value < 2**31
        else:  # finite, and small enough that no difference of two overflows
            ok = type(field_value) in (int, float) and math.isfinite(field_value)
            ok = ok and abs(field_value) <= MAX_NUMBER
        if not ok:
            raise MalformedMessage(f"presence {what} field {name!r} is out of range")


def check_state(state: Any) -> None:
    """Refuse a peer's presence state with unknown fields or fields past their caps
    (names, colours, tools, UIDs, numbers); None (a participant leaving) is fine."""
    if state is None:
        return
    if not isinstance(state, dict):
        raise MalformedMessage("presence state is not an object")
    unknown = set(state) - {*_TEXT_CAPS, *_FLAGS, "cursor", "viewport"}
    if unknown:
        raise MalformedMessage(f"presence state has {len(unknown)} unknown field(s)")
    for name, cap in _TEXT_CAPS.items():
        value = state.get(name, "")
        if not isinstance(value, str) or len(value) > cap:
            raise MalformedMessage(f"presence {name} is not text of at most {cap} characters")
    if any(not isinstance(state.get(flag, False), bool) for flag in _FLAGS):
        raise MalformedMessage("presence flags must be true or false")
    _check_fields("cursor", state.get("cursor"), _CURSOR)
    _check_fields("viewport", state.get("viewport"), _VIEWPORT)


class _ClockedAwareness(pycrdt.Awareness):
    """Awareness that reads the time we give it (milliseconds), never the wall clock."""

    def __init__(self, doc: pycrdt.Doc[Any]) -> None:
        self.now_ms = 0
        super().__init__(doc, outdated_timeout=int(GONE_AFTER_S * 1000))

    def _get_time(self) -> int:
        return self.now_ms


@dataclass(frozen=True)
class PresenceMessage:
    """A y-protocols awareness message: type byte 1, varuint length, awareness update."""

    update: bytes

    def to_wire(self) -> bytes:
        return bytes([AWARENESS_BYTE]) + varuint(len(self.update)) + self.update

    @classmethod
    def from_wire(cls, data: bytes) -> PresenceMessage:
        if len(data) > MAX_PRESENCE_MESSAGE:
            raise MalformedMessage(
                f"presence message is {len(data)} bytes, limit is {MAX_PRESENCE_MESSAGE}"
            )
        if len(data) < 2 or data[0] != AWARENESS_BYTE:
            raise MalformedMessage("not a presence message")
        length, start = read_varuint(data, 1)
        if start + length != len(data):
            raise MalformedMessage("presence message length does not match its payload")
        return cls(data[start:])


class Presence:
    def __init__(
        self, node: str, name: str, colour: str, now: float, client_id: int | None = None
    ) -> None:
        doc: pycrdt.Doc[Any] = (
            pycrdt.Doc(client_id=client_id) if client_id is not None else pycrdt.Doc()
        )
        self._awareness = _ClockedAwareness(doc)
        self._awareness.now_ms = int(now * 1000)
        self.client_id = self._awareness.client_id
        self._dirty = True
        self._last_sent: float | None = None
        self._awareness.set_local_state(
            {
                "node": node,
                "name": name[:MAX_NAME_CHARS],  # peers refuse longer ones (check_state)
                "colour": colour[:MAX_COLOUR_CHARS],
                "tool": "pointer",
                "presenting": False,
            }
        )

    # local changes ------------------------------------------------------------------------
    def _set(self, now: float | None, **fields: Any) -> None:
        if now is not None:
            self._awareness.now_ms = int(now * 1000)
        state = dict(self._awareness.get_local_state() or {})
        state.update(fields)
        self._awareness.set_local_state(state)
        self._dirty = True

    def set_cursor(self, cursor: Cursor | None, now: float) -> None:
        self._set(now, cursor=asdict(cursor) if cursor else None)

    def set_tool(self, tool: str, now: float) -> None:
        self._set(now, tool=tool[:MAX_TOOL_CHARS])

    def set_viewport(self, viewport: Viewport, now: float, *, by_user: bool = True) -> None:
        """``by_user``: the person moved; a follower who moves on their own stops following."""
        if by_user:
            self.following = False
        self._set(now, viewport=asdict(viewport))

    def present(self, on: bool, now: float) -> None:
        self._set(now, presenting=on)
        if on:
            self.following = False

    @property
    def following(self) -> bool:
        """Whether this participant's viewport follows the presenter (others see it too)."""
        return bool((self._awareness.get_local_state() or {}).get("following", False))

    @following.setter
    def following(self, on: bool) -> None:
        if on != self.following:
            self._set(None, following=on)

    def follow(self, now: float) -> None:
        """Follow the presenter: take their viewport now and whenever it changes."""
        self.following = True
        self._catch_up(now)

    @property
    def me(self) -> Participant:
        return Participant.from_state(self.client_id, self._awareness.get_local_state())

    # wire -------------------------------------------------------------------------------
    def poll(self, now: float) -> bytes | None:
        """The message to send now: a coalesced change, or a heartbeat; else None."""
        since = None if self._last_sent is None else now - self._last_sent
        due = since is None or (self._dirty and since >= 1.0 / MAX_RATE_HZ) or since >= HEARTBEAT_S
        if not due:
            return None
        if not self._dirty:
            self._set(now)  # bumps the awareness clock so peers renew our "last seen"
        self._dirty = False
        self._last_sent = now
        return PresenceMessage(self._awareness.encode_awareness_update([self.client_id])).to_wire()

    def leave(self, now: float) -> bytes:
        """The message that tells peers we left (a null state)."""
        self._awareness.now_ms = int(now * 1000)
        self._awareness.set_local_state(None)
        return PresenceMessage(self._awareness.encode_awareness_update([self.client_id])).to_wire()

    def receive(self, data: bytes, now: float) -> None:
        message = PresenceMessage.from_wire(data)
        self._awareness.now_ms = int(now * 1000)
        try:
            self._awareness.apply_awareness_update(message.update, "remote")
        except (IndexError, ValueError, RuntimeError, TypeError, AttributeError) as exc:
            raise MalformedMessage(f"presence update does not parse: {exc}") from exc
        if self.following:
            self._catch_up(now)

    def expire(self, now: float) -> list[int]:
        """Remove peers not heard from for :data:`GONE_AFTER_S`; return their client ids."""
        self._awareness.now_ms = now_ms = int(now * 1000)
        gone = [
            client_id
            for client_id, meta in self._awareness.meta.items()
            if client_id != self.client_id
            and client_id in self._awareness.states
            and now_ms - meta["lastUpdated"] >= GONE_AFTER_S * 1000
        ]
        if gone:
            self._awareness.remove_awareness_states(gone, "timeout")
        return gone

    def participants(self) -> list[Participant]:
        """Everyone present (malformed peer states are left out), me included."""
        found = []
        for client_id, state in self._awareness.states.items():
            try:
                found.append(Participant.from_state(client_id, state))
            except MalformedMessage:
                continue
        return sorted(found, key=lambda p: p.client_id)

    def presenter(self) -> Participant | None:
        presenting = [p for p in self.participants() if p.presenting]
        return presenting[0] if presenting else None

    def _catch_up(self, now: float) -> None:
        presenter = self.presenter()
        if presenter is None or presenter.client_id == self.client_id:
            return
        if presenter.viewport is not None and presenter.viewport != self.me.viewport:
            self.set_viewport(presenter.viewport, now, by_user=False)


__all__ = [
    "GONE_AFTER_S",
    "Cursor",
    "Participant",
    "Presence",
    "PresenceMessage",
    "Viewport",
    "check_state",
]
