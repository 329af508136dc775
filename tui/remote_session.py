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
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from consult.errors import ConsultError, LocalConsultError
from consult.presence import Cursor, Participant, Viewport
from consult.shared import Annotation, AnnotationKind, ChatMessage, Point
from node.app.control import Channel, ControlError, Stream
from tui.facade import ActionError
from tui.session import Listener
from tui.session_wire import (
    MAX_EDIT,
    MAX_SNAPSHOT,
    PRESENCE,
    RETURNS,
    Edit,
    Result,
    SessionWireError,
    Snapshot,
    cursor_wire,
    decode_from_node,
    viewport_wire,
)

if TYPE_CHECKING:
    from node.app.runtime import NodeRuntime
    from tui.node_facade import LiveSessionView, RuntimeNode

log = logging.getLogger(__name__)

OPERATION = "tui.session"
PACE = 0.03  # seconds: at most one snapshot per this, as presence itself is paced (30 Hz)
MAX_SEND_BUFFER = 256 * 1024  # own cursor moves beyond this, unsent, are dropped (superseded)
CALL_TIMEOUT = 30.0  # seconds the UI waits for an edit's value or the session's opening


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
            self._close("the viewer closed it", say=False)
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
            waiter.set_exception(LocalConsultError(result.error))
        elif result.error:
            self._on_error(f"the live session refused a change: {result.error}")
        elif waiter is not None:
            waiter.set_result(result.value)

    def _close(self, why: str, *, say: bool = True) -> None:
        """``say``: show the error (not when this side closed the session)."""
        if self.closed:
            return
        self.closed = why
        for waiter in self._waiting.values():
            waiter.set_exception(LocalConsultError(f"the live session closed: {why}"))
        self._waiting.clear()
        self._first.set()
        if say:
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
        """Write the edit; wait for its value if ``waits`` (LocalConsultError if the node
        refused it, as the session itself would raise). On a closed session an edit that
        waits raises, one the person made is answered with an error, presence is dropped."""
        if self.closed:
            why = f"the live session closed ({self.closed}): nothing was sent"
            if waits:
                raise LocalConsultError(why)
            if method not in PRESENCE:
                self._on_error(why)
            return None
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
            raise LocalConsultError(
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
        self._send("move_cursor", cursor_wire(cursor))

    def say(self, text: str) -> ChatMessage:
        """The message as the session holds it; if it was not sent, the error is shown and
        what comes back is not in the chat (the panel ignores it)."""
        try:
            said: ChatMessage = self._send("say", text, waits=True)
        except LocalConsultError as exc:
            self._on_error(f"the message was not sent: {exc}")
            return ChatMessage("unsent", self.local_node, time.time(), "")
        return said

    def set_report_text(self, text: str) -> None:
        self._send("set_report_text", text)

    def finalise(self, critical: bool = False, drop: frozenset[str] = frozenset()) -> None:
        self._send("finalise", critical, sorted(drop))

    def set_viewport(self, viewport: Viewport, *, by_user: bool = True) -> None:
        if by_user and self.following():
            self._own_following = False  # a move of one's own stops following
            self._changed()
        self._send("set_viewport", viewport_wire(viewport), by_user)

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
            """The viewer closed: with its last listener gone, so is the connection (a
            viewer opened again opens the session again)."""
            gone.set()
            with contextlib.suppress(ValueError):
                self._listeners.remove(deliver)
            if not self._listeners:
                with contextlib.suppress(RuntimeError):  # the network loop has stopped
                    asyncio.run_coroutine_threadsafe(self.aclose(), self._loop)

        return stop


__all__ = ["MAX_EDIT", "MAX_SNAPSHOT", "OPERATION", "RemoteSession", "pace", "stream"]
