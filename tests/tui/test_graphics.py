"""Graphics mode: the pure decision, and the image view drawing in each mode."""

from __future__ import annotations

import io
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from rich.cells import cell_len
from textual.app import App, ComposeResult
from textual.pilot import Pilot

from node.cli import main
from tui import graphics
from tui.facade import Frame
from tui.graphics import GraphicsError, Mode, choose
from tui.imaging import Window
from tui.memory import phantom_slice
from tui.widgets.image_view import ImageView, Mark
from tui.widgets.protocol_image import KittyImage, SixelImage

TTY = {"TERM": "xterm-256color"}


def no_probe() -> Mode | None:
    raise AssertionError("the terminal must not be asked")


def test_an_explicit_request_wins_and_the_option_beats_the_environment() -> None:
    env = {**TTY, "TMUX": "/tmp/t", graphics.ENV: "sixel"}
    assert choose(None, env, True, no_probe) == "sixel"
    assert choose("kitty", env, False, no_probe) == "kitty"
    assert choose("HalfBlock", {"TERM": "xterm-kitty"}, True, no_probe) == "halfblock"


def test_an_unknown_mode_says_which_exist() -> None:
    with pytest.raises(GraphicsError, match="kitty, sixel, halfblock"):
        choose("png", TTY, True, no_probe)


@pytest.mark.parametrize(
    ("env", "is_tty"),
    [
        ({"TERM": "xterm-kitty"}, False),  # piped: no terminal to draw on
        ({"TERM": "xterm-kitty", "TMUX": "/tmp/tmux-0/default,1,0"}, True),
        ({"TERM": "screen-256color"}, True),
        ({"TERM": "tmux-256color"}, True),
        ({"TERM": "dumb"}, True),
    ],
)
def test_auto_uses_half_blocks_without_a_terminal_or_inside_a_multiplexer(
    env: dict[str, str], is_tty: bool
) -> None:
    assert choose(None, env, is_tty, no_probe) == "halfblock"
    assert choose("auto", env, is_tty, no_probe) == "halfblock"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"TERM": "xterm-kitty"}, "kitty"),
        ({"TERM": "xterm-256color", "KITTY_WINDOW_ID": "1"}, "kitty"),
        ({"TERM": "foot"}, "sixel"),
        ({"TERM": "xterm-256color", "TERM_PROGRAM": "WezTerm"}, "sixel"),
    ],
)
def test_auto_trusts_what_the_environment_says(env: dict[str, str], expected: Mode) -> None:
    assert choose(None, env, True, no_probe) == expected


def test_auto_asks_the_terminal_otherwise_and_falls_back_to_half_blocks() -> None:
    assert choose(None, TTY, True, lambda: "sixel") == "sixel"
    assert choose(None, TTY, True, lambda: "kitty") == "kitty"
    assert choose(None, TTY, True, lambda: None) == "halfblock"


def test_without_setup_the_widgets_use_half_blocks() -> None:
    assert graphics.mode() == "halfblock"
    assert graphics.cell_pixels() == (1, 2)


# --- the widget in each mode -------------------------------------------------------------------

FRAME = Frame(phantom_slice(64, 0), 1.0, -1024.0, (1.0, 1.0), True, window=Window(40, 400))


class ViewApp(App[None]):
    def __init__(self, mode: Mode) -> None:
        super().__init__()
        self.mode = mode

    def compose(self) -> ComposeResult:
        yield ImageView(id="image", mode=self.mode, cell_pixels=(4, 8))

    def on_mount(self) -> None:
        view = self.query_one(ImageView)
        view.overlay_lines = ("Im 1/1",)
        view.marks = (Mark("cursor", ((32.0, 32.0),), "#ff00ff", "Dr Neuro"),)
        view.show(FRAME)


def lines_of(view: ImageView) -> list[str]:
    return ["".join(seg.text for seg in view.render_line(y)) for y in range(view.size.height)]


async def test_half_block_mode_draws_cells_with_text_on_top() -> None:
    app = ViewApp("halfblock")
    async with app.run_test(size=(40, 12)) as pilot:
        await pilot.pause()
        view = app.query_one(ImageView)
        text = "\n".join(lines_of(view))
        assert "▀" in text
        assert "Im 1/1" in text
        assert "Dr Neuro" in text
        assert view.geometry() is not None
        assert view.geometry().grid == (40, 24)  # type: ignore[union-attr]


