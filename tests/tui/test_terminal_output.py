"""What the viewer sends to the terminal: only what changed (issue 18, cheap terminal).

Behaviour, not speed: which image rows are rebuilt and repainted after a remote
cursor move, that an idle viewer writes no byte to a real pty, that low bandwidth means
256 colours and fewer paints, and that the picture at rest is the one a full render gives.
"""

from __future__ import annotations

import io
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest
from rich.color import Color, ColorSystem
from rich.console import Console
from rich.style import Style
from textual.app import App, ComposeResult
from textual.filter import ANSIToTruecolor
from textual.geometry import Region
from textual.pilot import Pilot
from textual.strip import Strip

from bench.bench_terminal import pty_app
from consult.presence import Cursor
from crypto.identity import Identity
from node.cli import main
from tui.app import RadmeshApp
from tui.facade import Frame, InstanceRef
from tui.halfblock import UPPER_HALF, HalfBlockRenderer
from tui.imaging import Window
from tui.memory import InMemoryNode, phantom_slice
from tui.screens.viewer import ViewerScreen
from tui.widgets.image_view import ImageView, Mark

SIZE = (120, 40)
WAIT_S = 10.0


def cells(strips: list[Strip]) -> list[list[tuple[str, Style | None]]]:
    """Each cell of each row as (character, style): what the terminal ends up showing."""
    rows = []
    for strip in strips:
        row: list[tuple[str, Style | None]] = []
        for segment in strip:
            row.extend((ch, segment.style) for ch in segment.text)
        rows.append(row)
    return rows


def pixel_colours(strips: list[Strip]) -> list[list[tuple[Color | None, Color | None]]]:
    """Per cell, the (upper, lower) colours it shows, whatever glyph carries them."""
    rows = []
    for row in cells(strips):
        out: list[tuple[Color | None, Color | None]] = []
        for ch, style in row:
            assert style is not None
            if ch == " ":
                out.append((style.bgcolor, style.bgcolor))
            else:
                assert ch == UPPER_HALF
                out.append((style.color, style.bgcolor))
        rows.append(out)
    return rows


def written(strips: list[Strip], colours: str = "truecolor") -> int:
    """Bytes these rows take on the terminal, as Textual writes them."""
    console = Console(file=io.StringIO(), color_system=colours, force_terminal=True)  # type: ignore[arg-type]
    return sum(len(strip.render(console).encode()) for strip in strips)


async def wait_until(pilot: Pilot[None], ready: object, what: str) -> None:
    assert callable(ready)
    deadline = time.monotonic() + WAIT_S
    while not ready():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await pilot.pause(0.02)


@asynccontextmanager
async def live_view() -> AsyncIterator[tuple[InMemoryNode, Pilot[None], ImageView, InstanceRef]]:
    """The viewer open on a live consult with one peer in it, its first slice shown: the
    node, the pilot, the image view and the slice."""
    node = InMemoryNode(Identity.generate(), slices=4, size=128)
    node.live.join("Dr Peer", "#ff8700")  # called inside the test's event loop
    app = RadmeshApp(node)
    async with app.run_test(size=SIZE) as pilot:
        viewer = ViewerScreen(node, node.studies()[0], live=True)
        await app.push_screen(viewer)
        await wait_until(
            pilot, lambda: viewer.is_attached and viewer.view.frame is not None, "slice"
        )
        await pilot.pause()
        assert viewer.current is not None
        yield node, pilot, viewer.view, viewer.current


# --- the renderer: compact output, same picture -------------------------------------------


def test_compact_cells_show_every_pixel_in_its_own_colour() -> None:
    """Spaces for equal halves and merged runs change how cells are written, not a colour."""
    rng = np.random.default_rng(3)
    grey = rng.integers(0, 4, size=(8, 24), dtype=np.uint8) * 60  # runs and equal halves
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    compact = HalfBlockRenderer().strips(rgb)
    plain = HalfBlockRenderer(compact=False).strips(rgb)
    assert any(" " in seg.text for strip in compact for seg in strip)
    assert pixel_colours(compact) == pixel_colours(plain)
    for row, strip in enumerate(compact):  # the colours are the pixels themselves
        for col, (up, low) in enumerate(pixel_colours([strip])[0]):
            assert isinstance(up, Color)
            assert isinstance(low, Color)
            assert up.get_truecolor() == tuple(rgb[2 * row, col])
            assert low.get_truecolor() == tuple(rgb[2 * row + 1, col])
    assert written(compact) < written(plain)


