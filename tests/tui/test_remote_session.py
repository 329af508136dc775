"""Live sessions of a node in another process (tui.remote_session): the wire, the node's
pacing, and the whole path through a real `radmesh node run` child and a real peer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pydicom
import pytest

from consult.errors import LocalConsultError
from consult.presence import Cursor, Participant, Viewport
from consult.shared import MAX_CHAT_CHARS, MAX_LABEL_CHARS, AnnotationKind
from node.app.runtime import NodeRuntime
from node.cli.node import with_tui_operation
from node.cli.tui import NodeChild
from node.core.config import NetworkConfig, NodeConfig, NodeHome
from node.core.keystore import load_identity
from tests.consult.test_live import FAST, start_node, wait_for
from tests.node.test_runtime import new_home
from tests.ports import free_port
from tests.tui.pilots import open_viewer, svg_text
from tests.tui.test_node_facade import SIZE, import_ct
from tui.app import RadmeshApp
from tui.facade import ActionError
from tui.remote import RemoteNode
from tui.remote_session import RemoteSession, pace
from tui.session_wire import Edit, Result, SessionWireError, Snapshot, decode_from_node


def test_a_snapshot_and_a_result_cross_the_wire_and_come_back_equal() -> None:
    me = Participant(7, "node-a", "Ana", "#ff0000", "length", True, Cursor("2.25.9", 0, 1.5, 2.5),
                     Viewport("2.25.8", 3, 40.0, 80.0, 2.0, 1.0, -1.0), following=True)  # fmt: skip
    parts = {"participants": (me,), "report_text": "Impression: none", "finalised": False}
    back = decode_from_node(Snapshot(parts).to_wire())
    assert back == Snapshot(parts)
    assert decode_from_node(Result(3, error="too long").to_wire()) == Result(3, None, "too long")


def test_the_session_frames_bytes_are_pinned() -> None:
    """A change to the wire shows here (msgpack maps, field names as the codec writes them)."""
    # {"edit": "say", "seq": 1, "args": ["hi"]}
    edit = "83 a4 65646974 a3 736179 a3 736571 01 a4 61726773 91 a2 6869"
    # {"result": 2, "error": "no"}
    result = "82 a6 726573756c74 02 a5 6572726f72 a2 6e6f"
    # {"snapshot": {"report_text": "x", "finalised": true}}
    snapshot = "81 a8 736e617073686f74 82 ab 7265706f72745f74657874 a1 78 a9 66696e616c69736564 c3"
    assert Edit(1, "say", ("hi",)).to_wire() == bytes.fromhex(edit)
    assert Result(2, error="no").to_wire() == bytes.fromhex(result)
    parts = {"report_text": "x", "finalised": True}
    assert Snapshot(parts).to_wire() == bytes.fromhex(snapshot)
    assert Edit.from_wire(bytes.fromhex(edit)) == Edit(1, "say", ("hi",))
    assert decode_from_node(bytes.fromhex(snapshot)) == Snapshot(parts)


def test_an_edit_is_refused_by_name_or_shape() -> None:
    edit = Edit(1, "move_cursor", ({"sop_instance_uid": "2.25.9", "frame": 0, "x": 1.0, "y": 2.0},))
    assert Edit.from_wire(edit.to_wire()).parsed() == ((Cursor("2.25.9", 0, 1.0, 2.0),), {})
    with pytest.raises(SessionWireError, match="unknown kind"):
        Edit.from_wire(Edit(2, "_finalise", ()).to_wire())
    with pytest.raises(SessionWireError, match="say edit is malformed"):
        Edit.from_wire(Edit(3, "say", (42,)).to_wire()).parsed()
    with pytest.raises(SessionWireError, match="unknown kind"):
        decode_from_node(b"\x81\xa5other\x01")  # {"other": 1}


async def test_a_slow_tui_gets_one_frame_of_the_latest_state_not_a_queue() -> None:
    """While the TUI does not read (the node's send waits), a thousand changes are one
    frame of the newest state once it reads again."""
    state = {"report_text": "0"}
    dirty = asyncio.Event()
    dirty.set()
    sent: list[Snapshot] = []
    reading = asyncio.Event()

    async def send(frame: bytes) -> None:
        snapshot = decode_from_node(frame)
        assert isinstance(snapshot, Snapshot)
        sent.append(snapshot)
        await reading.wait()  # the TUI takes nothing until the test lets it

    sender = asyncio.ensure_future(pace(lambda: dict(state), dirty, send, period=0))
    try:
        await wait_for(lambda: len(sent) == 1)
        for n in range(1, 1001):
            state["report_text"] = str(n)
            dirty.set()
            await asyncio.sleep(0)
        assert len(sent) == 1  # nothing was built while the send waited
        reading.set()
        await wait_for(lambda: len(sent) == 2)
        assert sent[1].parts == {"report_text": "1000"}
        dirty.set()  # a change that changes nothing sends nothing: the canary follows it
        state["report_text"] = "canary"
        dirty.set()
        await wait_for(lambda: len(sent) == 3)
        assert [s.parts["report_text"] for s in sent] == ["0", "1000", "canary"]
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)


@pytest.fixture
async def child_and_peer(
    tmp_path: Path,
) -> AsyncIterator[tuple[NodeHome, NodeChild, NodeRuntime, list[Path]]]:
    """ana's node in its own process (`radmesh node run`, a CT in its store) and ben's in
    this one, each knowing and trusting the other."""
    ben = await start_node(tmp_path, "ben")
    home, identity = new_home(tmp_path, "ana")
    network = NetworkConfig(mdns=False, listen_host="127.0.0.1", listen_port=free_port())
    home.save_config(NodeConfig(display_name="ana", network=network))
    setup = NodeRuntime(home, identity, transport_options=FAST)  # before the child: same port
    await setup.start()
    try:
        paths = import_ct(setup, tmp_path)
        assert ben.record is not None
        assert setup.record is not None
        setup.directory.remember(ben.record, "test", setup.now())
        setup.trust.mark_verified(ben.identity.node_id, setup.now())
        ben.directory.remember(setup.record, "test", ben.now())
        ben.trust.mark_verified(identity.node_id, ben.now())
    finally:
        await setup.stop()
    argv = ["--home", str(home.root), "node", "run", "--no-mdns"]
    child = await asyncio.to_thread(NodeChild.start, home, argv)
    try:
        yield home, child, ben, paths
    finally:
        await asyncio.to_thread(child.stop)
        await ben.stop()


@pytest.mark.slow
async def test_a_peers_cursor_and_chat_reach_the_attached_viewer_and_its_marks_go_back(
    child_and_peer: tuple[NodeHome, NodeChild, NodeRuntime, list[Path]],
) -> None:
    home, child, ben, paths = child_and_peer
    anas = load_identity(home.key_path).public_key
    sop = str(pydicom.dcmread(paths[0]).SOPInstanceUID)
    study = str(pydicom.dcmread(paths[0]).StudyInstanceUID)
    consult = "board" * 6 + "xy"
    theirs = ben.live_hub().open(consult, "tumour board", study)
    await ben.live_hub().invite(consult, anas)
    await wait_for(lambda: len(theirs.participants()) == 2, within=30)  # ana's node joined

    node = RemoteNode(home, stopped=child.exited)
    try:
        app = RadmeshApp(node)
        async with app.run_test(size=SIZE) as pilot:
            screen = await open_viewer(pilot, node)
            session = screen.session
            assert isinstance(session, RemoteSession)
            assert session.consult_id == consult

            theirs.say("see the crescent on the left")
            theirs.move_cursor(Cursor(sop, 0, 30.0, 20.0))
            await wait_for(
                lambda: any(p.cursor == Cursor(sop, 0, 30.0, 20.0) for p in session.participants())
            )
            await wait_for(lambda: "see the crescent on the left" in svg_text(app))
            assert "ben" in svg_text(app)

            mine = Cursor(sop, 0, 5.0, 6.0)
            session.move_cursor(mine)
            assert session.participants()[0].cursor == mine  # at once, no round trip
            added = await asyncio.to_thread(
                session.add_annotation, AnnotationKind.POINT, sop, 0, ((12.0, 14.0),), text="here"
            )
            await wait_for(lambda: added.id in {a.id for a in theirs.annotations()})
            await wait_for(lambda: any(p.cursor == mine for p in theirs.participants()))
            said = await asyncio.to_thread(session.say, "agreed, subdural")
            await wait_for(lambda: said.id in {m.id for m in theirs.chat()})
            await wait_for(lambda: said.id in {m.id for m in session.chat()})
    finally:
        node.close()


@pytest.mark.slow
async def test_a_child_that_dies_closes_the_live_session_with_what_to_do(
    child_and_peer: tuple[NodeHome, NodeChild, NodeRuntime, list[Path]],
) -> None:
    home, child, _, paths = child_and_peer
    study = str(pydicom.dcmread(paths[0]).StudyInstanceUID)
    node = RemoteNode(home, stopped=child.exited)
    shown: list[str] = []
    try:
        node.show_errors(shown.append)
        session = await asyncio.to_thread(node.open_session, study)  # an ad-hoc session
        assert isinstance(session, RemoteSession)
        child.process.kill()
        await wait_for(lambda: bool(session.closed))
        await wait_for(lambda: any("live session closed" in s for s in shown))
        with pytest.raises(ActionError, match=r"exited with code -9.*ctrl\+q"):
            await asyncio.to_thread(node.fetch, "0" * 32)
    finally:
        node.close()


@pytest.fixture
async def attachable(tmp_path: Path) -> AsyncIterator[NodeRuntime]:
    """A node in this process that serves the TUI's operations (as `radmesh node run`)."""
    home, identity = new_home(tmp_path, "cai")
    runtime = NodeRuntime(
        home, identity, transport_options=FAST, control=True, operations=with_tui_operation()
    )
    await runtime.start()
    yield runtime
    await runtime.stop()


async def test_the_viewer_closing_closes_its_session_connection(attachable: NodeRuntime) -> None:
    control = attachable.control
    assert control is not None
    node = RemoteNode(attachable.home)
    try:
        session = await asyncio.to_thread(node.open_session, "2.25.77")
        assert isinstance(session, RemoteSession)
        assert len(control.streams) == 1
        stop = session.subscribe(lambda: None)  # the viewer on screen
        session.set_report_text("Impression: normal")
        await wait_for(lambda: session.report_text() == "Impression: normal")  # the echo
        stop()  # the viewer closed
        await wait_for(lambda: not control.streams)  # the node let it go
        assert session.closed
        notes = await asyncio.to_thread(node.notifications)
        assert not any("closed" in n for n in notes)  # not an error
    finally:
        await asyncio.to_thread(node.close)


async def test_an_edit_the_session_refuses_is_the_sessions_error(attachable: NodeRuntime) -> None:
    node = RemoteNode(attachable.home)
    try:
        session = await asyncio.to_thread(node.open_session, "2.25.78")
        assert isinstance(session, RemoteSession)
        with pytest.raises(LocalConsultError, match="limited to"):
            await asyncio.to_thread(
                session.add_annotation, AnnotationKind.POINT, "2.25.9", 0, ((1.0, 2.0),),
                text="x" * (MAX_LABEL_CHARS + 1),
            )  # fmt: skip
        unsent = await asyncio.to_thread(session.say, "y" * (MAX_CHAT_CHARS + 1))
        assert unsent.text == ""  # not sent, and said so
        notes = await asyncio.to_thread(node.notifications)
        assert any("was not sent" in n for n in notes)
        said = await asyncio.to_thread(session.say, "canary")  # the connection stayed up
        assert said.text == "canary"
    finally:
        await asyncio.to_thread(node.close)
