"""Truecolor half-block rendering: one terminal cell shows two stacked pixels.

Each cell is "▀" with the foreground set to the upper pixel and the background
to the lower one. Building a Rich ``Style`` is the slow part (it parses
colours), so styles are cached by the packed 48-bit (upper, lower) colour pair;
a greyscale image only ever needs at most 65,536 of them. The per-frame work is
vectorised packing, one ``np.unique`` to find new pairs, and one list
comprehension per row.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
from rich.color import Color
from rich.segment import Segment
from rich.style import Style
from textual.strip import Strip

from node.core.display import printable

UPPER_HALF = "▀"
MAX_CACHED_STYLES = 200_000

Label = tuple[str, Style]


class HalfBlockRenderer:
    """Turns an (h, w, 3) uint8 RGB array into one Textual ``Strip`` per cell row."""

    def __init__(self) -> None:
        self._styles: dict[int, Style] = {}
        self._segments: dict[int, Segment] = {}

    def _style_for(self, key: int) -> Style:
        up, low = key >> 24, key & 0xFFFFFF
        return Style(
            color=Color.from_rgb(up >> 16, (up >> 8) & 0xFF, up & 0xFF),
            bgcolor=Color.from_rgb(low >> 16, (low >> 8) & 0xFF, low & 0xFF),
        )

    def keys(self, rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.int64]:
        """Packed (upper << 24 | lower) colour per cell, shape (h // 2, w)."""
        h = rgb.shape[0] - rgb.shape[0] % 2
        packed = (
            (rgb[:h, :, 0].astype(np.int64) << 16)
            | (rgb[:h, :, 1].astype(np.int64) << 8)
            | rgb[:h, :, 2].astype(np.int64)
        )
        result: npt.NDArray[np.int64] = (packed[0::2] << 24) | packed[1::2]
        return result

    def strips(
        self,
        rgb: npt.NDArray[np.uint8],
        labels: Mapping[tuple[int, int], Label] | None = None,
    ) -> list[Strip]:
        """``labels`` maps (row, col) cells to a character and style drawn on top."""
        keys = self.keys(rgb)
        styles = self._styles
        if len(styles) > MAX_CACHED_STYLES:
            styles.clear()
            self._segments.clear()
        segments_of = self._segments
        for key in np.unique(keys).tolist():
            if key not in styles:
                styles[key] = self._style_for(key)
                segments_of[key] = Segment(UPPER_HALF, styles[key])
        height, width = keys.shape
        by_row: dict[int, list[tuple[int, Label]]] = {}
        for (row, col), label in (labels or {}).items():
            if 0 <= col < width and 0 <= row < height:
                by_row.setdefault(row, []).append((col, label))
        # Runs of equal cells become one segment: background and flat regions are cheap.
        change = np.ones((height, width), dtype=bool)
        change[:, 1:] = keys[:, 1:] != keys[:, :-1]
        result = []
        for row in range(height):
            if row in by_row:
                row_segments = [segments_of[k] for k in keys[row].tolist()]
                for col, (char, style) in by_row[row]:
                    row_segments[col] = Segment(char[:1] or " ", style)
                result.append(Strip(Segment.simplify(row_segments), width))
                continue
            starts = np.flatnonzero(change[row]).tolist()
            run_keys = keys[row, starts].tolist()
            ends = [*starts[1:], width]
            row_segments = [
                segments_of[k] if e - s == 1 else Segment(UPPER_HALF * (e - s), styles[k])
                for k, s, e in zip(run_keys, starts, ends, strict=True)
            ]
            result.append(Strip(row_segments, width))
        return result


def label_cells(
    text: str, row: int, col: int, style: Style, width: int
) -> dict[tuple[int, int], Label]:
    """Cells for a short text label starting at (row, col), clipped to the width.

    Labels carry peer text (names, arrow texts): each cell is written to the terminal as
    is, so control characters are replaced first (an ESC here would reach it raw).
    """
    shown = printable(text[: max(0, width - col)])
    return {(row, col + i): (ch, style) for i, ch in enumerate(shown) if 0 <= col + i < width}