def test_on_256_colours_cells_merge_into_the_palette_colour_rich_would_write() -> None:
    grey = np.arange(0, 256, dtype=np.uint8).reshape(16, 16)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    rgb[0, 0] = (255, 135, 0)  # a mark's colour among the greys
    strips = HalfBlockRenderer(palette=True).strips(rgb)
    for row, line in enumerate(pixel_colours(strips)):
        for col, (up, low) in enumerate(line):
            for colour, y in ((up, 2 * row), (low, 2 * row + 1)):
                assert isinstance(colour, Color)
                r, g, b = (int(v) for v in rgb[y, col])
                expected = Color.from_rgb(r, g, b).downgrade(ColorSystem.EIGHT_BIT).number
                assert colour.number == expected
                assert colour.triplet is not None  # kept as a palette number on the way out
    # 256 greys fall on 26 palette greys: neighbours merge into runs.
    segments = sum(len(list(strip)) for strip in strips)
    assert segments < sum(len(line) for line in pixel_colours(strips))


# --- the view: only changed rows ---------------------------------------------------------


async def test_a_remote_cursor_move_rebuilds_and_repaints_only_the_rows_it_crosses() -> None:
    async with live_view() as (node, pilot, view, ref):
        node.live.peers[0].cursor(Cursor(ref.sop_uid, 0, 40.0, 64.0))
        await wait_until(pilot, lambda: any(m.kind == "cursor" for m in view.marks), "cursor")
        await pilot.pause()
        pixels, rebuilt, height = view._base, view.strips_rendered, view.size.height
        repainted: list[int] = []  # the view's rows the compositor is asked to repaint
        refresh = view.refresh

        def recording(*regions: Region, **kwargs: object) -> object:
            rows = [range(r.y, r.bottom) for r in regions] or [range(view.size.height)]
            repainted.extend(y for span in rows for y in span)
            return refresh(*regions, **kwargs)  # type: ignore[arg-type]

        view.refresh = recording  # type: ignore[method-assign,assignment]
        node.live.peers[0].cursor(Cursor(ref.sop_uid, 0, 52.0, 64.0))
        geom = view.geometry()
        assert geom is not None
        _, row = geom.image_to_cell((52.0, 64.0))
        await wait_until(pilot, lambda: row in repainted, "the cursor's row to be repainted")
        await pilot.pause()
        assert view._base is pixels  # the slice's pixels were not computed again
        assert 0 < view.strips_rendered - rebuilt <= 6  # the cross (3 rows) and its name tag
        assert height > 20
        assert set(repainted) <= set(range(row - 3, row + 4)), sorted(set(repainted))


async def test_the_image_after_many_changes_is_the_one_a_full_render_draws() -> None:
    """Row by row updates leave no stale cell: after cursor moves, marks and a new window,
    the view holds what rendering everything again gives."""
    async with live_view() as (node, pilot, view, ref):
        for x in (20.0, 60.0, 100.0):
            node.live.peers[0].cursor(Cursor(ref.sop_uid, 0, x, 30.0 + x / 2))
            await pilot.pause()
        view.marks = (*view.marks, Mark("length", ((10.0, 10.0), (90.0, 100.0)), "#00ff00", "9 mm"))
        view.redraw()
        view.window = Window(60, 300)
        view.redraw()
        view.marks = view.marks[:-1]
        view.redraw()
        await pilot.pause()
        incremental = cells(view._strips)
        view._keys = None  # forget what the terminal has: everything is rendered again
        view._renderer = HalfBlockRenderer()  # and built again: no row kept from before
        view.redraw()
        assert cells(view._strips) == incremental


