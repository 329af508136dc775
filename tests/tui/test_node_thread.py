"""The TUI's node on its own loop and thread (tui.node_thread): the UI loop stays the UI's,
node-side changes come back on the UI thread, errors there are shown, shutdown is clean."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from pathlib import Path

import pydicom
import pytest

from consult.presence import Cursor
from tests.consult.test_live import start_node, wait_for
from tests.tui.pilots import open_viewer, svg_text
from tests.tui.test_node_facade import SIZE, import_ct
from tui.app import RadmeshApp
from tui.node_facade import RuntimeNode
from tui.node_thread import (
    SWITCH_INTERVAL,
    NodeStopped,
    NodeThread,
    ThreadedNode,
    ThreadedSession,
)


@pytest.fixture
def node_thread() -> Iterator[NodeThread]:
    with NodeThread() as thread:
        yield thread
    assert thread.thread is not None
    assert not thread.thread.is_alive()


@pytest.fixture
async def threaded(tmp_path: Path, node_thread: NodeThread) -> AsyncIterator[ThreadedNode]:
    runtime = await node_thread.arun(start_node(tmp_path, "ana"))
    yield ThreadedNode(RuntimeNode(runtime), node_thread)
    await node_thread.arun(runtime.stop())


def notes(app: RadmeshApp) -> list[tuple[str, str]]:
    return [(n.message, n.severity) for n in app._notifications]


async def test_the_node_runs_on_its_own_loop_and_thread_not_the_apps(
    threaded: ThreadedNode,
) -> None:
    runtime = threaded.node.runtime
    app = RadmeshApp(threaded)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        ui_loop, ui_thread = asyncio.get_running_loop(), threading.current_thread()
        assert str(runtime.identity.node_id)[:7] in svg_text(app)  # status() came through
        seen: list[tuple[asyncio.AbstractEventLoop, threading.Thread]] = []
        status = threaded.node.status

        def status_seen_from_the_node():  # type: ignore[no-untyped-def]
            seen.append((asyncio.get_running_loop(), threading.current_thread()))
            return status()

        threaded.node.status = status_seen_from_the_node  # type: ignore[method-assign]
        assert threaded.status().node_id == str(runtime.identity.node_id)
        [(loop, thread)] = seen
        assert loop is threaded.thread.loop
        assert loop is not ui_loop
        assert thread is threaded.thread.thread
        assert thread is not ui_thread
        # the runtime's own background tasks live on the node's loop too
        tasks = threaded.thread.call(lambda: set(runtime._tasks))
        assert tasks
        assert all(task.get_loop() is loop for task in tasks)


async def test_a_peers_cursor_and_chat_reach_the_viewer_on_the_ui_thread(
    threaded: ThreadedNode, tmp_path: Path
) -> None:
    """The live session runs on the node's loop, the peer on a third: its cursor and chat
    reach the viewer, each change delivered on the UI's thread, and what the TUI types
    goes back to the peer."""
    node_thread, runtime = threaded.thread, threaded.node.runtime
    paths = node_thread.call(import_ct, runtime, tmp_path)
    with NodeThread("peer") as peer_thread:
        remote = await peer_thread.arun(start_node(tmp_path, "ben"))
        try:
            for a, b, on in ((runtime, remote, node_thread), (remote, runtime, peer_thread)):
                assert b.record is not None
                on.call(a.directory.remember, b.record, "test", a.now())
                on.call(a.trust.mark_verified, b.identity.node_id, a.now())
            app = RadmeshApp(threaded)
            async with app.run_test(size=SIZE) as pilot:
                screen = await open_viewer(pilot, threaded)
                session = screen.session
                assert isinstance(session, ThreadedSession)
                delivered: list[threading.Thread] = []
                session.subscribe(lambda: delivered.append(threading.current_thread()))
                hub = runtime.live_hub
                await node_thread.arun(hub().invite(session.consult_id, remote.identity.public_key))
                theirs = peer_thread.call(lambda: remote.live_hub().sessions[session.consult_id])

                sop = str(pydicom.dcmread(paths[0]).SOPInstanceUID)
                peer_thread.call(theirs.say, "see the crescent on the left")
                peer_thread.call(theirs.move_cursor, Cursor(sop, 0, 30.0, 20.0))
                await wait_for(
                    lambda: any(
                        p.cursor == Cursor(sop, 0, 30.0, 20.0) for p in session.participants()
                    )
                )
                await wait_for(lambda: "see the crescent on the left" in svg_text(app))
                assert "ben" in svg_text(app)
                assert delivered
                assert set(delivered) == {threading.current_thread()}

                session.say("agreed, subdural")
                await wait_for(
                    lambda: (
                        peer_thread.call(lambda: [m.text for m in theirs.chat()][-1:])
                        == ["agreed, subdural"]
                    )
                )
        finally:
            await peer_thread.arun(remote.stop())


async def test_an_error_on_the_node_thread_is_shown_in_the_app(threaded: ThreadedNode) -> None:
    node_thread = threaded.thread

    def boom() -> None:
        raise RuntimeError("canary from a node callback")

    async def failing() -> None:
        raise RuntimeError("canary from a node task")

    early = "canary from before the app"
    node_thread.post(_raise, early)
    node_thread.call(lambda: None)  # the post above ran: nobody could show it yet
    app = RadmeshApp(threaded)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        node_thread.loop.call_soon_threadsafe(boom)  # a bare callback on the node's loop
        runtime = threaded.node.runtime
        node_thread.post(runtime.spawn, failing())  # a background task nobody awaits
        for canary in (early, "canary from a node callback", "canary from a node task"):
            await wait_for(partial(shown_as_error, app, canary))
        # a call the UI waits for raises in the UI, as on one loop
        with pytest.raises(RuntimeError, match="canary from a node callback"):
            node_thread.call(boom)


def shown_as_error(app: RadmeshApp, text: str) -> bool:
    return any(text in message and severity == "error" for message, severity in notes(app))


def _raise(text: str) -> None:
    raise RuntimeError(text)


def test_stopping_cancels_what_still_runs_and_joins_the_thread(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    thread = NodeThread().start()

    async def forever() -> None:
        await asyncio.sleep(3600)

    task = thread.call(lambda: asyncio.ensure_future(forever()))  # left running, as aiortc's
    thread.stop()
    assert thread.thread is not None
    assert not thread.thread.is_alive()
    assert thread.loop.is_closed()
    assert task.cancelled()
    assert "Task was destroyed" not in caplog.text
    with pytest.raises(NodeStopped, match="the node has stopped"):
        thread.call(lambda: None)


class CountingView:
    """A LiveSessionView stand-in on the node's loop: counts reads, fires changes."""

    consult_id = "c" * 32
    local_node = "me"

    def __init__(self) -> None:
        self.reads = 0
        self.cursor: Cursor | None = None
        self.chat_lines: list[str] = []
        self.listeners: list[Callable[[], None]] = []

    def participants(self) -> list[Cursor | None]:
        self.reads += 1
        return [self.cursor]

    def move_cursor(self, cursor: Cursor | None) -> None:
        self.cursor = cursor  # a live session does not call back for own moves

    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]:
        self.listeners.append(listener)
        return lambda: self.listeners.remove(listener)

    def peer_moved(self, cursor: Cursor) -> None:
        self.cursor = cursor
        for listener in list(self.listeners):
            listener()


