"""Half-block cells: upper pixel as foreground, lower pixel as background."""

from __future__ import annotations

import numpy as np
import pytest
from rich.style import Style

from tui import halfblock
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


@pytest.mark.parametrize("palette", [False, True])
def test_a_grey_image_has_the_keys_of_its_rgb(palette: bool) -> None:
    grey = np.random.default_rng(3).integers(0, 256, (9, 17)).astype(np.uint8)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    renderer = HalfBlockRenderer(palette=palette)
    assert np.array_equal(renderer.keys(grey), renderer.keys(rgb))
    assert [list(s) for s in renderer.strips(grey)] == [list(s) for s in renderer.strips(rgb)]


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


def test_rows_kept_by_their_keys_are_the_rows_built_afresh() -> None:
    """rows() hands back a row it built before when its keys come again (another slice,
    the same air above the body), and what it hands back is what a fresh renderer builds."""
    rng = np.random.default_rng(7)
    frames = [rng.integers(0, 4, (8, 6, 3), dtype=np.uint8) * 60 for _ in range(3)]
    frames.append(frames[0].copy())  # scrolled back to the first slice
    frames[2][:2] = frames[1][:2]  # and a slice whose top row is the one before's
    renderer = HalfBlockRenderer()
    shown = []
    for rgb in frames:
        keys = renderer.keys(rgb)
        shown.append(renderer.rows(keys, range(keys.shape[0]), {}))
    for rgb, strips in zip(frames, shown, strict=True):
        assert strips == HalfBlockRenderer().strips(rgb)
    assert shown[3][2] is shown[0][2]  # the same row again: the same strip
    assert shown[2][0] is shown[1][0]


def test_a_row_with_a_label_is_built_with_it_and_not_kept() -> None:
    rgb = np.zeros((2, 4, 3), dtype=np.uint8)
    renderer = HalfBlockRenderer()
    keys = renderer.keys(rgb)
    tag = Style(color="yellow")
    (labelled,) = renderer.rows(keys, [0], {0: {1: ("x", tag)}})
    assert "".join(s.text for s in labelled) == " x  "
    (plain,) = renderer.rows(keys, [0], {})
    assert "".join(s.text for s in plain) == "    "


def test_rows_kept_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(halfblock, "MAX_CACHED_SEGMENTS", 10)
    renderer = HalfBlockRenderer()
    for value in range(40):  # forty different rows of one segment each
        rgb = np.full((2, 3, 3), value, dtype=np.uint8)
        renderer.rows(renderer.keys(rgb), [0], {})
    assert len(renderer._rows) == 10
    assert renderer._row_segments == 10
