"""The viewer overlay (issue 19 item 4): orientation letters, slice facts, the value under
the cursor; the pure functions first, then the overlay on screen."""

from __future__ import annotations

import functools
import io
import math
from dataclasses import replace

import numpy as np
import pytest
from rich.cells import cell_len
from rich.console import Console
from rich.segment import Segment
from rich.table import Table

from crypto.identity import Identity
from tests.tui.pilots import make_node, open_viewer, press
from tui.app import RadmeshApp
from tui.facade import Frame, StudyInfo
from tui.memory import InMemoryNode
from tui.screens.viewer import ViewerScreen
from tui.widgets.image_view import ImageView
from tui.widgets.overlay import (
    EdgeMarker,
    Markers,
    OverlayBar,
    _bar,
    _TopBar,
    age_sex,
    direction_letters,
    one_line_segments,
    orientation_markers,
    pixel_value,
    slice_location,
    study_date,
)

SIZE = (100, 30)  # what the screens do, not their layout: the smallest screen renders fastest
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def test_axial_coronal_and_sagittal_edges() -> None:
    # Radiological convention: the patient's left on the image's right.
    assert orientation_markers(AXIAL) == Markers(top="A", bottom="P", left="R", right="L")
    assert orientation_markers(CORONAL) == Markers(top="S", bottom="I", left="R", right="L")
    assert orientation_markers(SAGITTAL) == Markers(top="S", bottom="I", left="A", right="P")


def test_a_prone_or_flipped_image_gets_the_letters_it_shows() -> None:
    # Rows running to the patient's right, columns to the front (an axial, prone).
    assert orientation_markers((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0)) == Markers("P", "A", "L", "R")


def test_an_oblique_plane_gets_its_letters_largest_first() -> None:
    a = math.radians(30)
    # An axial tilted 30 degrees about the patient's long axis: rows mostly left, a little back.
    oblique = (math.cos(a), math.sin(a), 0.0, -math.sin(a), math.cos(a), 0.0)
    assert orientation_markers(oblique) == Markers(top="AL", bottom="PR", left="RA", right="LP")
    # Double oblique: three letters, in order of size.
    row = np.array([0.8, 0.5, 0.33])
    row /= np.linalg.norm(row)
    assert direction_letters(tuple(row)) == "LPS"
    assert direction_letters((0.02, 0.0, -0.9998)) == "I"  # a degree of tilt is not a letter


@pytest.mark.parametrize(
    "bad",
    [
        None,
        (1.0, 0.0, 0.0),  # not six values
        (math.nan, 0.0, 0.0, 0.0, 1.0, 0.0),
        (math.inf, 0.0, 0.0, 0.0, 1.0, 0.0),
        (0.0, 0.0, 0.0, 0.0, 1.0, 0.0),  # a zero vector
        (1e300, 0.0, 0.0, 0.0, 1.0, 0.0),  # not a direction
    ],
)
def test_an_orientation_that_is_not_two_directions_shows_no_letters(
    bad: tuple[float, ...] | None,
) -> None:
    assert orientation_markers(bad) is None


def frame(**kw: object) -> Frame:
    pixels = np.arange(12, dtype=np.int16).reshape(3, 4)  # rows 3, columns 4
    base = Frame(pixels, 2.0, -10.0, (0.5, 0.5), True, (0.0, 0.0, 7.5), AXIAL)
    return replace(base, **kw)  # type: ignore[arg-type]


def test_slice_location_from_the_file_else_from_the_position() -> None:
    assert slice_location(frame(slice_location=-12.5)) == -12.5
    assert slice_location(frame()) == 7.5  # axial: the z of ImagePositionPatient
    assert slice_location(frame(orientation=SAGITTAL, origin=(3.0, 1.0, 2.0))) == pytest.approx(
        -3.0  # normal of rows x columns: -x
    )
    assert slice_location(frame(origin=None)) is None


def test_the_value_under_the_cursor_is_the_modality_value_of_that_pixel() -> None:
    f = frame()
    assert pixel_value(f, (3.0, 2.0)) == 11 * 2.0 - 10.0  # column 3, row 2
    assert pixel_value(f, (0.4, 0.4)) == -10.0  # nearest pixel
    assert pixel_value(f, (4.0, 0.0)) is None  # off the image
    assert pixel_value(f, (-1.0, 0.0)) is None
    assert pixel_value(f, (math.nan, 0.0)) is None