@pytest.mark.parametrize("colours", ["truecolor", "256"])
async def test_the_image_view_draws_no_colour_the_ansi_to_truecolor_filter_would_change(
    colours: str,
) -> None:
    """The view leaves the app's ANSI->truecolor line filter out (it would copy every segment
    of every row repainted): right only while nothing it draws has an ANSI colour, name tags,
    marks, overlay text and its border included; an ANSI border brings the filter back."""
    async with live_view() as (node, pilot, view, ref):
        view._colour_system = lambda: colours  # type: ignore[method-assign]
        node.live.peers[0].cursor(Cursor(ref.sop_uid, 0, 40.0, 64.0))
        await wait_until(pilot, lambda: any(m.kind == "cursor" for m in view.marks), "cursor")
        truecolor = next(f for f in view.app._filters if isinstance(f, ANSIToTruecolor))
        assert truecolor.enabled
        length = Mark("length", ((10.0, 10.0), (90.0, 100.0)), "#00ff00", "9 mm")

        def shown() -> list[Strip]:
            assert truecolor not in view.get_line_filters()
            return view.render_lines(Region(0, 0, *view.outer_size))

        frame = view.frame
        for state in ("marks", "loading"):
            if state == "marks":
                view.marks, view.overlay_lines = (*view.marks, length), ("W 400 L 40", "INV")
                view.redraw()
            else:
                view.show(None)
            await pilot.pause()
            _, background = view.background_colors
            lines = shown()
            assert any(len(line) > 1 for line in lines)  # cells, not a blank view
            for line in lines:
                assert list(line.apply_filter(truecolor, background)) == list(line), state
        view.show(frame)
        view.styles.border = ("round", "ansi_red")
        assert truecolor in view.get_line_filters()


# --- low bandwidth -----------------------------------------------------------------------


@pytest.fixture
def truecolor_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setenv("COLORTERM", "truecolor")
    monkeypatch.delenv("RADMESH_LOW_BANDWIDTH", raising=False)


@pytest.mark.usefixtures("truecolor_terminal")
def test_low_bandwidth_writes_256_colours(monkeypatch: pytest.MonkeyPatch) -> None:
    node = InMemoryNode(Identity.generate())
    assert RadmeshApp(node).console.color_system == "truecolor"
    assert RadmeshApp(node, low_bandwidth=True).console.color_system == "256"
    monkeypatch.setenv("RADMESH_LOW_BANDWIDTH", "1")
    app = RadmeshApp(node)
    assert app.low_bandwidth
    assert app.console.color_system == "256"


class LowBandwidthApp(App[None]):
    low_bandwidth = True

    def compose(self) -> ComposeResult:
        yield ImageView(id="image", mode="halfblock")


def slices(n: int) -> list[Frame]:
    """Slices that differ: each its own z of the phantom."""
    return [
        Frame(phantom_slice(96, z), 1.0, -1024.0, (1.0, 1.0), True, window=Window(40, 400))
        for z in range(n)
    ]


class Clock:
    """The view's clock, stepped by the test (its timers still run on real time)."""

    def __init__(self) -> None:
        self.now = time.monotonic() + 1000.0  # after any paint the real clock timed

    def __call__(self) -> float:
        return self.now


async def test_low_bandwidth_coalesces_fast_steps_and_shows_the_last_in_full_detail() -> None:
    frames = slices(12)
    app = LowBandwidthApp()
    async with app.run_test(size=(60, 30)) as pilot:
        view = app.query_one(ImageView)
        assert view.low_bandwidth
        view._clock = clock = Clock()
        view.show(frames[0])
        await pilot.pause()
        painted = view.frames_rendered
        clock.now += 1.0
        for frame in frames[1:]:  # eleven slices 20 ms apart: a held key on a slow link
            view.show(frame)
            clock.now += 0.02
        # 0.2 s of steps: at most ten paints a second, the first at once.
        assert view.frames_rendered - painted <= 3
        await wait_until(pilot, lambda: view._pending is None, "the put-off paint")
        assert view._coarse  # still scrolling: blocks
        assert view.frames_rendered - painted <= 4
        clock.now += 1.0  # scrolling stopped
        await wait_until(pilot, lambda: not view._coarse, "full detail at rest")
        assert view.frames_rendered - painted <= 5  # not eleven paints
        assert view._shown is frames[-1]
        at_rest = cells(view._strips)
    # The last slice shown on its own (nothing fast about it): what rest must look like.
    fresh = LowBandwidthApp()
    async with fresh.run_test(size=(60, 30)) as pilot:
        other = fresh.query_one(ImageView)
        other.show(frames[-1])
        await wait_until(pilot, lambda: other._pending is None and other._base is not None, "it")
        assert not other._coarse
        assert cells(other._strips) == at_rest