async def test_kitty_mode_sends_the_image_and_places_text_over_its_placeholders(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    terminal = io.StringIO()
    monkeypatch.setattr(sys, "__stdout__", terminal)
    app = ViewApp("kitty")
    async with app.run_test(size=(40, 12)) as pilot:
        await pilot.pause()
        view = app.query_one(ImageView)
        text = "\n".join(lines_of(view))
        assert chr(0x10EEEE) in text  # image cells are kitty placeholders
        assert "▀" not in text
        assert "Im 1/1" in text
        assert "Dr Neuro" in text
        geom = view.geometry()
        assert geom is not None
        # The 64-pixel phantom would be magnified 1.5x on 160x96 pixels: kitty scales it
        # itself, so it is drawn at its own resolution, not upscaled.
        assert geom.grid == (107, 64)
        assert min(geom.scale) == pytest.approx(1.0, abs=0.01)
    sent = terminal.getvalue()
    assert "\x1b_G" in sent  # image data went to the terminal
    assert "a=p" in sent  # and a virtual placement for the placeholders
    assert "a=d" in sent  # the last image was deleted when the view went away


async def test_sixel_mode_paints_the_image_and_keeps_text_in_a_band_below() -> None:
    app = ViewApp("sixel")
    async with app.run_test(size=(40, 12)) as pilot:
        await pilot.pause()
        view = app.query_one(ImageView)
        lines = lines_of(view)
        rows = view.image_rows()
        assert rows < 12
        assert "\x1bP" in lines[rows - 1]  # the sixel picture, emitted with its last line
        band = "\n".join(lines[rows:])
        assert "Im 1/1" in band
        assert "cursors: +Dr Neuro" in band
        assert "Im 1/1" not in "\n".join(lines[:rows])


@asynccontextmanager
async def painted_once(
    mode: Mode, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Pilot[None], ImageView, KittyImage | SixelImage]]:
    """The view drawn in ``mode`` (its output thrown away): one image sent so far."""
    monkeypatch.setattr(sys, "__stdout__", io.StringIO())
    app = ViewApp(mode)
    async with app.run_test(size=(40, 12)) as pilot:
        await pilot.pause()
        view = app.query_one(ImageView)
        images = view._kitty or view._sixel
        assert images is not None
        assert images.images_sent == 1
        yield pilot, view, images


async def redrawn(pilot: Pilot[None], view: ImageView) -> None:
    view.redraw()
    await pilot.pause()


@pytest.mark.parametrize("mode", ["kitty", "sixel"])
async def test_a_redraw_with_the_same_pixels_does_not_send_the_image_again(
    mode: Mode, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with painted_once(mode, monkeypatch) as (pilot, view, images):
        view.overlay_lines = ("Im 1/1  x 12.0 mm",)  # what a mouse move over the image changes
        await redrawn(pilot, view)
        assert images.images_sent == 1
        assert "x 12.0 mm" in "\n".join(lines_of(view))
        view.window = Window(400, 1800)  # new pixels: a new image
        await redrawn(pilot, view)
        assert images.images_sent == 2


@pytest.mark.parametrize("mode", ["kitty", "sixel"])
async def test_a_cursor_moving_over_a_picture_does_not_send_it_again(
    mode: Mode, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with painted_once(mode, monkeypatch) as (pilot, view, images):
        for x in (10.0, 20.0, 40.0):  # a remote participant's cursor moving
            view.marks = (Mark("cursor", ((x, 30.0),), "#ff00ff", "Dr Neuro"),)
            await redrawn(pilot, view)
        assert images.images_sent == 1
        text = "\n".join(lines_of(view))
        if mode == "kitty":  # the cursor is a cell over the image, beside its name
            geom = view.geometry()
            assert geom is not None
            col, row = geom.image_to_cell((40.0, 30.0))
            at = 0  # the cell where the "+" is (a kitty placeholder is 4 code points)
            for segment in view.render_line(row):
                if segment.text == "+":
                    break
                at += cell_len(segment.text)
            assert at == col
        else:  # named in the band under the picture
            assert "cursors: +Dr Neuro" in text
        view.marks = (Mark("arrow", ((5.0, 5.0), (30.0, 30.0)), "#ffff00"),)
        await redrawn(pilot, view)  # an annotation is drawn into the picture: a new one goes out
        assert images.images_sent == 2


def test_radmesh_tui_refuses_an_unknown_graphics_mode_before_starting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv(graphics.ENV, "png")
    monkeypatch.setattr(graphics, "_chosen", None)  # undecided, as in a new process
    assert main(["--home", str(tmp_path / "nowhere"), "tui"]) == 2
    assert "use one of auto, kitty, sixel, halfblock" in capsys.readouterr().err