def test_age_sex_and_date_as_a_viewer_prints_them() -> None:
    assert age_sex("067Y", "F") == "67Y F"
    assert age_sex("", "M") == "M"
    assert age_sex("", "") == ""
    assert study_date("20260101") == "2026-01-01"
    assert "\x1b" not in age_sex("\x1b[2J067Y", "F")  # peer text: no control characters


def texts(viewer: ViewerScreen) -> tuple[str, str, str, str]:
    return (
        viewer.query_one("#overlay-top", OverlayBar).text,
        viewer.query_one("#overlay-bottom", OverlayBar).text,
        viewer.query_one("#mark-left", EdgeMarker).text,
        viewer.query_one("#mark-right", EdgeMarker).text,
    )


async def test_the_overlay_shows_the_study_the_slice_and_the_orientation() -> None:
    node = make_node()
    app = RadmeshApp(node)
    async with app.run_test(size=SIZE) as pilot:
        viewer = await open_viewer(pilot, node, live=False)
        top, bottom, left, right = texts(viewer)
        for shown in ("ANON-0001", "67Y F", "Acc ANON-ACC-1", "2026-01-01", "CT CHEST"):
            assert shown in top
        for shown in ("Se 1 Axial 5mm", "Im 1/12", "SL 0.0 mm", "ST 5.0 mm"):
            assert shown in top
        assert "  A  " in top  # the top edge's letter, between the two texts
        assert "W 400 L 40" in bottom
        assert "zoom 1.00" in bottom
        assert "  P  " in bottom
        assert (left, right) == ("R", "L")
        await pilot.press("j", "j")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert "Im 3/12" in texts(viewer)[0]
        assert "SL 10.0 mm" in texts(viewer)[0]


async def test_the_value_under_the_pointer_is_shown_without_redrawing_the_image() -> None:
    node = make_node()
    app = RadmeshApp(node)
    async with app.run_test(size=SIZE) as pilot:
        viewer = await open_viewer(pilot, node, live=False)
        shown = viewer.view.frame
        assert shown is not None
        drawn = viewer.view.frames_rendered
        # The phantom: soft tissue (40 HU) in the middle, air (-1000 HU) in the corner.
        for point, hu in (((64.0, 64.0), 40), ((1.0, 1.0), -1000)):
            assert pixel_value(shown, point) == hu
            viewer.view.post_message(ImageView.Pointer(point))
            await pilot.pause()
            assert f"HU {hu}  pos" in texts(viewer)[1]
        assert viewer.view.frames_rendered == drawn  # text changed, not the picture


async def test_the_keyboard_cursor_shows_the_value_under_it() -> None:
    node = make_node()
    app = RadmeshApp(node)
    async with app.run_test(size=SIZE) as pilot:
        viewer = await open_viewer(pilot, node, live=False)
        await press(pilot, "M")  # a tool: the keyboard cursor appears in the middle
        assert viewer.kb is not None
        assert viewer.view.frame is not None
        hu = pixel_value(viewer.view.frame, viewer.kb)
        assert f"HU {hu:.0f}" in texts(viewer)[1]
        assert "tool: length (0/2)" in texts(viewer)[1]


class MarkupNode(InMemoryNode):
    """A study whose DICOM text is markup and terminal control: the peer wrote it."""

    def studies(self) -> list[StudyInfo]:
        study = super().studies()[0]
        return [
            replace(
                study,
                description="[b]CT[/] [@click=app.quit]x[/]\x1b[2J",
                accession="[/]",
                patient_sex="M\x07",
            )
        ]


async def test_dicom_text_on_the_overlay_is_shown_literally() -> None:
    node = MarkupNode(Identity.generate())
    app = RadmeshApp(node)
    async with app.run_test(size=SIZE) as pilot:
        viewer = await open_viewer(pilot, node, live=False)
        top = texts(viewer)[0]
        assert "[b]CT[/] [@click=app.quit]x[/]" in top
        assert "Acc [/]" in top
        assert "\x1b" not in top
        assert "\x07" not in top
        assert app.is_running


