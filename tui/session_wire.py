"""The live-session protocol between a TUI and the node it is attached to (sans-IO).

Messages are frozen dataclasses with ``to_wire`` / ``from_wire`` (msgpack); the values
are consult's own types, checked as the session protocol checks a peer's (their
``from_py`` / ``from_state``). A frame's size is capped by the connection before any of
it is read (:class:`node.app.control.Channel`); what does not parse, has an unknown
kind or a wrong shape raises :class:`SessionWireError` and the connection closes.
:mod:`tui.remote_session` runs it on both ends.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from consult.errors import ConsultError
from consult.presence import Cursor, Participant, Viewport
from consult.shared import Annotation, AnnotationKind, ChatMessage
from node.app.control import ControlError

MAX_EDIT = 64 * 1024  # an edit: an annotation or a chat line, far under this
MAX_SNAPSHOT = 24 * 1024 * 1024  # a full state: the shared document (8 MiB) and presence
KINDS = ("participants", "annotations", "chat", "report_text", "finalised", "following")


class SessionWireError(ControlError):
    """A session frame that does not parse or has the wrong shape: the connection closes."""


def _pack(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def _unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, TypeError) as exc:
        raise SessionWireError(f"a live-session frame does not parse: {exc}") from exc


# -- values ----------------------------------------------------------------------------
def cursor_wire(cursor: Cursor | None) -> Any:
    return None if cursor is None else dataclasses.asdict(cursor)


def viewport_wire(viewport: Viewport | None) -> Any:
    return None if viewport is None else dataclasses.asdict(viewport)


def _participant_wire(p: Participant) -> dict[str, Any]:
    return {
        "client_id": p.client_id, "node": p.node, "name": p.name, "colour": p.colour,
        "tool": p.tool, "presenting": p.presenting, "cursor": cursor_wire(p.cursor),
        "viewport": viewport_wire(p.viewport), "following": p.following,
    }  # fmt: skip


def _parse_cursor(raw: Any) -> Cursor | None:
    if raw is None:
        return None
    state = {"node": "", "name": "", "colour": "", "cursor": raw}
    cursor = Participant.from_state(0, state).cursor  # the presence protocol's own checks
    if cursor is None:
        raise TypeError("cursor")
    return cursor


def _parse_viewport(raw: Any) -> Viewport:
    viewport = Participant.from_state(0, {"node": "", "name": "", "colour": "", "viewport": raw})
    if viewport.viewport is None:
        raise TypeError("viewport")
    return viewport.viewport


def _parse_participant(raw: Any) -> Participant:
    if not isinstance(raw, dict) or not isinstance(raw.get("client_id"), int):
        raise TypeError("participant")
    return Participant.from_state(raw["client_id"], raw)


def _annotation_wire(a: Annotation) -> list[Any]:
    return [a.id, a.to_py()]


def _parse_annotation(raw: Any) -> Annotation:
    if not (isinstance(raw, list) and len(raw) == 2 and isinstance(raw[0], str)):
        raise TypeError("annotation")
    return Annotation.from_py(raw[0], raw[1])


def _listed(raw: Any, parse: Callable[[Any], Any]) -> tuple[Any, ...]:
    if not isinstance(raw, list):
        raise TypeError("a list")
    return tuple(parse(item) for item in raw)


def _typed(kind: type) -> Callable[[Any], Any]:
    def parse(raw: Any) -> Any:
        if type(raw) is not kind:
            raise TypeError(kind.__name__)
        return raw

    return parse


# -- node -> TUI -----------------------------------------------------------------------
_WIRE: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {
    "participants": (lambda v: [_participant_wire(p) for p in v],
                     lambda raw: _listed(raw, _parse_participant)),
    "annotations": (lambda v: [_annotation_wire(a) for a in v],
                    lambda raw: _listed(raw, _parse_annotation)),
    "chat": (lambda v: [m.to_py() for m in v], lambda raw: _listed(raw, ChatMessage.from_py)),
    "report_text": (lambda v: v, _typed(str)),
    "finalised": (lambda v: v, _typed(bool)),
    "following": (lambda v: v, _typed(bool)),
}  # fmt: skip


@dataclass(frozen=True)
class Snapshot:
    """The kinds of the session's state that changed (all of them in the first one)."""

    parts: Mapping[str, Any]  # kind (one of KINDS) -> its value, as SessionView reads it

    def to_wire(self) -> bytes:
        return _pack({"snapshot": {k: _WIRE[k][0](v) for k, v in self.parts.items()}})


@dataclass(frozen=True)
class Result:
    """What an edit that returns a value gave (an Annotation, a ChatMessage), or why it
    failed (any edit), for the edit numbered ``seq``."""

    seq: int
    value: Annotation | ChatMessage | None = None
    error: str = ""

    def to_wire(self) -> bytes:
        raw: dict[str, Any] = {"result": self.seq}
        if isinstance(self.value, Annotation):
            raw["annotation"] = _annotation_wire(self.value)
        elif isinstance(self.value, ChatMessage):
            raw["chat"] = self.value.to_py()
        if self.error:
            raw["error"] = self.error
        return _pack(raw)


