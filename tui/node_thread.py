"""The TUI's node on its own event loop, in its own thread (issue 18 item 2).

Textual's loop paints and reads keys; the node's loop runs the transport (aiortc's
pure-Python SCTP, the registry client, transfers, the DICOM listener). On one loop
each waited on the other: a transfer ran about a third slower with the UI busy, and
keystrokes waited behind SCTP. Here they share only the GIL.

:class:`NodeThread` owns the node's loop. :class:`ThreadedNode` is the
:class:`~tui.facade.NodeFacade` the app sees: every call that touches the runtime
runs on the node's loop (the runtime, its databases and the live sessions stay
single-threaded, as they were written): sync reads block the UI for one hop
(``call``), coroutines are awaited through :func:`asyncio.wrap_future`, and what
returns nothing is posted without waiting (``post``; posts and calls keep their order).
:meth:`ThreadedNode.load_frame` does not hop: the viewer runs it on a worker thread
and the store is thread-safe.

The other way: live-session changes reach the UI through the UI loop's
``call_soon_threadsafe`` (coalesced: a burst of peer cursor moves is one repaint), and
an exception no caller awaits on the node's loop (a background task, a posted call)
is shown in the UI as an error. Never ``App.call_from_thread`` from the node's side:
it blocks the node until the UI answers, and the UI may be waiting on the node.

While a node thread runs, the GIL's switch interval is 1 ms (``SWITCH_INTERVAL``), not
Python's 5: the node answers the packets that arrive while the UI paints sooner.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import itertools
import logging
import sys
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, TypeVar

from consult.presence import Cursor, Participant, Viewport
from consult.shared import Annotation, AnnotationKind, ChatMessage, Point
from tui import facade as f
from tui.node_facade import LiveSessionView, RuntimeNode
from tui.session import Listener

log = logging.getLogger(__name__)
T = TypeVar("T")
# call_soon_threadsafe on a closed loop: the other side has gone (its log has the rest).
_closed_ok = contextlib.suppress(RuntimeError)
CALL_TIMEOUT = 30.0  # seconds the UI waits for one answer from the node's loop
STOP_TIMEOUT = 30.0  # seconds to stop the node (its connections close) and join the thread
MAX_EARLY_ERRORS = 20  # errors kept until the UI can show them
# The UI and the node share one GIL: a thread that wants it waits until the holder has run
# this long (Python's default is 5 ms). A packet arriving while the UI paints then waits
# 1 ms, not 5, for the node to answer it; a transfer's pace is that of its acknowledgements
# (issue 18 item 2: with 5 ms, a transfer in the TUI ran at 0.64-0.77 of headless in three
# paired runs, with 1 ms at 0.79-1.09).
SWITCH_INTERVAL = 0.001
_switch = threading.Lock()
_switch_users: list[float] = []  # the interval before the first NodeThread, per running one


class NodeStopped(f.ActionError):
    """The node's loop no longer runs or does not answer; the text says what to do."""


