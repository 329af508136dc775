"""Reading room (issue 19): measurements with the keyboard alone, drawn with their value
and listed at once; r/c/Esc focus and the mode line; each series its own window and slice."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

import numpy as np
from textual.pilot import Pilot
from textual.widget import Widget

from consult.live import LiveConsult
from consult.shared import AnnotationKind
from crypto.identity import Identity
from tests.tui.pilots import make_node, open_viewer, press, viewer_app
from tui import imaging
from tui.app import RadmeshApp
from tui.facade import Frame, SeriesInfo
from tui.memory import SERIES2_UID, SERIES_UID, STUDY_UID, InMemoryNode
from tui.node_facade import LiveSessionView
from tui.screens.viewer import ViewerScreen
from tui.widgets.image_view import ImageView
from tui.widgets.overlay import OverlayBar

SIZE = (100, 30)  # what the screens do, not their layout: the smallest screen renders fastest
CONSULT = "feed0000feed0000feed0000feed0000"


def image_text(viewer: ViewerScreen) -> str:
    """The cell text drawn in the image area (overlay lines and mark labels)."""
    return "".join(seg.text for strip in viewer.view._strips for seg in strip)


def border(widget: Widget) -> str:
    return str(widget.styles.border_top[0])


def mode_line(viewer: ViewerScreen) -> str:
    return str(viewer.query_one("#mode").render())


@asynccontextmanager
async def alone_in_a_session() -> AsyncIterator[tuple[LiveConsult, Pilot[None], ViewerScreen]]:
    """A real live session with nobody else in it, and the viewer open in it."""
    alone = LiveConsult(CONSULT, Identity.generate(), "Dr Ana", "#ff00ff")
    node = make_node()
    node.session = LiveSessionView(alone)
    app = RadmeshApp(node)
    try:
        async with app.run_test(size=SIZE) as pilot:
            yield alone, pilot, await open_viewer(pilot, node)
    finally:
        await alone.close()


async def test_a_length_measured_with_the_keyboard_alone_is_listed_and_drawn_at_once() -> None:
    async with alone_in_a_session() as (alone, pilot, viewer):
        slice_before = viewer.index
        await pilot.press("M")  # length tool: the keyboard cursor appears
        assert viewer.kb is not None
        start = viewer.kb
        await pilot.press("space", *["right"] * 5, "shift+down")
        preview = [m for m in viewer.view.marks if m.kind == "length"]
        assert [m.points for m in preview] == [(start, viewer.kb)]  # a line to the cursor
        assert preview[0].label.endswith(" mm")
        await press(pilot, "space")
        assert viewer.index == slice_before  # arrows moved the cursor, not the slice
        (length,) = alone.annotations()
        assert length.kind is AnnotationKind.LENGTH
        assert length.points[0] == start
        assert length.points[1][0] > start[0]
        assert length.points[1][1] > start[1]
        value = f"{length.values['length_mm']:.1f} mm"
        listed = str(viewer.query_one("#annotations").render())
        assert f"length {value}" in listed  # in the list at once
        assert value in image_text(viewer)  # and drawn beside the mark on the image
        assert viewer.kb is not None  # the tool stays for the next measurement
        await pilot.press("escape")  # Esc cancels the tool and its cursor
        assert viewer.tool == ""
        assert viewer.kb is None
        assert all(m.kind != "kbcursor" for m in viewer.view.marks)


async def test_a_length_clicked_in_a_session_alone_is_listed_and_drawn_at_once() -> None:
    async with alone_in_a_session() as (alone, pilot, viewer):
        await pilot.press("M")
        geom = viewer.view.geometry()
        assert geom is not None
        for point in ((30.0, 40.0), (90.0, 40.0)):
            await pilot.click(ImageView, offset=geom.image_to_cell(point))
        await pilot.pause()
        (length,) = alone.annotations()
        value = f"{length.values['length_mm']:.1f} mm"
        assert f"length {value}" in str(viewer.query_one("#annotations").render())
        assert value in image_text(viewer)


async def test_every_tool_works_from_the_keyboard_and_draws_its_value() -> None:
    async with viewer_app(SIZE) as (node, _, pilot, viewer):
        await pilot.press("G", "space", "l", "l", "l", "space", "k", "k", "space")
        await press(pilot, "E", "space", "L", "J", "space")
        angle, roi = node.session.annotations()
        assert angle.kind is AnnotationKind.ANGLE
        assert roi.kind is AnnotationKind.ELLIPSE
        text = image_text(viewer)
        assert f"{angle.values['angle_deg']:.1f}°" in text
        assert f"{roi.values['mean']:.0f}±{roi.values['sd']:.0f} HU" in text


async def test_a_sentence_typed_after_r_goes_into_the_report_not_to_the_viewer() -> None:
    async with viewer_app(SIZE) as (node, _, pilot, viewer):
        assert viewer.view.has_focus
        assert mode_line(viewer).startswith("VIEW")
        state = (viewer.index, viewer.series_index, viewer.view.window, viewer.view.zoom)
        sentence = "Fine MIP in 2 cuts, no PE; jk: follow up CT please x"  # j, k: priority keys
        await pilot.press("r")
        assert viewer.query_one("#report").has_focus
        assert mode_line(viewer).startswith("REPORT")
        report = viewer.query_one("#report")
        assert border(report) == "heavy"  # the focused pane stands out
        assert border(viewer.query_one("#image-frame")) == "round"  # the frame around the image
        await press(pilot, *[("space" if ch == " " else ch) for ch in sentence])
        assert node.session.report_text() == sentence
        # i (invert), f (follow), M (length), n (series), p (present), 1-8 presets, x, q:
        assert not viewer.view.invert
        assert not node.session.following()
        assert not node.session.participants()[0].presenting
        assert viewer.tool == ""
        assert (viewer.index, viewer.series_index, viewer.view.window, viewer.view.zoom) == state
        assert viewer.is_attached  # q did not close it

        await press(pilot, "escape")
        assert border(viewer.query_one("#image-frame")) == "heavy"
        assert viewer.view.has_focus
        assert mode_line(viewer).startswith("VIEW")

        await pilot.press("c")
        assert viewer.query_one("#chat-input").has_focus
        assert mode_line(viewer).startswith("CHAT")
        await press(pilot, "o", "k", "space", "i", "f", "enter")
        assert [m.text for m in node.session.chat()] == ["ok if"]
        assert "ok if" in str(viewer.query_one("#chat-log").render())
        assert not viewer.view.invert
        assert not node.session.following()
        await pilot.press("escape", "i")
        assert viewer.view.has_focus
        assert viewer.view.invert


class MixedNode(InMemoryNode):
    """A CT head without a window in its files, then an MR (values 0..1000, no window)."""

    def series(self, study_uid: str) -> list[SeriesInfo]:
        return [
            SeriesInfo(SERIES_UID, STUDY_UID, 1, "CT", "Head axial", 12),
            SeriesInfo(SERIES2_UID, STUDY_UID, 2, "MR", "Ax T2", 12),
        ]

    def load_frame(self, sop_uid: str, frame: int = 0) -> Frame | None:
        base = super().load_frame(sop_uid, frame)
        if base is None:
            return None
        if sop_uid.startswith(SERIES2_UID + "."):
            ramp = np.tile(np.linspace(0, 1000, 128, dtype=np.float32), (128, 1))
            return replace(base, pixels=ramp.astype(np.int16), slope=1.0, intercept=0.0,
                           window=None)  # fmt: skip
        return replace(base, window=None)


async def test_each_series_keeps_its_own_window_and_slice() -> None:
    node = MixedNode(Identity.generate())
    app = RadmeshApp(node)
    async with app.run_test(size=SIZE) as pilot:
        viewer = await open_viewer(pilot, node, live=False)
        assert viewer.view.window == imaging.Window(40, 80)  # CT head: brain
        await pilot.press("j", "j", "j", "5")  # slice 4, lung window
        lung = dict(imaging.PRESETS)["lung"]
        assert (viewer.index, viewer.view.window) == (3, lung)

        await pilot.press("n")
        await app.workers.wait_for_complete()
        await pilot.pause()
        mr = viewer.view.window
        assert viewer.index == 0
        assert mr != lung
        assert 400 < mr.center < 600
        assert mr.width > 500
        await pilot.press("j")
        await pilot.press("minus")  # zoom does not matter here; the slice does

        await pilot.press("N")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert (viewer.index, viewer.view.window) == (3, lung)
        assert "W 1500 L -600" in viewer.query_one("#overlay-bottom", OverlayBar).text

        await pilot.press("n")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert (viewer.index, viewer.view.window) == (1, mr)
