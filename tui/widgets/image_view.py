"""The image canvas: one slice, with overlays, mouse and drag.

Pixels go out as truecolor half-block cells, or at full resolution through
kitty graphics or sixel (:mod:`tui.graphics` decides). Marks (annotations,
cursors) are drawn into the pixels in every mode; text (overlay lines, name
tags) is drawn as cells on top of half-blocks and kitty images, and in a band
under the image for sixel, which nothing can be drawn over.

It holds no study logic: the viewer screen gives it a frame, a window and the
marks to draw; it reports slices to step, pointer moves, clicks and W/L drags
as messages in image coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.geometry import Region
from textual.message import Message
from textual.strip import Strip
from textual.widget import Widget

from tui import graphics, imaging
from tui.facade import Frame
from tui.halfblock import HalfBlockRenderer, Label, label_cells
from tui.imaging import Geometry, Point, Window
from tui.widgets.protocol_image import KittyImage, SixelImage

TEXT_STYLE = Style(color="#ffff87", bgcolor="#000000")
LOADING_STYLE = Style(color="#ffaf00", bgcolor="#000000", bold=True)
WL_DRAG_SENSITIVITY = 4.0  # HU per display pixel of drag


def hex_rgb(colour: str) -> imaging.RGB:
    c = colour.lstrip("#")
    try:
        return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)
    except (ValueError, IndexError):
        return (255, 255, 0)


@dataclass(frozen=True)
class Mark:
    """Something to draw, in image coordinates: kind is point|arrow|length|angle|ellipse|cursor."""

    kind: str  # also "kbcursor": the keyboard cursor, drawn like a cursor
    points: tuple[Point, ...]
    colour: str
    label: str = ""


class ImageView(Widget, can_focus=True):
    DEFAULT_CSS = "ImageView { width: 1fr; height: 1fr; }"

    class Step(Message):
        def __init__(self, delta: int) -> None:
            self.delta = delta
            super().__init__()

    class Pointer(Message):
        def __init__(self, point: Point) -> None:
            self.point = point
            super().__init__()

    class Clicked(Message):
        def __init__(self, point: Point) -> None:
            self.point = point
            super().__init__()

    class Picked(Message):
        """A click without a tool (no drag): select what is under it."""

        def __init__(self, point: Point, tolerance: float) -> None:
            self.point = point
            self.tolerance = tolerance  # image pixels: about one and a half cells
            super().__init__()

    class WindowDragged(Message):
        def __init__(self, window: Window) -> None:
            self.window = window
            super().__init__()

    def __init__(
        self,
        *,
        id: str | None = None,
        mode: graphics.Mode | None = None,
        cell_pixels: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(id=id)
        self.mode: graphics.Mode = mode or graphics.mode()
        if self.mode == "halfblock":
            self.cell_pixels = graphics.HALF_BLOCK_CELL
        else:
            self.cell_pixels = cell_pixels or graphics.cell_pixels()
        self._kitty = KittyImage() if self.mode == "kitty" else None
        self._sixel = SixelImage() if self.mode == "sixel" else None
        self._image_rows = 0
        self.frame: Frame | None = None
        self._modality: npt.NDArray[np.float32] | None = None
        self.window = Window(40, 400)
        self.invert = False
        self.zoom = 1.0
        self.center: Point | None = None
        self.marks: tuple[Mark, ...] = ()
        self.overlay_lines: tuple[str, ...] = ()
        self.waiting = False
        self.tool_active = False
        self._renderer = HalfBlockRenderer()
        self._strips: list[Strip] = []
        self._drag: tuple[float, float, Window] | None = None
        self._dragged = False
        self.frames_rendered = 0

    # state from the screen
    def show(self, frame: Frame | None) -> None:
        self.frame = frame
        self._modality = frame.modality() if frame is not None else None
        self.waiting = frame is None
        self.redraw()

    def image_rows(self) -> int:
        """Cell rows the picture covers: all of them, but for sixel's text band."""
        height = self.size.height
        if self.mode != "sixel":
            return height
        band = min(len(self._text_lines()) + 1, height // 3)
        return max(1, height - band)

    def geometry(self) -> Geometry | None:
        if self.frame is None:
            return None
        cells = (self.size.width, self.image_rows())
        geom = Geometry.for_cells(
            (self.frame.pixels.shape[0], self.frame.pixels.shape[1]),
            cells,
            self.cell_pixels,
            spacing=self.frame.spacing,
            zoom=self.zoom,
            center=self.center,
        )
        # kitty scales the picture to its cells; sixel is drawn pixel for pixel.
        return geom.at_most_native(cells) if self.mode == "kitty" else geom

    def redraw(self) -> None:
        sixels = self._sixel.images_sent if self._sixel is not None else None
        self._strips = self._render_strips()
        self.frames_rendered += 1
        width, height = self.size
        if (
            self._sixel is not None
            and self._sixel.images_sent == sixels
            and height > self._image_rows
        ):
            # Same picture: repaint the text band only, not the sixel data over the image.
            self.refresh(Region(0, self._image_rows, width, height - self._image_rows))
        else:
            self.refresh()

    def _render_strips(self) -> list[Strip]:
        width, height = self.size
        if width <= 0 or height <= 0:
            return []
        rows = self._image_rows = self.image_rows()
        cw, ch = self.cell_pixels
        geom = self.geometry()
        if geom is None or self._modality is None:
            rgb = np.zeros((ch * rows, cw * width, 3), dtype=np.uint8)
        else:
            rgb = imaging.to_rgb(
                imaging.render_grey(self._modality, geom, self.window, self.invert)
            )
        labels: dict[tuple[int, int], Label] = {}
        if geom is not None:
            self._draw_marks(rgb, geom, labels, width)
        text_top = rows if self.mode == "sixel" else 0
        if self.mode == "sixel":
            labels.clear()  # nothing shows on top of a sixel picture: names go in the band
        for row, line in enumerate(self._text_lines()[: max(0, height - text_top - 1)]):
            labels.update(label_cells(line, text_top + row, 0, TEXT_STYLE, width))
        if self.waiting:
            text = "loading…"
            labels.update(
                label_cells(text, rows // 2, max(0, (width - len(text)) // 2), LOADING_STYLE, width)
            )
        if self._kitty is not None:
            return self._kitty.strips(rgb, (width, rows), labels)
        if self._sixel is not None:
            self._sixel.encode(rgb)
            band = self._renderer.strips(np.zeros((2 * (height - rows), width, 3), np.uint8), {
                (row - rows, col): label for (row, col), label in labels.items() if row >= rows
            })  # fmt: skip
            return [*[Strip([], width)] * rows, *band]
        return self._renderer.strips(rgb, labels)

    def _text_lines(self) -> list[str]:
        lines = list(self.overlay_lines)
        if self.mode == "sixel":  # the name tags drawn beside the marks elsewhere
            tags = [f"+{m.label}" for m in self.marks if m.label and m.kind == "cursor"]
            if tags:
                lines.append("cursors: " + "  ".join(tags))
            values = [m.label for m in self.marks if m.label and m.kind != "cursor"]
            if values:
                lines.append("marks: " + "  ".join(values))
        return lines

    def _draw_marks(
        self,
        rgb: npt.NDArray[np.uint8],
        geom: Geometry,
        labels: dict[tuple[int, int], Label],
        width: int,
    ) -> None:
        cw = max(1.0, geom.cell[0])
        for mark in self.marks:
            colour = hex_rgb(mark.colour)
            pts = [geom.image_to_display(p) for p in mark.points]
            if mark.kind in ("point", "cursor", "kbcursor"):
                arm = round((2 if mark.kind == "point" else 3) * cw)
                imaging.draw_cross(rgb, pts[0], colour, arm=arm)
            elif mark.kind == "arrow" and len(pts) == 2:
                imaging.draw_arrow(rgb, pts[0], pts[1], colour)
            elif mark.kind in ("length", "angle"):
                # length: a-b; angle: vertex-a and vertex-b (consult's point order).
                for end in pts[1:]:
                    imaging.draw_line(rgb, pts[0], end, colour)
            elif mark.kind == "ellipse" and len(mark.points) == 2:
                sx, sy = geom.scale
                rx, ry = mark.points[1]
                imaging.draw_ellipse(rgb, pts[0], abs(rx) * sx, abs(ry) * sy, colour)
            if mark.label:
                # Beside the end of a length (its start is often on what it measures).
                anchor = mark.points[-1] if mark.kind == "length" else mark.points[0]
                col, row = geom.image_to_cell(anchor)
                style = Style(color=mark.colour, bgcolor="#000000")
                labels.update(label_cells(mark.label, row + 1, col + 1, style, width))

    def render_line(self, y: int) -> Strip:
        if self._sixel is not None and y == self._image_rows - 1 and self._sixel.data:
            region = self.content_region
            area = region._replace(height=self._image_rows)
            return self._sixel.last_line(area, self.size.width)
        if y < len(self._strips):
            return self._strips[y]
        return Strip([Segment(" " * self.size.width)], self.size.width)

    def on_resize(self, event: events.Resize) -> None:
        self.redraw()

    def on_unmount(self) -> None:
        if self._kitty is not None:
            self._kitty.close()

    # input
    def _image_point(self, x: int, y: int) -> Point | None:
        geom = self.geometry()
        return geom.cell_to_image(x, y) if geom is not None else None

    def on_mouse_scroll_down(self, event: events.MouseScrollDown) -> None:
        event.stop()
        self.post_message(self.Step(+1))

    def on_mouse_scroll_up(self, event: events.MouseScrollUp) -> None:
        event.stop()
        self.post_message(self.Step(-1))

    def on_mouse_down(self, event: events.MouseDown) -> None:
        point = self._image_point(event.x, event.y)
        if point is None:
            return
        if self.tool_active:
            self.post_message(self.Clicked(point))
        else:
            self._drag = (float(event.screen_x), float(event.screen_y), self.window)
            self._dragged = False
            self.capture_mouse()

    def on_mouse_up(self, event: events.MouseUp) -> None:
        if self._drag is not None:
            self._drag = None
            self.release_mouse()
            point, geom = self._image_point(event.x, event.y), self.geometry()
            if not self._dragged and point is not None and geom is not None:
                self.post_message(self.Picked(point, 1.5 * geom.cell[0] / min(geom.scale)))

    def on_mouse_move(self, event: events.MouseMove) -> None:
        if self._drag is not None:
            x0, y0, start = self._drag
            if (event.screen_x, event.screen_y) == (x0, y0):
                return
            self._dragged = True
            # A cell is one display pixel wide and two tall.
            window = imaging.window_from_drag(
                start, event.screen_x - x0, 2 * (event.screen_y - y0), WL_DRAG_SENSITIVITY
            )
            self.post_message(self.WindowDragged(window))
            return
        point = self._image_point(event.x, event.y)
        if point is not None:
            self.post_message(self.Pointer(point))