class NodeThread:
    """An event loop on its own thread: start it, run the node's coroutines on it, stop it.

    ``run`` and ``call`` block the calling thread until the node's loop answers; ``post``
    does not wait. Errors nobody awaits go to :meth:`show_errors`'s callback on the UI loop.
    """

    def __init__(self, name: str = "radmesh-node") -> None:
        self._name = name
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._early: deque[str] = deque(maxlen=MAX_EARLY_ERRORS)
        self._show: tuple[asyncio.AbstractEventLoop, Callable[[str], None], Any] | None = None
        self._lock = threading.Lock()
        self._switched = False  # this start() shortened the GIL's switch interval

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise NodeStopped("the node's thread was not started")
        return self._loop

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def start(self) -> NodeThread:
        ready = threading.Event()

        def main() -> None:
            # The loop is made here, by the thread's policy (uvloop when radmesh set it).
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            loop.set_exception_handler(self._on_exception)
            self._loop = loop
            ready.set()
            try:
                loop.run_forever()
            except BaseException as exc:  # a callback raised through the loop itself
                self._surface(f"the node's event loop stopped: {exc!r}")
            finally:
                self._finish(loop)

        self._thread = threading.Thread(target=main, name=self._name, daemon=True)
        with _switch:
            if not self._switched:
                _switch_users.append(sys.getswitchinterval())
                sys.setswitchinterval(min(SWITCH_INTERVAL, _switch_users[0]))
                self._switched = True
        self._thread.start()
        ready.wait(STOP_TIMEOUT)
        return self

    def stop(self) -> None:
        """Stop the loop (what is still running is cancelled and awaited) and join."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            self._unswitch()
            return
        if thread.is_alive():
            if threading.current_thread() is thread:
                raise RuntimeError("NodeThread.stop() from the node's own thread")
            with _closed_ok:
                loop.call_soon_threadsafe(loop.stop)
            thread.join(STOP_TIMEOUT)
            if thread.is_alive():
                log.warning("the node's thread did not stop within %.0f s", STOP_TIMEOUT)
        self._unswitch()

    def _unswitch(self) -> None:
        """The GIL's switch interval as it was, once the last running NodeThread stopped."""
        with _switch:
            if self._switched:
                self._switched = False
                before = _switch_users.pop()
                if not _switch_users:
                    sys.setswitchinterval(before)

    def __enter__(self) -> NodeThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _finish(self, loop: asyncio.AbstractEventLoop) -> None:
        """What asyncio.run does after its coroutine: no task is left to be destroyed
        pending (aiortc's own, a runtime task that outlived stop())."""
        try:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            for task in tasks:
                if not task.cancelled() and task.exception() is not None:
                    failed = {"message": "a node task failed", "exception": task.exception()}
                    self._on_exception(loop, failed)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()

    # -- calls from the UI's thread ---------------------------------------------------------
    def on_node_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the node's loop; block this thread for its result."""
        try:
            future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError as exc:
            coro.close()
            raise NodeStopped("the node has stopped: quit (ctrl+q) and start it again") from exc
        return _result(future, timeout)

    async def arun(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` run on the node's loop, from another loop (the UI's)."""
        try:
            future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError as exc:
            coro.close()
            raise NodeStopped("the node has stopped: quit (ctrl+q) and start it again") from exc
        return await asyncio.wrap_future(future)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the node's loop; block this thread for its result (one hop)."""
        if self.on_node_thread():
            return fn(*args)
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def invoke() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:
                    future.set_exception(exc)

        self._schedule(invoke)
        return _result(future, CALL_TIMEOUT)

    def post(self, fn: Callable[..., object], *args: Any) -> None:
        """``fn(*args)`` on the node's loop, not waited for; an error in it is shown."""

        def invoke() -> None:
            try:
                fn(*args)
            except Exception as exc:
                self._on_exception(self.loop, {"message": f"{_name(fn)} failed", "exception": exc})

        self._schedule(invoke)

    def _schedule(self, invoke: Callable[[], None]) -> None:
        try:
            self.loop.call_soon_threadsafe(invoke)
        except RuntimeError as exc:  # the loop is closed
            raise NodeStopped("the node has stopped: quit (ctrl+q) and start it again") from exc

    # -- errors to the UI ----------------------------------------------------------------
    def show_errors(self, show: Callable[[str], None]) -> None:
        """From now on, call ``show(text)`` on the calling (UI) loop for each error on the
        node's loop that nobody awaits; errors from before are shown now."""
        ui = asyncio.get_running_loop()
        with self._lock:
            self._show = (ui, show, contextvars.copy_context())
            early, self._early = list(self._early), deque(maxlen=MAX_EARLY_ERRORS)
        for text in early:
            show(text)

    def _on_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        loop.default_exception_handler(context)  # the log keeps the traceback
        exc = context.get("exception")
        what = str(context.get("message") or "error")
        self._surface(f"{what}: {type(exc).__name__}: {exc}" if exc is not None else what)

    def _surface(self, text: str) -> None:
        with self._lock:
            target = self._show
            if target is None:
                self._early.append(text)
                return
        ui, show, context = target
        with _closed_ok:  # the UI has gone: the log has the error
            ui.call_soon_threadsafe(_in_context, context, show, text)


def _in_context(context: contextvars.Context, fn: Callable[..., object], *args: Any) -> None:
    """Run a UI callback in the UI's context (Textual keeps its active app in a contextvar);
    a fresh copy each time, so two callbacks never share one entered context."""
    context.copy().run(fn, *args)


def _result(future: concurrent.futures.Future[T], timeout: float | None) -> T:
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError as exc:
        future.cancel()
        raise NodeStopped(
            f"the node did not answer within {timeout:.0f} s: it may be stuck; "
            "quit (ctrl+q) and start it again"
        ) from exc


def _name(fn: Callable[..., object]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


class ThreadedSession:
    """A :class:`~tui.session.SessionView` whose live session runs on the node's loop.

    A repaint reads the session several times (participants for colours, cursors and the
    presenter; annotations; following), each a hop to the node's loop: while someone is
    subscribed, a read is answered from the last one until the session says it changed
    or this side edits it (own cursor moves do not call back), so a repaint costs one hop
    per kind of read at most, and none when nothing changed. Own viewport changes (every
    slice step) are not edits the reads show (:meth:`set_viewport`): scrolling in a
    consult costs the node's loop no read."""

    def __init__(self, view: LiveSessionView, node: NodeThread) -> None:
        self._view, self._node = view, node
        self.consult_id = view.consult_id
        self.local_node = view.local_node
        # Each change takes a new number (next() is atomic): a read cached under an
        # older one is read again. Bumped from both threads, so only uniqueness counts.
        self._versions = itertools.count(1)
        self._version = 0
        self._cache: dict[str, tuple[int, Any]] = {}
        self._watching = 0  # open subscriptions: without one, no change would be heard

    def _changed(self) -> None:
        self._version = next(self._versions)

    def _read(self, name: str, read: Callable[[], T]) -> T:
        version = self._version
        if self._watching:
            hit = self._cache.get(name)
            if hit is not None and hit[0] == version:
                cached: T = hit[1]
                return cached
        value = self._node.call(read)
        self._cache[name] = (version, value)
        return value

    def participants(self) -> list[Participant]:
        return list(self._read("participants", self._view.participants))

    def annotations(self) -> list[Annotation]:
        return list(self._read("annotations", self._view.annotations))

    def chat(self) -> list[ChatMessage]:
        return list(self._read("chat", self._view.chat))

    def report_text(self) -> str:
        return self._read("report_text", self._view.report_text)

    def finalised(self) -> bool:
        return self._read("finalised", self._view.finalised)

    def following(self) -> bool:
        return self._read("following", self._view.following)

    # -- edits: the cache is stale from here; posts and calls keep their order -------------
    def _post(self, fn: Callable[..., object], *args: Any) -> None:
        self._changed()
        self._node.post(fn, *args)

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        self._changed()
        return self._node.call(fn, *args)

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
        def add() -> Annotation:
            return self._view.add_annotation(
                kind, sop_instance_uid, frame, points, text=text, values=values
            )

        return self._call(add)

    def remove_annotation(self, annotation_id: str) -> None:
        self._post(self._view.remove_annotation, annotation_id)

    def move_cursor(self, cursor: Cursor | None) -> None:
        self._post(self._view.move_cursor, cursor)

    def say(self, text: str) -> ChatMessage:
        return self._call(self._view.say, text)

    def set_report_text(self, text: str) -> None:
        self._post(self._view.set_report_text, text)

    def finalise(self, critical: bool = False, drop: frozenset[str] = frozenset()) -> None:
        self._call(self._view.finalise, critical, drop)

    def set_viewport(self, viewport: Viewport, *, by_user: bool = True) -> None:
        """Posted on every slice step. What the reads show stays as it was: the UI reads
        the presenter's viewport, never its own, unless the move stops this side following
        (a move by the user, while following or not known not to): only then are the reads
        asked again (the session also calls back)."""
        known = self._cache.get("following")
        if by_user and (known is None or known[0] != self._version or known[1]):
            self._changed()
        self._node.post(lambda: self._view.set_viewport(viewport, by_user=by_user))

    def set_tool(self, tool: str) -> None:
        self._post(self._view.set_tool, tool)

    def present(self, on: bool) -> None:
        self._post(self._view.present, on)

    def follow(self, on: bool) -> None:
        self._post(self._view.follow, on)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """``listener`` runs on the subscribing (UI) loop; changes that come while one
        delivery waits for the UI are folded into it (the listener reads the whole state)."""
        ui, context = asyncio.get_running_loop(), contextvars.copy_context()
        pending = threading.Event()
        gone = threading.Event()

        def deliver() -> None:
            pending.clear()  # a change from here on asks again
            if not gone.is_set():
                _in_context(context, listener)

        def changed() -> None:  # on the node's loop
            self._changed()
            if not pending.is_set():
                pending.set()
                with _closed_ok:
                    ui.call_soon_threadsafe(deliver)

        unsubscribe = self._node.call(self._view.subscribe, changed)
        self._watching += 1
        self._changed()  # what was cached before anyone listened may be stale

        def stop() -> None:
            if gone.is_set():
                return
            gone.set()
            self._watching -= 1
            with contextlib.suppress(NodeStopped):  # the node stopped first: nothing to undo
                self._node.post(unsubscribe)

        return stop


class ThreadedNode:
    """The :class:`~tui.facade.NodeFacade` of a :class:`RuntimeNode` whose runtime runs on
    ``thread``'s loop: the app's loop stays free for keys and paints."""

    def __init__(self, node: RuntimeNode, thread: NodeThread) -> None:
        self.node, self.thread = node, thread

    def show_errors(self, show: Callable[[str], None]) -> None:
        self.thread.show_errors(show)

    def _async(self, coro: Awaitable[T]) -> Awaitable[T]:
        return self.thread.arun(_coroutine(coro))

    # -- reads: one hop each --------------------------------------------------------------
    def status(self) -> f.NodeStatus:
        return self.thread.call(self.node.status)

    def studies(self) -> list[f.StudyInfo]:
        return self.thread.call(self.node.studies)

    def series(self, study_uid: str) -> list[f.SeriesInfo]:
        return self.thread.call(self.node.series, study_uid)

    def instances(self, series_uid: str) -> list[f.InstanceRef]:
        return self.thread.call(self.node.instances, series_uid)

    def load_frame(self, sop_uid: str, frame: int = 0) -> f.Frame | None:
        return self.node.load_frame(sop_uid, frame)  # a worker thread; the store is safe

    def request_first(self, sop_uid: str) -> None:
        self.thread.post(self.node.request_first, sop_uid)

    def consults(self) -> list[f.ConsultItem]:
        return self.thread.call(self.node.consults)

    def peers(self) -> list[f.PeerInfo]:
        return self.thread.call(self.node.peers)

    def transfers(self) -> list[f.TransferInfo]:
        return self.thread.call(self.node.transfers)

    def notifications(self) -> list[str]:
        return self.thread.call(self.node.notifications)

    def safety_number(self, peer_node_id: str) -> str:
        return self.thread.call(self.node.safety_number, peer_node_id)

    def mark_verified(self, peer_node_id: str) -> None:
        self.thread.call(self.node.mark_verified, peer_node_id)

    def open_session(self, study_uid: str) -> ThreadedSession | None:
        view = self.thread.call(self.node.open_session, study_uid)
        if not isinstance(view, LiveSessionView):
            return None
        return ThreadedSession(view, self.thread)

    def record_view(self, study_uid: str, live: bool) -> None:
        self.thread.post(self.node.record_view, study_uid, live)

    def fetch(self, consult_id: str) -> str:
        return self.thread.call(self.node.fetch, consult_id)

    def pause_transfer(self, consult_id: str) -> str:
        return self.thread.call(self.node.pause_transfer, consult_id)

    def cancel_transfer(self, consult_id: str) -> str:
        return self.thread.call(self.node.cancel_transfer, consult_id)

    def guest_proposals(self) -> list[f.GuestProposal]:
        return self.thread.call(self.node.guest_proposals)

    def critical_alerts(self) -> list[f.CriticalAlert]:
        return self.thread.call(self.node.critical_alerts)

    def report(self, consult_id: str) -> list[f.ReportSection] | None:
        return self.thread.call(self.node.report, consult_id)

    # -- actions: awaited on the UI loop, run on the node's ---------------------------------
    async def respond(self, consult_id: str, accept: bool, reason: str = "") -> str:
        return await self._async(self.node.respond(consult_id, accept, reason))

    async def withdraw(self, consult_id: str) -> str:
        return await self._async(self.node.withdraw(consult_id))

    async def request_consult(self, form: f.ConsultForm) -> str:
        return await self._async(self.node.request_consult(form))

    async def cycle_availability(self) -> str:
        return await self._async(self.node.cycle_availability())

    async def propose_guest(self, consult_id: str, peer_node_id: str) -> str:
        return await self._async(self.node.propose_guest(consult_id, peer_node_id))

    async def answer_guest(self, consult_id: str, guest_node_id: str, approve: bool) -> str:
        return await self._async(self.node.answer_guest(consult_id, guest_node_id, approve))

    async def acknowledge(self, consult_id: str, by: str) -> str:
        return await self._async(self.node.acknowledge(consult_id, by))

    async def add_addendum(self, consult_id: str, text: str) -> str:
        return await self._async(self.node.add_addendum(consult_id, text))


async def _coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable
