"""Viewer: follow-the-presenter over two live sessions, picking annotations with the mouse,
multi-frame instances."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from textual.pilot import Pilot

from consult.live import LiveConsult
from consult.presence import Cursor, Viewport
from consult.shared import AnnotationKind
from crypto.identity import Identity
from tests.tui.pilots import make_node, open_viewer, press, svg_text, viewer_app
from tui.app import RadmeshApp
from tui.dicom_frame import frame_from_dataset
from tui.facade import Frame
from tui.memory import SERIES2_UID, SERIES_UID, InMemoryNode, MemoryPeer
from tui.screens.viewer import HeapFreeze, ViewerScreen
from tui.widgets.consult_panel import ConsultPanel
from tui.widgets.image_view import ImageView

SIZE = (100, 30)  # what the viewer does, not its layout: the smallest screen renders fastest
CONSULT = "feed0000feed0000feed0000feed0000"


@pytest.fixture
async def pair() -> AsyncIterator[tuple[InMemoryNode, MemoryPeer]]:
    """The in-memory node's live session and a second participant joined to it."""
    node = make_node(slices=30)
    peer = node.live.join("Dr Ana", "#ff00ff")
    await wait_for(lambda: len(node.live.live.participants()) == len(peer.live.participants()) == 2)
    yield node, peer
    await node.live.close()


