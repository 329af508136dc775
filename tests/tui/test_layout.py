"""Layouts that fit the terminal (issue 19 items 6 and 8): at 80×24 the image takes the
width and the worklist keeps priority, question and due time; at 200×55 everything shows."""

from __future__ import annotations

import re
from collections.abc import Callable

from textual.geometry import Region
from textual.pilot import Pilot
from textual.strip import Strip
from textual.widget import Widget
from textual.widgets import DataTable, OptionList, TextArea

from tests.tui.pilots import make_node, open_viewer, press, svg_text, viewer_app
from tui.app import RadmeshApp
from tui.facade import ConsultItem
from tui.screens.home import site_cell, study_cell, worklist_columns
from tui.widgets.consult_panel import ConsultPanel
from tui.widgets.footer import Footer
from tui.widgets.image_view import ImageView
from tui.widgets.overlay import OverlayBar

SMALL = (80, 24)
LARGE = (200, 55)


def worklist_keys(app: RadmeshApp) -> list[str]:
    table = app.screen.query_one("#worklist", DataTable)
    return [str(key.value) for key in table.columns]


async def test_at_80x24_the_image_takes_the_width_and_the_panels_fold_away() -> None:
    async with viewer_app(SMALL) as (node, app, pilot, viewer):
        panel, series = viewer.query_one(ConsultPanel), viewer.query_one("#series", OptionList)
        assert not panel.display or panel.size.width == 0
        assert series.size.width == 0
        # 80 columns less the image's border and the two orientation letters beside it.
        assert viewer.view.size.width >= 74
        assert viewer.view.size.height >= 12
        assert "VIEW" in svg_text(app)  # the mode line is on screen, not under the footer
        size, drawn = viewer.view.size, viewer.view.frames_rendered
        viewer.view.post_message(ImageView.Pointer((1.0, 1.0)))  # a long value line now
        await pilot.pause()
        assert "HU -1000  pos" in viewer.query_one("#overlay-bottom", OverlayBar).text
        assert (viewer.view.size, viewer.view.frames_rendered) == (size, drawn)  # no jump

        await press(pilot, "t")  # the consult panel, beside a narrower image
        assert panel.size.width > 0
        assert 20 <= viewer.view.size.width < 74
        await press(pilot, "t")
        assert panel.size.width == 0
        assert viewer.view.size.width >= 74

        await press(pilot, "r")  # typing the report is one key away, even folded
        report = viewer.query_one("#report", TextArea)
        assert report.has_focus
        await pilot.press("n", "o", "r", "m")
        assert node.session.report_text() == "norm"
        assert viewer.series_index == 0  # "n" went into the report, not to the next series
        await press(pilot, "escape")
        assert viewer.view.has_focus
        assert panel.size.width == 0

        await press(pilot, "s")  # the series list, picked from and folded again
        assert series.has_focus
        assert series.size.width > 0
        await pilot.press("down", "enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert viewer.series_index == 1
        assert series.size.width == 0
        assert viewer.view.has_focus


async def test_at_200x55_the_series_list_and_the_panel_sit_beside_a_wide_image() -> None:
    async with viewer_app(LARGE) as (_, _, pilot, viewer):
        panel, series = viewer.query_one(ConsultPanel), viewer.query_one("#series", OptionList)
        assert panel.size.width >= 40
        assert series.size.width >= 20
        assert viewer.view.size.width >= 110
        await press(pilot, "t")  # nothing to fold at this width: said, not done
        assert "always shown at this width" in viewer.message
        assert panel.size.width >= 40


async def test_the_worklist_at_80_columns_keeps_priority_question_and_due() -> None:
    node = make_node()
    app = RadmeshApp(node)
    async with app.run_test(size=SMALL) as pilot:
        await pilot.pause()
        keys = worklist_keys(app)
        for key in ("priority", "question", "site", "state", "due"):
            assert key in keys
        assert "study" not in keys
        table = app.screen.query_one("#worklist", DataTable)
        assert table.virtual_size.width <= SMALL[0]  # nothing cut off to the right
        svg = svg_text(app)
        for shown in ("STAT", "CT head: bleed?", "✔ verified", "! unverified"):
            assert shown in svg
        assert re.search(r" 0h \d\dm ", svg)  # the STAT one is due within the hour
        assert "2d 0h" in svg or "1d 23h" in svg


async def test_the_worklist_at_200_columns_shows_institution_study_and_peer() -> None:
    node = make_node()
    app = RadmeshApp(node)
    async with app.run_test(size=LARGE) as pilot:
        await pilot.pause()
        keys = worklist_keys(app)
        assert keys == ["dir", "priority", "question", "site", "study", "peer", "state", "due"]
        table = app.screen.query_one("#worklist", DataTable)
        rows = [[str(cell) for cell in table.get_row_at(i)] for i in range(table.row_count)]
        assert rows[0][3:6] == ["St Elsewhere PEER-NE ✔ verified", "CT 24 im 67Y F",
                                "Dr Neuro (PEER-NE, verified)"]  # fmt: skip
        assert rows[1][3:6] == [
            "Ortho Clinic PEER-MS ! unverified",
            "-",
            "Dr Bones (PEER-MS, unverified)",
        ]
        svg = svg_text(app)
        assert "St Elsewhere" in svg
        assert "CT 24 im 67Y F" in svg
        await pilot.resize_terminal(*SMALL)  # and back when the terminal shrinks
        await pilot.pause()
        assert "study" not in worklist_keys(app)


def test_worklist_cells() -> None:
    item = ConsultItem("c", True, "q", "ABCDEFG", "stat", "offered", 0.0, peer_trust="verified")
    assert str(site_cell(item, 20)) == "ABCDEFG ✔ verified"  # no institution: the short id
    long = ConsultItem("c", True, "q", "ABCDEFG", "stat", "offered", 0.0,
                       peer_institution="Royal Infirmary of Somewhere [b]x[/b]",
                       peer_trust="unverified")  # fmt: skip
    cell = str(site_cell(long, 20))
    assert cell.endswith(" ! unverified")  # the badge is never the part cut off
    assert len(cell) <= 20
    assert str(study_cell(item)) == "-"  # the study is not here yet
    here = ConsultItem("c", True, "q", "P", "stat", "offered", 0.0, modality="MR", images=3,
                       patient_age="045Y", patient_sex="M")  # fmt: skip
    assert str(study_cell(here)) == "MR 3 im 45Y M"


def test_columns_at_each_width_fit_the_screen() -> None:
    for width in (80, 100, 120, 160, 200):
        columns = worklist_columns(width)
        keys = [c.key for c, _ in columns]
        assert {"priority", "question", "due"} <= set(keys)
        assert sum(w + 2 for _, w in columns) <= width


async def through_changes(
    app: RadmeshApp, pilot: Pilot[None], keys: tuple[str, ...], check: Callable[[str], None]
) -> None:
    """``check(when)`` once the viewer is open, after each key, a light theme, a narrow
    terminal and a wide one again."""
    check("opened")
    for key in keys:
        await press(pilot, key)
        await app.workers.wait_for_complete()
        await pilot.pause()
        check(key)
    app.theme = "textual-light"
    await pilot.pause()
    check("theme")
    for when, size in (("narrow", (100, 30)), ("wide again", (232, 64))):
        await pilot.resize_terminal(*size)
        await pilot.pause()
        check(when)


async def test_widgets_that_keep_their_lines_give_what_rendering_them_afresh_gives() -> None:
    """The screen, its containers, the bars and edge letters around the image and the key
    bar hand the compositor the lines they gave it before while Textual marks none dirty
    (tui.widgets.kept): after steps, focus moves, a theme, a narrow terminal and back, what
    they give is what rendering them from nothing gives."""
    node = make_node()
    app = RadmeshApp(node)
    async with app.run_test(size=(232, 64)) as pilot:
        viewer = await open_viewer(pilot, node)
        kept = [
            viewer,
            *viewer.query("KeptHeader, KeptHorizontal, KeptVertical, KeptStatic"),
            *viewer.query("OverlayBar, EdgeMarker"),
            viewer.query_one(Footer),
        ]
        assert len(kept) == 12

        def same_as_afresh(when: str) -> None:
            for widget in kept:
                crop = Region(0, 0, *widget.outer_size)
                given = [list(line) for line in widget.render_lines(crop)]
                assert widget.render_lines(crop) is widget.render_lines(crop)  # kept
                widget._styles_cache.clear()  # every line rendered again
                afresh = [list(line) for line in Widget.render_lines(widget, crop)]
                assert given == afresh, (when, widget)

        await through_changes(app, pilot, ("j", "j", "s", "escape", "i", "n"), same_as_afresh)


async def test_the_image_hands_over_what_textual_would_render_from_its_lines() -> None:
    """ImageView gives the compositor its rows itself when Textual would add nothing to
    them: after steps, invert, focus moves, a theme and a narrow terminal, every crop of
    them is what Textual's styled rendering gives; with a border, Textual renders them."""
    node = make_node()
    app = RadmeshApp(node)
    async with app.run_test(size=(232, 64)) as pilot:
        viewer = await open_viewer(pilot, node)
        view = viewer.view

        def same_as_textual(when: str) -> None:
            width, height = view.size
            assert view._plain(), when
            for crop in (
                Region(0, 0, width, height),
                Region(3, 2, width - 9, height // 2),  # a part, as an overlapping screen asks
            ):
                view._styles_cache.clear()
                textual = [list(line) for line in Widget.render_lines(view, crop)]
                assert [list(line) for line in view.render_lines(crop)] == textual, when

        await through_changes(app, pilot, ("j", "j", "i", "tab", "tab"), same_as_textual)

        view.styles.border = ("round", "red")  # styled: Textual's own rendering again
        await pilot.pause()
        assert not view._plain()
        crop = Region(0, 0, *view.outer_size)
        assert [list(line) for line in view.render_lines(crop)] == [
            list(line) for line in Widget.render_lines(view, crop)
        ]
        assert view.render_lines(crop)[0].text.startswith("╭")


def test_a_textual_without_dirty_lines_renders_every_time() -> None:
    """kept_lines leans on Textual's private ``_styles_cache._dirty_lines``: if a Textual
    release drops it, lines are rendered each time, never handed back stale."""
    from tui.widgets.kept import kept_lines

    class Bare:  # no _styles_cache at all, as a changed Textual might have
        outer_size = size = (4, 1)
        auto_links = False

        def get_line_filters(self) -> list[object]:
            return []

    calls: list[Region] = []

    def render(crop: Region) -> list[Strip]:
        calls.append(crop)
        return [Strip.blank(4)]

    crop = Region(0, 0, 4, 1)
    widget = Bare()
    kept_lines(widget, crop, render)  # type: ignore[arg-type]
    kept_lines(widget, crop, render)  # type: ignore[arg-type]
    assert calls == [crop, crop]
