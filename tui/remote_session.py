"""A live session of the home's running node, seen from a TUI in another process.

The node runs the session (:class:`~tui.node_facade.LiveSessionView`); the TUI shows it.
One control connection per open session (:class:`node.app.control.Stream`, operation
``tui.session``) carries, after the node's answer::

    TUI                                     node
     | -- ControlRequest(tui.session) ----> |  opens the study's session
     | <- Answer({consult_id, local_node}) - |
     | <- Snapshot(every kind) ------------ |
     | -- Edit(seq, method, args) --------> |  applied in order, on the node's loop
     | <- Result(seq, value | error) ------ |  add_annotation and say only (or an error)
     | <- Snapshot(kinds that changed) ---- |  at most one per PACE, the latest state

The node's sender (:func:`pace`) never queues snapshots: a change only marks the session
dirty, and the sender, once the last frame left (the socket takes it), builds one frame
of what differs from what it sent. A TUI that reads slowly gets fewer, newer frames;
nothing piles up in the node. The TUI answers every read from its last snapshot (no
round trip per repaint) and sends edits without waiting, except the two whose value it
returns; its own cursor and following show at once, before the node echoes them.

Every frame is capped before it is unpacked; one that does not parse, of an unknown
kind, or of a wrong shape closes that connection with the error logged and, on the
TUI's side, shown. The socket is this user's own (:mod:`node.app.control`): the checks
stop a runaway or a mismatched version, not a stranger.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import itertools
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from consult.errors import ConsultError
from consult.presence import Cursor, Participant, Viewport
from consult.shared import Annotation, AnnotationKind, ChatMessage, Point
from node.app.control import Channel, ControlError, Stream
from tui.facade import ActionError
from tui.session import Listener

if TYPE_CHECKING:
    from node.app.runtime import NodeRuntime
    from tui.node_facade import LiveSessionView, RuntimeNode

log = logging.getLogger(__name__)

OPERATION = "tui.session"
PACE = 0.03  # seconds: at most one snapshot per this, as presence itself is paced (30 Hz)
MAX_EDIT = 64 * 1024  # an edit: an annotation or a chat line, far under this
MAX_SNAPSHOT = 24 * 1024 * 1024  # a full state: the shared document (8 MiB) and presence
MAX_SEND_BUFFER = 256 * 1024  # own cursor moves beyond this, unsent, are dropped (superseded)
CALL_TIMEOUT = 30.0  # seconds the UI waits for an edit's value or the session's opening
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
def _cursor_wire(cursor: Cursor | None) -> Any:
    return None if cursor is None else dataclasses.asdict(cursor)


def _viewport_wire(viewport: Viewport | None) -> Any:
    return None if viewport is None else dataclasses.asdict(viewport)


def _participant_wire(p: Participant) -> dict[str, Any]:
    return {
        "client_id": p.client_id, "node": p.node, "name": p.name, "colour": p.colour,
        "tool": p.tool, "presenting": p.presenting, "cursor": _cursor_wire(p.cursor),
        "viewport": _viewport_wire(p.viewport), "following": p.following,
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


# -- the node's side -------------------------------------------------------------------
def state_of(view: LiveSessionView) -> dict[str, Any]:
    return {
        "participants": tuple(view.participants()), "annotations": tuple(view.annotations()),
        "chat": tuple(view.chat()), "report_text": view.report_text(),
        "finalised": view.finalised(), "following": view.following(),
    }  # fmt: skip


async def pace(
    read: Callable[[], dict[str, Any]],
    dirty: asyncio.Event,
    send: Callable[[bytes], Any],
    *,
    period: float = PACE,
) -> None:
    """Send what changed since the last frame, whenever ``dirty`` is set, at most once a
    ``period``; ``send`` waits while the TUI does not read, and changes meanwhile only
    set ``dirty`` again: one frame of the latest state follows, never a queue of them."""
    sent: dict[str, Any] = {}
    while True:
        await dirty.wait()
        dirty.clear()
        state = read()
        changed = {k: v for k, v in state.items() if k not in sent or sent[k] != v}
        if changed:
            sent.update(changed)
            await send(Snapshot(changed).to_wire())
        await asyncio.sleep(period)


def stream(facades: Callable[[NodeRuntime], RuntimeNode]) -> Stream:
    """The ``tui.session`` operation: ``facades(runtime)`` is the node's one RuntimeNode
    for the TUI (shared with ``tui.call``, so sessions open as the node's own TUI would)."""

    async def serve(rt: NodeRuntime, args: dict[str, Any], channel: Channel) -> None:
        from tui.node_facade import LiveSessionView

        study_uid = args.get("study_uid")
        if not isinstance(study_uid, str) or len(study_uid) > 64:
            raise SessionWireError("a live session is opened on a study UID")
        view = facades(rt).open_session(study_uid)
        if not isinstance(view, LiveSessionView):
            raise ControlError("this node opens no live session on that study")
        await channel.answer({"consult_id": view.consult_id, "local_node": view.local_node})
        dirty = asyncio.Event()
        dirty.set()
        unsubscribe = view.subscribe(dirty.set)
        sender = asyncio.ensure_future(pace(lambda: state_of(view), dirty, channel.send))
        try:
            while not sender.done():
                payload = await channel.recv()
                if payload is None:
                    return  # the TUI closed the viewer
                edit = Edit.from_wire(payload)
                apply(view, edit, channel)
                dirty.set()  # own edits change what the TUI reads too
            sender.result()  # the sender failed: say why
        finally:
            unsubscribe()
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            channel.close()

    return Stream(serve, limit=MAX_EDIT)


def apply(view: LiveSessionView, edit: Edit, channel: Channel) -> None:
    """Run one edit on the session; its value (or its error) goes back as a Result."""
    args, kwargs = edit.parsed()
    try:
        value = getattr(view, edit.method)(*args, **kwargs)
    except ConsultError as exc:  # refused by the session (too long a text, finalised)
        channel.write(Result(edit.seq, error=str(exc)).to_wire())
        return
    if edit.method in RETURNS:
        channel.write(Result(edit.seq, value).to_wire())


# -- the TUI's side --------------------------------------------------------------------
def _in_context(context: contextvars.Context, fn: Callable[[], object]) -> None:
    """Run a UI callback in the UI's context (Textual keeps its active app in a contextvar)."""
    context.copy().run(fn)


class RemoteSession:
    """A :class:`~tui.session.SessionView` of a session that runs in the home's node.

    Lives on the client's network loop (``loop``, a thread of its own); called from the
    UI's. Reads answer from the last snapshot; edits are written in order without
    waiting, except :meth:`add_annotation` and :meth:`say` (one round trip on the local
    socket). When the connection ends, reads keep the last state and ``closed`` says why.
    """

    def __init__(
        self,
        opened: Mapping[str, Any],
        channel: Channel,
        loop: asyncio.AbstractEventLoop,
        on_error: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.consult_id = str(opened["consult_id"])
        self.local_node = str(opened["local_node"])
        self._channel, self._loop, self._on_error = channel, loop, on_error
        self._state: dict[str, Any] = {}
        self._first = threading.Event()
        self._seq = itertools.count(1)
        self._waiting: dict[int, concurrent.futures.Future[Any]] = {}
        self._listeners: list[Callable[[], None]] = []
        self._own_cursor: tuple[Cursor | None] | None = None  # set here, not yet echoed
        self._own_following: bool | None = None
        self.closed = ""
        self._task: asyncio.Task[None] | None = None
        self._reader = asyncio.run_coroutine_threadsafe(self._read(), loop)

    def wait_open(self, timeout: float = CALL_TIMEOUT) -> None:
        """Until the first snapshot came (every read answers from it)."""
        if not self._first.wait(timeout):
            raise ActionError("the node did not send the live session in time: open it again")
        if not self._state:
            raise ActionError(f"the live session closed: {self.closed}")

    async def _read(self) -> None:
        self._task = asyncio.current_task()
        try:
            while (payload := await self._channel.recv()) is not None:
                message = decode_from_node(payload)
                if isinstance(message, Snapshot):
                    self._apply(message)
                else:
                    self._result(message)
            self._close("the node closed the live session (it stopped, or closed the session)")
        except (ControlError, ConnectionError) as exc:
            self._close(str(exc))
        except asyncio.CancelledError:
            self._close("the viewer closed")
            raise
        finally:
            self._channel.close()

    def _apply(self, snapshot: Snapshot) -> None:
        state = {**self._state, **snapshot.parts}
        shown = snapshot.parts.get("participants")
        own = self._own_cursor
        if shown and own is not None and shown[0].cursor == own[0]:
            self._own_cursor = None  # the node echoed the last move sent
        if snapshot.parts.get("following", None) == self._own_following:
            self._own_following = None
        self._state = state  # one assignment: a read sees the old or the new state
        self._first.set()
        self._changed()

    def _result(self, result: Result) -> None:
        waiter = self._waiting.pop(result.seq, None)
        if result.error and waiter is not None:
            waiter.set_exception(ActionError(result.error))
        elif result.error:
            self._on_error(f"the live session refused a change: {result.error}")
        elif waiter is not None:
            waiter.set_result(result.value)

    def _close(self, why: str) -> None:
        if self.closed:
            return
        self.closed = why
        for waiter in self._waiting.values():
            waiter.set_exception(ActionError(f"the live session closed: {why}"))
        self._waiting.clear()
        self._first.set()
        self._on_error(f"the live session closed: {why}")
        self._changed()

    def _changed(self) -> None:
        for deliver in list(self._listeners):
            deliver()

    async def aclose(self) -> None:
        """On the network loop: stop reading and close the connection."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # -- reads -------------------------------------------------------------------------
    def participants(self) -> list[Participant]:
        shown = list(self._state.get("participants", ()))
        own = self._own_cursor
        if own is not None and shown:
            shown[0] = dataclasses.replace(shown[0], cursor=own[0])  # the first is this node
        return shown

    def annotations(self) -> list[Annotation]:
        return list(self._state.get("annotations", ()))

    def chat(self) -> list[ChatMessage]:
        return list(self._state.get("chat", ()))

    def report_text(self) -> str:
        return str(self._state.get("report_text", ""))

    def finalised(self) -> bool:
        return bool(self._state.get("finalised", False))

    def following(self) -> bool:
        if self._own_following is not None:
            return self._own_following
        return bool(self._state.get("following", False))

    # -- edits -------------------------------------------------------------------------
    def _send(self, method: str, *args: Any, waits: bool = False) -> Any:
        if self.closed:
            raise ActionError(f"the live session closed: {self.closed}")
        edit = Edit(next(self._seq), method, args)
        frame = edit.to_wire()
        waiter: concurrent.futures.Future[Any] | None = None
        if waits:
            waiter = self._waiting[edit.seq] = concurrent.futures.Future()

        def write() -> None:
            if self._channel.closed:
                return
            if method == "move_cursor" and self._channel.buffered() > MAX_SEND_BUFFER:
                return  # the node is behind: a newer move follows, this one is stale
            self._channel.write(frame)

        self._loop.call_soon_threadsafe(write)
        if waiter is None:
            return None
        try:
            return waiter.result(CALL_TIMEOUT)
        except concurrent.futures.TimeoutError:
            self._waiting.pop(edit.seq, None)
            raise ActionError(
                "the node did not answer within 30 s: it may be stuck; see its log"
            ) from None

    def add_annotation(
        self,
        kind: AnnotationKind,
        sop_instance_uid: str,
        frame: int,
        points: tuple[Point, ...],
        *,
        text: str = "",
        values: Mapping[str, float] | None = None,
    ) -> Annotation:
        wire_points = [[float(x), float(y)] for x, y in points]
        added: Annotation = self._send(
            "add_annotation", kind.value, sop_instance_uid, frame, wire_points, text,
            dict(values or {}), waits=True,
        )  # fmt: skip
        return added

    def remove_annotation(self, annotation_id: str) -> None:
        self._send("remove_annotation", annotation_id)

    def move_cursor(self, cursor: Cursor | None) -> None:
        self._own_cursor = (cursor,)
        self._send("move_cursor", _cursor_wire(cursor))

    def say(self, text: str) -> ChatMessage:
        said: ChatMessage = self._send("say", text, waits=True)
        return said

    def set_report_text(self, text: str) -> None:
        self._send("set_report_text", text)

    def finalise(self, critical: bool = False, drop: frozenset[str] = frozenset()) -> None:
        self._send("finalise", critical, sorted(drop))

    def set_viewport(self, viewport: Viewport, *, by_user: bool = True) -> None:
        if by_user and self.following():
            self._own_following = False  # a move of one's own stops following
            self._changed()
        self._send("set_viewport", _viewport_wire(viewport), by_user)

    def set_tool(self, tool: str) -> None:
        self._send("set_tool", tool)

    def present(self, on: bool) -> None:
        self._send("present", on)

    def follow(self, on: bool) -> None:
        self._own_following = on
        self._send("follow", on)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """``listener`` runs on the subscribing (UI) loop; snapshots that come while one
        delivery waits for the UI are folded into it (the listener reads the whole state)."""
        ui, context = asyncio.get_running_loop(), contextvars.copy_context()
        pending = threading.Event()
        gone = threading.Event()

        def run() -> None:
            pending.clear()
            if not gone.is_set():
                _in_context(context, listener)

        def deliver() -> None:  # on the network loop, or the UI's own (set_viewport)
            if not pending.is_set():
                pending.set()
                with contextlib.suppress(RuntimeError):  # the UI's loop has gone
                    ui.call_soon_threadsafe(run)

        self._listeners.append(deliver)

        def stop() -> None:
            gone.set()
            with contextlib.suppress(ValueError):
                self._listeners.remove(deliver)

        return stop


__all__ = [
    "EDITS",
    "OPERATION",
    "Edit",
    "RemoteSession",
    "Result",
    "SessionWireError",
    "Snapshot",
    "decode_from_node",
    "pace",
    "stream",
]
