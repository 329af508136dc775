"""Full-resolution images through a terminal graphics protocol, as Textual strips.

textual-image encodes (kitty graphics with Unicode placeholders, sixel); these
turn one RGB canvas into the strips the image view returns line by line.

- kitty: each cell is a placeholder character naming the image, its row and
  column, so any cell can be replaced by text: labels sit on top of the image.
- sixel: the picture is painted over the widget's area from its last line, so
  nothing can be drawn on top of it; the view keeps text out of the image rows.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
from PIL import Image as PILImage
from rich.console import Console
from rich.control import Control
from rich.segment import ControlType, Segment
from rich.style import Style
from textual.geometry import Region
from textual.strip import Strip

from tui.halfblock import Label, with_labels

PLACEHOLDER_CODEPOINTS = 4  # placeholder + row, column and image-id diacritics
_NULL = Style()


class KittyImage:
    """One image at a time in the terminal: the previous one is deleted when replaced.

    A redraw whose pixels did not change (the overlay text, a label, the mouse position in mm)
    keeps the image the terminal already has and only rebuilds the cells.
    """

    def __init__(self) -> None:
        self._image: object | None = None
        self._shown: tuple[npt.NDArray[np.uint8], tuple[int, int], list[Segment]] | None = None
        self._console = Console(file=io.StringIO(), color_system="truecolor", width=1000)
        self.images_sent = 0

    def lines(self, rgb: npt.NDArray[np.uint8], cells: tuple[int, int]) -> list[Segment]:
        """The placeholder line of each cell row; the image goes to the terminal only if
        these pixels are not the ones it has already."""
        shown = self._shown
        if shown is not None and shown[1] == cells and np.array_equal(shown[0], rgb):
            return shown[2]
        self.close()
        width, height = cells
        image = _native_tgp()(PILImage.fromarray(rgb, "RGB"), width=width, height=height)
        self._image = image
        options = self._console.options.update(width=width, height=height)
        rendered = image.__rich_console__(self._console, options)
        lines = [line for line in rendered if isinstance(line, Segment)]
        self.images_sent += 1
        self._shown = (rgb.copy(), cells, lines)
        return lines

    @staticmethod
    def row(
        lines: list[Segment], row: int, width: int, marks: Mapping[int, Label] | None = None
    ) -> Strip:
        """Cell row ``row`` of the image, with ``marks`` (column -> text cell) over it."""
        if row >= len(lines):
            return Strip([Segment(" " * width)], width)
        segment = lines[row]
        text, style = segment.text.rstrip("\n"), segment.style
        if not marks:
            return Strip([Segment(text, style)], width)
        step = PLACEHOLDER_CODEPOINTS
        cells = [Segment(text[at : at + step], style) for at in range(0, width * step, step)]
        return Strip(Segment.simplify(with_labels(cells, marks)), width)

    def strips(
        self,
        rgb: npt.NDArray[np.uint8],
        cells: tuple[int, int],
        labels: Mapping[tuple[int, int], Label],
    ) -> list[Strip]:
        width, height = cells
        lines = self.lines(rgb, cells)
        by_row: dict[int, dict[int, Label]] = {}
        for (row, col), label in labels.items():
            by_row.setdefault(row, {})[col] = label
        return [
            self.row(lines, row, width, by_row.get(row)) for row in range(min(height, len(lines)))
        ]

    def close(self) -> None:
        self._shown = None
        if self._image is not None:
            self._image.cleanup()  # type: ignore[attr-defined]
            self._image = None


@functools.cache
def _native_tgp() -> type:
    """textual-image's kitty image, sending the picture at the size we drew it: kitty scales
    it to its cells itself, so upscaling to the terminal's pixels first only costs time."""
    from textual_image.renderable.tgp import Image as TGPImage

    class NativeTGPImage(TGPImage):
        def _send_image_to_terminal(self, width: int, height: int) -> None:
            data = self._image_data
            super()._send_image_to_terminal(data.width, data.height)

    return NativeTGPImage


class SixelImage:
    """Sixel data for the canvas, emitted with the widget's last image line."""

    def __init__(self) -> None:
        self.data = ""
        self.images_sent = 0
        self._encoded: npt.NDArray[np.uint8] | None = None

    def encode(self, rgb: npt.NDArray[np.uint8]) -> None:
        """Encode the canvas, unless it is the one encoded last (sixel encoding is slow)."""
        from textual_image._sixel import image_to_sixels

        if self._encoded is not None and np.array_equal(self._encoded, rgb):
            return
        self.data = image_to_sixels(PILImage.fromarray(rgb, "RGB"))
        self._encoded = rgb.copy()
        self.images_sent += 1

    def last_line(self, region: Region, width: int) -> Strip:
        """Move to the image's top-left cell, paint, move back past its bottom-right."""
        return Strip(
            [
                Segment(Control.move_to(region.x, region.y).segment.text, _NULL),
                Segment(self.data, _NULL, control=((ControlType.CURSOR_FORWARD, 0),)),
                Segment(Control.move_to(region.right, region.bottom).segment.text, _NULL),
            ],
            width,
        )
