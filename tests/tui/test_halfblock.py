"""Half-block cells: upper pixel as foreground, lower pixel as background."""

from __future__ import annotations

import numpy as np
from rich.style import Style

from tui.halfblock import UPPER_HALF, HalfBlockRenderer, label_cells


def test_each_cell_shows_the_upper_pixel_as_fg_and_the_lower_as_bg() -> None:
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[1, 0] = (0, 0, 255)
    rgb[0, 1] = (10, 20, 30)
    rgb[1, 1] = (10, 20, 30)
    (strip,) = HalfBlockRenderer().strips(rgb)
    segs = list(strip)
    # A cell whose two pixels are equal is a space on that colour: no foreground to send.
    assert [s.text for s in segs] == [UPPER_HALF, " "]
    first = segs[0].style
    assert first is not None
    assert first.color is not None
    assert first.bgcolor is not None
    assert first.color.get_truecolor() == (255, 0, 0)
    assert first.bgcolor.get_truecolor() == (0, 0, 255)
    second = segs[1].style
    assert second is not None
    assert second.bgcolor is not None
    assert second.bgcolor.get_truecolor() == (10, 20, 30)
    assert second.color is None
    assert strip.cell_length == 2


def test_an_odd_last_pixel_row_is_dropped_not_misaligned() -> None:
    rgb = np.zeros((5, 3, 3), dtype=np.uint8)
    assert len(HalfBlockRenderer().strips(rgb)) == 2


def test_styles_are_reused_across_frames() -> None:
    renderer = HalfBlockRenderer()
    rgb = np.full((4, 4, 3), 77, dtype=np.uint8)
    a = renderer.strips(rgb)
    b = renderer.strips(rgb)
    assert next(iter(a[0])).style is next(iter(b[1])).style


def test_labels_replace_cells_and_are_clipped_to_the_width() -> None:
    rgb = np.zeros((2, 4, 3), dtype=np.uint8)
    rgb[0] = 255  # white over black: every cell a "▀"
    tag = Style(color="yellow")
    labels = label_cells("alice", 0, 2, tag, 4)
    (strip,) = HalfBlockRenderer().strips(rgb, labels)
    assert "".join(s.text for s in strip) == UPPER_HALF * 2 + "al"
    assert strip.cell_length == 4