def decode_from_node(data: bytes) -> Snapshot | Result:
    """A frame the node sent (its payload, already capped) -> what it says."""
    raw = _unpack(data)
    try:
        if isinstance(raw, dict) and set(raw) == {"snapshot"} and isinstance(raw["snapshot"], dict):
            parts = raw["snapshot"]
            if not set(parts) <= set(KINDS):
                raise TypeError(f"unknown kinds {sorted(set(parts) - set(KINDS))}")
            return Snapshot({k: _WIRE[k][1](v) for k, v in parts.items()})
        if isinstance(raw, dict) and type(raw.get("result")) is int:
            if not set(raw) <= {"result", "annotation", "chat", "error"}:
                raise TypeError("unknown fields in a result")
            value: Annotation | ChatMessage | None = None
            if "annotation" in raw:
                value = _parse_annotation(raw["annotation"])
            elif "chat" in raw:
                value = ChatMessage.from_py(raw["chat"])
            return Result(raw["result"], value, _typed(str)(raw.get("error", "")))
    except (TypeError, ValueError, KeyError, ConsultError) as exc:
        raise SessionWireError(f"the node sent a malformed live-session frame: {exc}") from exc
    raise SessionWireError("the node sent a live-session frame of an unknown kind")


# -- TUI -> node -----------------------------------------------------------------------
Parsed = tuple[tuple[Any, ...], dict[str, Any]]  # positional and keyword arguments


def _args_add_annotation(raw: list[Any]) -> Parsed:
    kind, sop, frame, points, text, values = raw
    parsed = tuple((float(p[0]), float(p[1])) for p in _listed(points, _typed(list)))
    if not isinstance(values, dict):
        raise TypeError("values")
    named = {_typed(str)(k): float(v) for k, v in values.items()}
    return (
        (AnnotationKind(kind), _typed(str)(sop), _typed(int)(frame), parsed),
        {"text": _typed(str)(text), "values": named},
    )


def _args_finalise(raw: list[Any]) -> Parsed:
    critical, drop = raw
    return (_typed(bool)(critical), frozenset(_listed(drop, _typed(str)))), {}


def _args_viewport(raw: list[Any]) -> Parsed:
    viewport, by_user = raw
    return (_parse_viewport(viewport),), {"by_user": _typed(bool)(by_user)}


def _one(
    parse: Callable[[Any], Any],
) -> Callable[[list[Any]], tuple[tuple[Any, ...], dict[str, Any]]]:
    def args(raw: list[Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        (value,) = raw
        return (parse(value),), {}

    return args


# What a TUI may do to a session: SessionView's edits, each with its arguments' parser.
EDITS: dict[str, Callable[[list[Any]], Parsed]] = {
    "add_annotation": _args_add_annotation,
    "remove_annotation": _one(_typed(str)),
    "move_cursor": _one(_parse_cursor),
    "say": _one(_typed(str)),
    "set_report_text": _one(_typed(str)),
    "finalise": _args_finalise,
    "set_viewport": _args_viewport,
    "set_tool": _one(_typed(str)),
    "present": _one(_typed(bool)),
    "follow": _one(_typed(bool)),
}
RETURNS = frozenset({"add_annotation", "say"})  # the edits whose value the TUI waits for
# Edits that only say where this participant is: dropped unsaid once the session closed.
PRESENCE = frozenset({"move_cursor", "set_viewport", "set_tool", "present", "follow"})


@dataclass(frozen=True)
class Edit:
    """One change the TUI makes, numbered in the order it was made."""

    seq: int
    method: str
    args: tuple[Any, ...]  # msgpack-plain, as EDITS parses them

    def to_wire(self) -> bytes:
        return _pack({"edit": self.method, "seq": self.seq, "args": list(self.args)})

    @classmethod
    def from_wire(cls, data: bytes) -> Edit:
        raw = _unpack(data)
        if not (
            isinstance(raw, dict)
            and set(raw) == {"edit", "seq", "args"}
            and isinstance(raw["edit"], str)
            and raw["edit"] in EDITS
            and type(raw["seq"]) is int
            and isinstance(raw["args"], list)
        ):
            raise SessionWireError("the TUI sent a live-session frame of an unknown kind")
        return cls(raw["seq"], raw["edit"], tuple(raw["args"]))

    def parsed(self) -> Parsed:
        try:
            return EDITS[self.method](list(self.args))
        except (TypeError, ValueError, KeyError, IndexError, ConsultError) as exc:
            raise SessionWireError(f"the TUI's {self.method} edit is malformed: {exc}") from exc


__all__ = [
    "EDITS",
    "KINDS",
    "MAX_EDIT",
    "MAX_SNAPSHOT",
    "PRESENCE",
    "RETURNS",
    "Edit",
    "Result",
    "SessionWireError",
    "Snapshot",
    "cursor_wire",
    "decode_from_node",
    "viewport_wire",
]