async def wait_for(predicate: Callable[[], object], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def other(live: LiveConsult) -> object:
    """The other participant as ``live`` sees them."""
    return next(p for p in live.participants() if p.client_id != live.presence.client_id)


# --- follow-the-presenter ---------------------------------------------------------------------


async def test_a_follower_takes_the_presenters_slices_until_they_scroll_themselves(
    pair: tuple[InMemoryNode, MemoryPeer],
) -> None:
    node, peer = pair
    presenter, follower = peer.live, node.live.live
    app = RadmeshApp(node)
    async with app.run_test(size=SIZE) as pilot:
        viewer = await open_viewer(pilot, node)
        presenter.present(True)
        presenter.set_viewport(Viewport(SERIES_UID, 5, 80.0, 40.0))
        await pilot.press("f")
        await wait_for(lambda: viewer.index == 5)
        assert viewer.view.window.width == 80
        assert viewer.view.window.center == 40
        await pilot.pause()
        assert "following Dr Ana" in svg_text(app)
        assert "following" in str(viewer.query_one("#participants").render())
        await wait_for(lambda: other(presenter).following)  # type: ignore[attr-defined]

        presenter.set_viewport(Viewport(SERIES2_UID, 7, 80.0, 40.0, zoom=2.0))  # presenter scrolls
        await wait_for(lambda: viewer.index == 7 and viewer.series_index == 1)
        assert viewer.view.zoom == 2.0

        await press(pilot, "j")  # the follower moves on their own: no longer following
        assert viewer.index == 8
        assert not follower.presence.following
        await wait_for(lambda: not other(presenter).following)  # type: ignore[attr-defined]
        presenter.set_viewport(Viewport(SERIES2_UID, 2, 80.0, 40.0))
        # The follower has the presenter's new viewport (where it would have gone)...
        await wait_for(lambda: (v := other(follower).viewport) is not None and v.slice_index == 2)  # type: ignore[attr-defined]
        await pilot.pause()
        assert viewer.index == 8  # ...and stays where it went itself
        # ...and the presenter sees where the follower went.
        await wait_for(lambda: (v := other(presenter).viewport) is not None and v.slice_index == 8)  # type: ignore[attr-defined]


async def test_the_presenter_broadcasts_viewport_and_tool_coalesced(
    pair: tuple[InMemoryNode, MemoryPeer],
) -> None:
    node, peer = pair
    follower, link = peer.live, peer.from_node
    app = RadmeshApp(node)
    async with app.run_test(size=SIZE) as pilot:
        viewer = await open_viewer(pilot, node)
        follower.follow()
        await pilot.press("p", "M")
        await wait_for(lambda: other(follower).presenting and other(follower).tool == "length")  # type: ignore[attr-defined]
        await pilot.pause()
        assert "presenting" in svg_text(app)

        sent = link.presence_sent
        for _ in range(20):  # a burst of slice steps in one tick
            viewer.action_step(1)
        await pilot.pause(0.3)  # the last step's slice loads (earlier loads are cancelled)
        # The follower on the last slice has had every update the burst caused (they arrive
        # in order), so the count below is the whole burst's, not what left in 0.3 s.
        await wait_for(lambda: (v := follower.presence.me.viewport) and v.slice_index == 20)
        # Coalesced, not one message per step (20): the burst's tick and the last slice's
        # load give 2 on a quiet machine; a loaded one adds a heartbeat or a load finishing
        # in another tick (5 seen under the whole suite at load 6).
        assert link.presence_sent - sent < 8

        await pilot.press("p")  # stop presenting
        await wait_for(lambda: not other(follower).presenting)  # type: ignore[attr-defined]


async def test_follow_without_a_live_consult_says_what_to_do() -> None:
    node = make_node()
    app = RadmeshApp(node)
    async with app.run_test(size=SIZE) as pilot:
        screen = ViewerScreen(node, node.studies()[0], live=False)
        await app.push_screen(screen)
        await pilot.pause()
        await press(pilot, "f")
        assert "following needs a live consult" in svg_text(app)


async def test_in_memory_session_follows_a_remote_presenter() -> None:
    async with viewer_app(SIZE) as (node, app, pilot, viewer):
        neuro = node.live.join("Dr Neuro", "#ff00ff")
        neuro.viewport(Viewport(SERIES_UID, 3, 400.0, 40.0), presenting=True)
        await press(pilot, "f")
        assert viewer.index == 3
        assert node.session.following()
        neuro.viewport(Viewport(SERIES_UID, 9, 400.0, 40.0))
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert viewer.index == 9
        await pilot.press("f")  # toggled off: the presenter's moves no longer apply
        neuro.viewport(Viewport(SERIES_UID, 1, 400.0, 40.0))
        await pilot.pause()
        assert viewer.index == 9
        assert not node.session.following()


@asynccontextmanager
async def viewer_with_neuro() -> AsyncIterator[
    tuple[InMemoryNode, MemoryPeer, RadmeshApp, Pilot[None], ViewerScreen]
]:
    """The live viewer, Dr Neuro (the verified PEER-NEURO of the directory) in its session."""
    node = make_node()
    neuro = node.live.join("Dr Neuro", "#ff00ff")
    node.rekey("PEER-NEURO", neuro.node)  # before the viewer reads the directory
    app = RadmeshApp(node)
    async with app.run_test(size=SIZE) as pilot:
        yield node, neuro, app, pilot, await open_viewer(pilot, node)


async def test_the_participants_panel_shows_who_presents_and_who_follows() -> None:
    async with viewer_with_neuro() as (node, neuro, _, pilot, viewer):
        surg = node.live.join("Dr Surg", "#00ffff")
        surg.viewport(Viewport(SERIES_UID, 3, 400.0, 40.0), presenting=True)
        neuro.viewport(Viewport(SERIES_UID, 3, 400.0, 40.0), following=True)
        await pilot.pause()
        panel = str(viewer.query_one("#participants").render())
        assert f"Dr Neuro ({neuro.node[:7]}, verified) following" in panel
        assert f"Dr Surg ({surg.node[:7]}, unverified) presenting" in panel  # not in the directory
        neuro.viewport(Viewport(SERIES_UID, 4, 400.0, 40.0), following=False)
        await pilot.pause()
        assert "following" not in str(viewer.query_one("#participants").render())


# --- picking annotations with the mouse --------------------------------------------------------


async def click_image_point(pilot, viewer: ViewerScreen, point: tuple[float, float]) -> None:  # type: ignore[no-untyped-def]
    geom = viewer.view.geometry()
    assert geom is not None
    await pilot.click(ImageView, offset=geom.image_to_cell(point))
    await pilot.pause()


async def test_clicking_near_an_annotation_selects_it_and_only_the_author_removes_it() -> None:
    async with viewer_with_neuro() as (node, neuro, app, pilot, viewer):
        sop = viewer.current.sop_uid  # type: ignore[union-attr]
        panel = viewer.query_one(ConsultPanel)
        theirs = neuro.live.add_annotation(
            AnnotationKind.LENGTH, sop, 0, ((20.0, 20.0), (40.0, 20.0))
        )
        mine = node.session.add_annotation(AnnotationKind.POINT, sop, 0, ((90.0, 90.0),))
        await node.live.settle()
        await pilot.pause()

        await click_image_point(pilot, viewer, (30.0, 20.0))  # on the middle of their line
        assert panel.selected == theirs.id
        assert "▶" in str(panel.query_one("#annotations").render())
        await press(pilot, "x")
        assert len(node.session.annotations()) == 2
        assert f"only the author, Dr Neuro ({neuro.node[:7]}, verified), can remove" in svg_text(
            app
        )

        await click_image_point(pilot, viewer, (90.0, 90.0))
        assert panel.selected == mine.id
        await press(pilot, "delete")
        assert [a.id for a in node.session.annotations()] == [theirs.id]

        await click_image_point(pilot, viewer, (110.0, 30.0))  # nothing near: no selection
        assert panel.selected is None
        await press(pilot, "x")
        assert "select an annotation first" in svg_text(app)


# --- multi-frame instances ---------------------------------------------------------------------


class MultiFrameNode(InMemoryNode):
    """The first instance of each series holds three frames (each brighter by 100 HU)."""

    def load_frame(self, sop_uid: str, frame: int = 0) -> Frame | None:
        base = super().load_frame(sop_uid, 0)
        if base is None or not sop_uid.endswith(".1"):
            return base
        return replace(base, pixels=base.pixels + 100 * frame, frames=3)


async def test_j_walks_the_frames_of_a_multi_frame_instance_and_marks_keep_their_frame() -> None:
    node = MultiFrameNode(Identity.generate())
    app = RadmeshApp(node)
    async with app.run_test(size=SIZE) as pilot:
        viewer = await open_viewer(pilot, node)
        assert "Im 1/12  Fr 1/3" in svg_text(app)
        sop = viewer.current.sop_uid  # type: ignore[union-attr]
        neuro = node.live.join("Dr Neuro", "#ff00ff")
        neuro.cursor(Cursor(sop, 1, 50.0, 50.0))

        await pilot.press("j")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert (viewer.current.sop_uid, viewer.frame_no) == (sop, 1)  # type: ignore[union-attr]
        assert "Im 1/12  Fr 2/3" in svg_text(app)
        frame0 = node.load_frame(sop, 0)
        assert frame0 is not None
        assert viewer.view.frame is not None
        assert (viewer.view.frame.pixels == frame0.pixels + 100).all()
        assert [m.kind for m in viewer.view.marks] == ["cursor"]  # the cursor is on frame 2

        await pilot.press("P")
        await click_image_point(pilot, viewer, (40.0, 40.0))
        (point,) = node.session.annotations()
        assert (point.sop_instance_uid, point.frame) == (sop, 1)

        # Esc drops the tool (with one, k moves the keyboard cursor), then k: frame 1, where
        # neither the cursor nor the point is.
        await pilot.press("escape", "k")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert viewer.frame_no == 0
        assert viewer.view.marks == ()

        await pilot.press("j", "j", "j")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert "Im 2/12" in svg_text(app)
        assert "Fr " not in svg_text(app)


async def test_a_real_multi_frame_file_opens_with_every_frame_reachable(tmp_path: Path) -> None:
    source = get_testdata_file("CT_small.dcm")
    assert source is not None
    ds = pydicom.dcmread(source)
    base = ds.pixel_array
    frames = np.stack([base, base + 10, base + 20]).astype(base.dtype)
    ds.NumberOfFrames = 3
    ds.PixelData = frames.tobytes()
    ds.save_as(tmp_path / "multi.dcm")
    saved = pydicom.dcmread(tmp_path / "multi.dcm")

    class OneMultiFrameFile(InMemoryNode):
        def load_frame(self, sop_uid: str, frame: int = 0) -> Frame | None:
            return frame_from_dataset(saved, frame)

    node = OneMultiFrameFile(Identity.generate(), slices=1)
    app = RadmeshApp(node)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_viewer(pilot, node, live=False)
        assert "Im 1/1  Fr 1/3" in svg_text(app)
        await pilot.press("end")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert "Fr 3/3" in svg_text(app)
        assert screen.view.frame is not None
        assert (screen.view.frame.pixels == frames[2]).all()


# --- reading ahead ------------------------------------------------------------------------------


class CountingNode(InMemoryNode):
    """Records every frame read (from the worker threads too)."""

    def __init__(self) -> None:
        super().__init__(Identity.generate())
        self.reads: list[tuple[str, int]] = []

    def load_frame(self, sop_uid: str, frame: int = 0) -> Frame | None:
        self.reads.append((sop_uid, frame))
        return super().load_frame(sop_uid, frame)


async def test_slices_ahead_are_read_in_one_go_and_a_step_shows_them_at_once() -> None:
    node = CountingNode()
    app = RadmeshApp(node)
    async with app.run_test(size=SIZE) as pilot:
        screen = ViewerScreen(node, node.studies()[0])
        await app.push_screen(screen)
        await app.workers.wait_for_complete()
        await pilot.pause()
        keys = [(ref.sop_uid, f) for ref, f in screen.slices]
        assert len(keys) == 12
        assert node.reads == keys[:9]  # the first slice, then eight ahead in one go
        loading = screen._loading
        for index in range(1, 6):
            await pilot.press("j")
            assert screen.index == index
            assert screen.view.frame is screen._cache[keys[index]]  # shown at once
        assert screen._loading is loading  # no load of its own for any of them
        await app.workers.wait_for_complete()
        # Three left ahead of slice 5: the rest of the series was read, each slice once.
        assert node.reads == keys
        await pilot.press("k")  # back: what is behind is read only when it is not kept
        await app.workers.wait_for_complete()
        assert node.reads == keys
        assert screen.view.frame is screen._cache[keys[4]]


# --- the heap while a viewer is open ------------------------------------------------------------


async def test_the_heap_is_frozen_while_a_viewer_is_open_and_thawed_when_it_closes() -> None:
    """A full garbage collection pass over the app's heap is a 100 ms burst of CPU: while a
    viewer is open the objects from before it stay out of those passes, and go back in (to
    be collected as before) when the last viewer closes, whether popped or the app quits."""
    assert gc.get_freeze_count() == 0
    async with viewer_app(SIZE) as (node, app, pilot, viewer):
        assert HeapFreeze.holders == 1
        assert gc.get_freeze_count() > 10_000  # the app, its widgets, the modules
        second = await open_viewer(pilot, node, live=False)  # one over the other: counted
        assert HeapFreeze.holders == 2
        app.pop_screen()
        await pilot.pause()
        assert not second.is_attached
        assert HeapFreeze.holders == 1
        assert gc.get_freeze_count() > 10_000  # still held for the first viewer
        app.pop_screen()
        await pilot.pause()
        assert not viewer.is_attached
        assert (HeapFreeze.holders, gc.get_freeze_count()) == (0, 0)
        await open_viewer(pilot, node, live=False)
        assert HeapFreeze.holders == 1
    assert (HeapFreeze.holders, gc.get_freeze_count()) == (0, 0)  # the app quit with it open