async def test_low_bandwidth_draws_slices_coarse_only_while_they_arrive_fast() -> None:
    frames = slices(4)
    app = LowBandwidthApp()
    async with app.run_test(size=(60, 30)) as pilot:
        view = app.query_one(ImageView)
        view._clock = clock = Clock()
        view.show(frames[0])
        clock.now += 0.5
        view.show(frames[1])  # half a second later: a single step, drawn in detail
        assert not view._coarse
        clock.now += 0.5
        view.show(frames[2])
        clock.now += 0.05
        view.show(frames[3])  # 50 ms after the one before: scrolling fast
        await wait_until(pilot, lambda: view._pending is None, "the put-off paint")
        assert view._coarse
        # In blocks of 2x2 pixels, each cell is one colour (a space) and pairs repeat.
        glyphs = {seg.text[0] for strip in view._strips for seg in strip if seg.text.strip()}
        assert UPPER_HALF not in glyphs
        clock.now += 1.0
        await wait_until(pilot, lambda: not view._coarse, "full detail at rest")
        glyphs = {seg.text[0] for strip in view._strips for seg in strip if seg.text.strip()}
        assert UPPER_HALF in glyphs  # two pixels a cell again
        assert view._shown is frames[3]


# --- through a real terminal --------------------------------------------------------------


def test_an_idle_viewer_writes_nothing_to_its_terminal() -> None:
    """A pty: the viewer open in a live consult, nothing happening, writes 0 bytes; a remote
    cursor moving afterwards (the canary) shows the terminal is still being written to."""
    with pty_app((80, 24), slices=4, rows=128) as app:
        idle = app.read_for(2.0)
        before = app.total
        assert app.ask("cursor 40 60") == "ok"
        app.settle()
        assert app.total > before  # the canary arrived: the app was alive and drawing
        assert idle == 0


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (["--low-bandwidth"], None, True),
        ([], "1", True),
        ([], None, False),
    ],
)
def test_radmesh_tui_low_bandwidth_reaches_the_app(
    argv: list[str],
    env: str | None,
    expected: bool,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    home = str(tmp_path / "home")
    init = ["init", "--name", "Pty Node", "--country", "IE", "--no-passphrase", "--no-mdns"]
    assert main(["--home", home, *init]) == 0
    opened: list[bool] = []

    def run(self: RadmeshApp) -> None:  # the app as `radmesh tui` built it
        opened.append(self.low_bandwidth)

    monkeypatch.setattr(RadmeshApp, "run", run)
    monkeypatch.setenv("RADMESH_GRAPHICS", "halfblock")
    monkeypatch.delenv("RADMESH_LOW_BANDWIDTH", raising=False)
    if env is not None:
        monkeypatch.setenv("RADMESH_LOW_BANDWIDTH", env)
    assert main(["--home", home, "tui", *argv]) == 0
    assert opened == [expected]


class ViewApp(App[None]):
    def compose(self) -> ComposeResult:
        yield ImageView(id="image", mode="halfblock", low_bandwidth=False)


async def test_a_redraw_of_what_is_shown_paints_nothing_and_a_change_paints() -> None:
    """A slice step paints, then the screen redraws with the slice's marks: when those are
    the same, that second redraw builds nothing."""
    frames = slices(2)
    app = ViewApp()
    async with app.run_test(size=(60, 30)) as pilot:
        view = app.query_one(ImageView)
        view.show(frames[0])
        await pilot.pause()
        painted, built = view.frames_rendered, view.strips_rendered
        view.redraw()
        view.show(frames[0])
        assert (view.frames_rendered, view.strips_rendered) == (painted, built)
        view.marks = (Mark("point", ((20.0, 20.0),), "#ff0000"),)
        view.redraw()  # a mark: a paint, and the rows under it
        assert view.frames_rendered == painted + 1
        assert view.strips_rendered > built
        view.marks = ()
        view.show(frames[1])
        assert view.frames_rendered == painted + 2
        shown = cells(view._strips)
        view._keys, view._renderer = None, HalfBlockRenderer()  # everything again, afresh
        view.redraw()
        assert cells(view._strips) == shown
