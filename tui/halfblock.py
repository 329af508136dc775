"""Half-block rendering: one terminal cell shows two stacked pixels.

Each cell is "▀" with the foreground set to the upper pixel and the background
to the lower one. Building a Rich ``Style`` is the slow part (it parses
colours), so styles are cached by the packed (upper, lower) colour pair;
a greyscale image only ever needs at most 65,536 of them. The per-frame work is
vectorised packing, one ``np.unique`` to find new pairs, and one list
comprehension per row.

What goes to the terminal is what costs over SSH: Textual writes every segment as
``ESC[<colours>m<text>ESC[0m``, so the renderer keeps segments few and short:

- a run of equal cells is one segment;
- a cell whose two pixels are equal is a space on that background (no foreground code,
  one byte instead of the three of "▀");
- on a 256-colour terminal (``palette=True``) pixels are mapped to the xterm palette
  first, exactly as Rich would when writing them, so cells that would look the same
  also merge into one segment instead of repeating the same escape code.

The image is built row by row (:meth:`HalfBlockRenderer.row`) so a view can rebuild only
the rows that changed. :meth:`HalfBlockRenderer.rows` also keeps the rows it built, by their
keys (bounded: at most ``MAX_CACHED_SEGMENTS`` segments, oldest out first): a row seen
before, in this slice or another (the air above a body, a slice scrolled back to), is the
same ``Strip`` again, which Textual's own per-strip caches then also know.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt
from rich.cells import cell_len
from rich.color import Color, ColorSystem, ColorType
from rich.color_triplet import ColorTriplet
from rich.segment import Segment
from rich.style import Style
from textual.strip import Strip

from node.core.display import printable

UPPER_HALF = "▀"
MAX_CACHED_STYLES = 200_000
MAX_CACHED_SEGMENTS = 100_000  # rows kept by rows(): about 10 MB at most
CUBE_LEVELS = (0, 95, 135, 175, 215, 255)  # the xterm 256-colour cube's steps

Label = tuple[str, Style]
Keys = npt.NDArray[np.int64]


def palette_rgb(number: int) -> tuple[int, int, int]:
    """The RGB an xterm-256 colour number stands for (16..255)."""
    if number >= 232:
        v = 8 + 10 * (number - 232)
        return v, v, v
    n = number - 16
    return CUBE_LEVELS[n // 36], CUBE_LEVELS[(n // 6) % 6], CUBE_LEVELS[n % 6]


def palette_colour(number: int) -> Color:
    """An 8-bit colour that carries its RGB too: Textual's ANSI filter would otherwise turn
    a colour without one into truecolor, and the number would be lost on the way out."""
    return Color(
        f"color({number})", ColorType.EIGHT_BIT, number, ColorTriplet(*palette_rgb(number))
    )


def palette_numbers(rgb: npt.NDArray[np.uint8], cache: dict[int, int]) -> Keys:
    """xterm-256 colour number of each pixel (h, w) of an RGB (h, w, 3) or grey (h, w) image,
    as Rich downgrades truecolor: greys to the grey ramp (26 levels, black and white from the
    cube), colours to the cube."""
    r = (rgb if rgb.ndim == 2 else rgb[..., 0]).astype(np.int64)
    level = np.rint(r * (25.0 / 255.0)).astype(np.int64)
    numbers: Keys = np.where(level == 0, 16, np.where(level == 25, 231, 231 + level))
    if rgb.ndim == 2:
        return numbers
    g = rgb[..., 1].astype(np.int64)
    b = rgb[..., 2].astype(np.int64)
    coloured = (r != g) | (g != b)
    if coloured.any():
        packed = (r[coloured] << 16) | (g[coloured] << 8) | b[coloured]
        unique, inverse = np.unique(packed, return_inverse=True)
        mapped = []
        for value in unique.tolist():
            number = cache.get(value)
            if number is None:
                colour = Color.from_rgb(value >> 16, (value >> 8) & 0xFF, value & 0xFF)
                number = colour.downgrade(ColorSystem.EIGHT_BIT).number or 16
                cache[value] = number
            mapped.append(number)
        numbers[coloured] = np.asarray(mapped, dtype=np.int64)[inverse.reshape(-1)]
    return numbers


class HalfBlockRenderer:
    """Turns an (h, w, 3) uint8 RGB array into one Textual ``Strip`` per cell row.

    ``palette``: map to the xterm-256 palette first (a 256-colour terminal); ``compact``
    False writes every cell as "▀" (how this renderer worked before; the terminal
    benchmark's baseline).
    """

    def __init__(self, *, palette: bool = False, compact: bool = True) -> None:
        self.palette = palette
        self.compact = compact
        self._styles: dict[int, Style] = {}
        self._segments: dict[int, Segment] = {}
        self._numbers: dict[int, int] = {}
        self._rows: dict[bytes, Strip] = {}  # keys of a row (no labels) -> its strip, oldest first
        self._row_segments = 0  # segments in self._rows

    def configure(self, *, palette: bool, compact: bool) -> bool:
        """Switch palette/compact; True if that changed (keys from before mean nothing now)."""
        if (palette, compact) == (self.palette, self.compact):
            return False
        self.palette, self.compact = palette, compact
        self._styles.clear()
        self._segments.clear()
        self._rows.clear()
        self._row_segments = 0
        return True

    def _split(self, key: int) -> tuple[int, int]:
        return (key >> 8, key & 0xFF) if self.palette else (key >> 24, key & 0xFFFFFF)

    def _colour(self, value: int) -> Color:
        if self.palette:
            return palette_colour(value)
        return Color.from_rgb(value >> 16, (value >> 8) & 0xFF, value & 0xFF)

    def _style_for(self, key: int) -> Style:
        up, low = self._split(key)
        if up == low and self.compact:
            return Style(bgcolor=self._colour(low))
        return Style(color=self._colour(up), bgcolor=self._colour(low))

    def _glyph(self, key: int) -> str:
        up, low = self._split(key)
        return " " if up == low and self.compact else UPPER_HALF

    def keys(self, rgb: npt.NDArray[np.uint8]) -> Keys:
        """Packed (upper, lower) colour per cell, shape (h // 2, w), of an RGB (h, w, 3) or a
        grey (h, w) image (the same keys as its RGB)."""
        h = rgb.shape[0] - rgb.shape[0] % 2
        if self.palette:
            numbers = palette_numbers(rgb[:h], self._numbers)
            paired: Keys = (numbers[0::2] << 8) | numbers[1::2]
            return paired
        if rgb.ndim == 2:
            packed = rgb[:h].astype(np.int64) * 0x010101
        else:
            packed = (
                (rgb[:h, :, 0].astype(np.int64) << 16)
                | (rgb[:h, :, 1].astype(np.int64) << 8)
                | rgb[:h, :, 2].astype(np.int64)
            )
        result: Keys = (packed[0::2] << 24) | packed[1::2]
        return result

    def prepare(self, keys: Keys) -> None:
        """Build the styles of colour pairs not seen yet (once per frame, vectorised)."""
        styles = self._styles
        if len(styles) > MAX_CACHED_STYLES:
            styles.clear()
            self._segments.clear()
        for key in np.unique(keys).tolist():
            if key not in styles:
                styles[key] = self._style_for(key)
                self._segments[key] = Segment(self._glyph(key), styles[key])

    def row(self, keys: npt.NDArray[np.int64], labels: Mapping[int, Label] | None = None) -> Strip:
        """One cell row from its keys (after :meth:`prepare`); ``labels``: column -> text cell."""
        width = len(keys)
        segments_of = self._segments
        if labels:
            row_segments = with_labels([segments_of[k] for k in keys.tolist()], labels)
            return Strip(Segment.simplify(row_segments), width)
        return self._plain_rows(keys[None, :])[0]

    def _plain_rows(self, keys: Keys) -> list[Strip]:
        """A row without labels for each row of ``keys`` (n, w), after :meth:`prepare`: runs
        of equal cells become one segment (background and flat regions are cheap), found for
        all the rows at once."""
        width = keys.shape[1]
        styles, segments_of = self._styles, self._segments
        change = np.ones(keys.shape, dtype=bool)
        change[:, 1:] = keys[:, 1:] != keys[:, :-1]
        rows, cols = np.nonzero(change)  # row by row, left to right
        all_keys, all_starts = keys[rows, cols].tolist(), cols.tolist()
        out, at = [], 0
        for count in np.count_nonzero(change, axis=1).tolist():
            run_keys, starts = all_keys[at : at + count], all_starts[at : at + count]
            at += count
            ends = [*starts[1:], width]
            out.append(
                Strip(
                    [
                        segments_of[k]
                        if e - s == 1
                        else Segment(segments_of[k].text * (e - s), styles[k])
                        for k, s, e in zip(run_keys, starts, ends, strict=True)
                    ],
                    width,
                )
            )
        return out

    def rows(
        self, keys: Keys, ys: Sequence[int], labels: Mapping[int, Mapping[int, Label]]
    ) -> list[Strip]:
        """Rows ``ys`` of ``keys`` (no :meth:`prepare` needed), each with its row's labels
        (row -> column -> text cell): as :meth:`row` builds them, a row without labels from
        the rows kept when it was built before."""
        kept = self._rows
        out: list[Strip | None] = []
        build: list[int] = []
        for i, y in enumerate(ys):
            strip = None if labels.get(y) else kept.pop(keys[y].tobytes(), None)
            if strip is not None:
                kept[keys[y].tobytes()] = strip  # the newest again
            else:
                build.append(i)
            out.append(strip)
        if build:
            self.prepare(keys[[ys[i] for i in build]])
            plain = [i for i in build if not labels.get(ys[i])]
            for i, strip in zip(plain, self._plain_rows(keys[[ys[i] for i in plain]]), strict=True):
                out[i] = strip
                self._keep(keys[ys[i]].tobytes(), strip)
            for i in build:
                if out[i] is None:
                    out[i] = self.row(keys[ys[i]], labels.get(ys[i]))
        return [strip for strip in out if strip is not None]

    def _keep(self, key: bytes, strip: Strip) -> None:
        kept = self._rows
        if key in kept:
            return
        kept[key] = strip
        self._row_segments += len(strip)
        while self._row_segments > MAX_CACHED_SEGMENTS and kept:
            self._row_segments -= len(kept.pop(next(iter(kept))))

    def strips(
        self,
        rgb: npt.NDArray[np.uint8],
        labels: Mapping[tuple[int, int], Label] | None = None,
    ) -> list[Strip]:
        """``labels`` maps (row, col) cells to a character and style drawn on top."""
        keys = self.keys(rgb)
        self.prepare(keys)
        height, width = keys.shape
        by_row = labels_by_row(labels or {}, height, width)
        return [self.row(keys[row], by_row.get(row)) for row in range(height)]


def labels_by_row(
    labels: Mapping[tuple[int, int], Label], height: int, width: int
) -> dict[int, dict[int, Label]]:
    """Labels inside a height x width grid, as row -> column -> label."""
    by_row: dict[int, dict[int, Label]] = {}
    for (row, col), label in labels.items():
        if 0 <= col < width and 0 <= row < height:
            by_row.setdefault(row, {})[col] = label
    return by_row


def label_cells(
    text: str, row: int, col: int, style: Style, width: int
) -> dict[tuple[int, int], Label]:
    """Cells for a short text label starting at (row, col), clipped to the width.

    Labels carry peer text (names, arrow texts): each cell is written to the terminal as
    is, so control characters are replaced first (an ESC here would reach it raw). A
    double-width character takes two cells (the next is at +2), one of no width none.
    """
    cells: dict[tuple[int, int], Label] = {}
    for ch in printable(text[: max(0, width - col)]):
        size = cell_len(ch)
        if col + size > width:
            break
        if size and col >= 0:
            cells[(row, col)] = (ch, style)
        col += size
    return cells


def with_labels(cells: list[Segment], labels: Mapping[int, Label]) -> list[Segment]:
    """A row of one segment per cell with ``labels`` (column -> text cell) over it, exactly
    as wide on the terminal: a double-width character covers the next cell too (a label
    there gives way), and one with no room for it, or of no width, shows as a space."""
    out: list[Segment | None] = list(cells)
    width, covered = len(cells), -1
    for col in sorted(labels):
        if not 0 <= col < width or col == covered:
            continue
        char, style = labels[col]
        char = char[:1] or " "
        size = cell_len(char)
        if size == 2 and col + 1 < width:
            out[col + 1], covered = None, col + 1
        elif size != 1:
            char = " "
        out[col] = Segment(char, style)
    return [segment for segment in out if segment is not None]