async def test_session_reads_are_cached_until_the_session_or_the_ui_changes_it(
    node_thread: NodeThread,
) -> None:
    view = CountingView()
    session = ThreadedSession(view, node_thread)  # type: ignore[arg-type]
    delivered = asyncio.Event()
    stop = session.subscribe(delivered.set)
    assert session.participants() == [None]
    assert session.participants() == [None]
    assert view.reads == 1  # the second read cost no hop

    theirs = Cursor("2.25.1", 0, 1.0, 2.0)
    node_thread.call(view.peer_moved, theirs)  # a change on the node's side
    assert session.participants() == [theirs]  # type: ignore[comparison-overlap]
    assert view.reads == 2
    await asyncio.wait_for(delivered.wait(), 10)

    mine = Cursor("2.25.1", 0, 5.0, 6.0)
    session.move_cursor(mine)  # posted; the read after it goes after it, and is not cached
    assert session.participants() == [mine]  # type: ignore[comparison-overlap]
    assert view.reads == 3

    stop()
    node_thread.call(lambda: None)  # the unsubscribe went before this
    assert view.listeners == []
    session.participants()
    session.participants()
    assert view.reads == 5  # nobody listens for changes: every read asks the node


class ViewportView(CountingView):
    """With viewports and following, as LiveSessionView has them."""

    def __init__(self) -> None:
        super().__init__()
        self.viewports: list[object] = []
        self.follows = False

    def set_viewport(self, viewport: object, *, by_user: bool = True) -> None:
        self.viewports.append(viewport)
        if by_user and self.follows:
            self.follows = False  # a move of one's own stops following: the session says so
            for listener in list(self.listeners):
                listener()

    def following(self) -> bool:
        return self.follows


async def test_own_slice_steps_cost_the_node_no_read_unless_they_stop_following(
    node_thread: NodeThread,
) -> None:
    view = ViewportView()
    session = ThreadedSession(view, node_thread)  # type: ignore[arg-type]
    changed = asyncio.Event()
    stop = session.subscribe(changed.set)
    assert session.following() is False
    session.participants()
    reads = view.reads
    for index in range(5):  # five slice steps, each telling the session where we are
        session.set_viewport(index, by_user=True)  # type: ignore[arg-type]
        session.participants()
        assert session.following() is False
    assert node_thread.call(lambda: list(view.viewports)) == [0, 1, 2, 3, 4]  # all went out
    assert view.reads == reads  # and no read was asked for again

    node_thread.call(lambda: setattr(view, "follows", True))
    node_thread.call(view.peer_moved, Cursor("2.25.1", 0, 1.0, 2.0))  # a change: read again
    await asyncio.wait_for(changed.wait(), 10)
    assert session.following() is True
    session.set_viewport(5, by_user=True)  # type: ignore[arg-type]
    assert session.following() is False  # read again after the move: it stopped following
    stop()


def test_the_gil_is_handed_over_sooner_while_a_node_thread_runs() -> None:
    before = sys.getswitchinterval()
    first, second = NodeThread("one"), NodeThread("two")
    try:
        first.start()
        assert sys.getswitchinterval() == pytest.approx(min(before, SWITCH_INTERVAL))
        second.start()
        first.stop()  # another still runs: still short
        assert sys.getswitchinterval() == pytest.approx(min(before, SWITCH_INTERVAL))
    finally:
        first.stop()
        second.stop()
    assert sys.getswitchinterval() == before  # as it was once none runs
    second.stop()  # stopping again changes nothing
    assert sys.getswitchinterval() == before