BAR_TEXTS = [
    ("ANON-0001  67Y F  Acc ANON-ACC-1  2026-01-01  CT CHEST", "A", "Se 1 Axial 5mm  Im 3/12"),
    ("", "", ""),
    ("x", "LPS", "Im 120/120  SL -1234.5 mm  ST 0.6 mm"),
    (" leading space", "P", "internal  double  spaces"),
    ("é wide ünïcode", "R", "y"),
]


def _same(table: Table) -> Table:
    return table


@pytest.mark.parametrize("width", [12, 40, 71, 100, 204])
@pytest.mark.parametrize(("left", "centre", "right"), BAR_TEXTS)
def test_the_bar_above_drawn_directly_is_the_grid_rich_lays_out(
    width: int, left: str, centre: str, right: str
) -> None:
    """One line that fits is drawn without a table, segment for segment what the table
    draws; anything else (too long, trailing spaces Rich would strip) is the table."""
    console = Console(width=width, file=io.StringIO(), color_system="truecolor")
    options = console.options.update_width(width)
    for r in (right, right + " ", right * 9):
        grid = Table.grid(expand=True)
        grid.add_row(_bar(left, centre, r, wrap=True))
        drawn = list(
            console.render(_TopBar(left, centre, r, functools.partial(_same, grid)), options)
        )
        assert drawn == list(console.render(grid, options))
        fast = one_line_segments(left, centre, r, width)
        assert fast is None or fast == drawn
        if r.endswith(" ") or cell_len(r) > width // 2:
            assert fast is None
    # The real bar at the real width takes the direct way.
    if width == 204 and centre:
        assert one_line_segments(left, centre, right, width) is not None


async def test_a_slice_step_repaints_the_bar_above_without_laying_the_screen_out() -> None:
    node = make_node()
    app = RadmeshApp(node)
    async with app.run_test(size=(232, 64)) as pilot:
        viewer = await open_viewer(pilot, node)
        # What opening the viewer still has under way (its read-ahead, a layout it asked
        # for) ends first: a loaded machine once counted the opening's layout as the step's.
        await app.workers.wait_for_complete()
        await pilot.pause()
        await pilot.pause()
        layouts: list[object] = []
        refresh_layout = viewer._refresh_layout

        def counted(*args: object, **kwargs: object) -> None:
            layouts.append(args)
            refresh_layout(*args, **kwargs)  # type: ignore[arg-type]

        viewer._refresh_layout = counted  # type: ignore[method-assign]
        bar = viewer.query_one("#overlay-top", OverlayBar)
        await pilot.press("j")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert "Im 2/12" in texts(viewer)[0]
        painted = "".join(segment.text for segment in bar.render_line(0))
        assert "Im 2/12" in painted  # the bar shows the new slice
        assert layouts == []  # and nothing was laid out again for it
        bar.show("a text far too long to fit on one line " * 12, "A", "Im 2/12")
        await pilot.pause()
        assert layouts  # the bar now takes more lines: the screen is laid out again
        assert bar.size.height > 1


@pytest.mark.parametrize("theme", ["textual-dark", "textual-light"])
async def test_the_bar_above_drawn_directly_is_the_line_static_draws(theme: str) -> None:
    """A slice step changes the bar's text: the one line that fits is drawn straight from its
    segments, segment for segment the line Static's way through Rich draws, and the bar goes
    that way again when the text no longer fits one line."""
    node = make_node()
    app = RadmeshApp(node)
    async with app.run_test(size=(232, 64)) as pilot:
        app.theme = theme
        viewer = await open_viewer(pilot, node)
        bar = viewer.query_one("#overlay-top", OverlayBar)

        def static_line() -> list[Segment]:
            bar._render_content()  # Static's own rendering of what the bar holds now
            return list(bar._render_cache.lines[0])

        await pilot.press("j")
        await app.workers.wait_for_complete()
        await pilot.pause()
        shown = bar.render_line(0)
        assert "Im 2/12" in shown.text
        assert shown is bar._direct_line()  # drawn directly, not through Rich
        assert list(shown) == static_line()
        for left, centre, right in BAR_TEXTS:
            bar.show(left, centre, right)
            assert bar._direct_line() is not None
            assert list(bar.render_line(0)) == static_line(), (left, centre, right)
        bar.show("a text far too long to fit on one line " * 12, "A", "Im 2/12")
        await pilot.pause()
        assert bar._direct_line() is None
        assert list(bar.render_line(0)) == static_line()
        assert bar.size.height > 1
