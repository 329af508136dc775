"""The image canvas: one slice, with overlays, mouse and drag.

Pixels go out as half-block cells, or at full resolution through kitty graphics
or sixel (:mod:`tui.graphics` decides). Annotations are drawn into the pixels in
every mode; cursors too with half-blocks, but as a cell on top of a kitty image
(moving one must not send the image again) and only in the text band for sixel
(nothing can be drawn over a sixel picture without sending it again). Text
(overlay lines, name tags) is drawn as cells on top of half-blocks and kitty
images, and in a band under the image for sixel.

Over SSH the terminal is the bottleneck, so a redraw sends only what changed:
the slice's pixels are kept per (frame, window, geometry), marks are drawn on a
copy, and only the cell rows whose cells changed are rebuilt and refreshed
(Textual then writes just those lines). A remote cursor moving costs the few
rows it crosses, not the image. In low-bandwidth mode (``--low-bandwidth``) the
view also paints at most ten times a second, shows slices coarse (2x2 pixel
blocks) while they arrive faster than that, and in full detail once they stop.

It holds no study logic: the viewer screen gives it a frame, a window and the
marks to draw; it reports slices to step, pointer moves, clicks and W/L drags
as messages in image coordinates.

Why one module: it is one widget, whose three ways of drawing share its caches, geometry
and refresh bookkeeping; what can stand alone already does (tui.halfblock, tui.imaging,
tui.graphics, tui.widgets.protocol_image).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import numpy.typing as npt
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.filter import ANSIToTruecolor, LineFilter
from textual.geometry import Region
from textual.message import Message
from textual.strip import Strip
from textual.timer import Timer
from textual.widget import Widget

from tui import graphics, imaging
from tui.facade import Frame
from tui.halfblock import HalfBlockRenderer, Keys, Label, label_cells, labels_by_row
from tui.imaging import Geometry, Point, Window
from tui.widgets.protocol_image import KittyImage, SixelImage

TEXT_STYLE = Style(color="#ffff87", bgcolor="#000000")
LOADING_STYLE = Style(color="#ffaf00", bgcolor="#000000", bold=True)
WL_DRAG_SENSITIVITY = 4.0  # HU per display pixel of drag
CURSOR_GLYPH = "+"  # a cursor over a kitty image: one cell, drawn as text
# Low bandwidth: at most this many paints a second; slices shown closer together than
# FAST_STEP_S are "scrolling fast" (drawn coarse) until REST_S after the last one.
MAX_PAINTS_PER_S = 10
FAST_STEP_S = 0.1
REST_S = 0.3
COARSE_BLOCK = 2


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
    # False: every redraw renders every row again and repaints the whole view, per-cell
    # "▀" as before (the terminal benchmark's baseline; nothing else turns it off).
    caching: ClassVar[bool] = True

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
        low_bandwidth: bool | None = None,
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
        self.frames_rendered = 0  # paints (a redraw put off in low bandwidth is not one)
        self.strips_rendered = 0  # cell rows built again (the rest were kept)
        self._low_bandwidth = low_bandwidth  # None: as the app says
        # What the terminal has now: per cell row, its keys (half-blocks) or a signature
        # (kitty, sixel) and its labels; a row is sent again only when these change.
        self._keys: Keys | None = None
        self._signatures: list[object] = []
        self._row_labels: list[dict[int, Label]] = []
        # The slice's grey pixels before marks, for the frame and view they were computed for.
        self._base_for: tuple[object, ...] | None = None
        self._base: npt.NDArray[np.uint8] | None = None
        self._shown: Frame | None = None
        # What the last half-block paint showed (its frame and the rest of the state): a
        # redraw of the same (a slice step paints, then the screen redraws with its marks)
        # does nothing.
        self._painted: tuple[object, ...] | None = None
        self._last_show = -math.inf
        self._last_paint = -math.inf
        self._scrolling_until = -math.inf
        self._coarse = False
        self._pending: Timer | None = None
        self._rest: Timer | None = None
        self._clock: Callable[[], float] = time.monotonic  # tests step it by hand

    @property
    def low_bandwidth(self) -> bool:
        if self._low_bandwidth is None:
            return bool(getattr(self.app, "low_bandwidth", False))
        return self._low_bandwidth

    # state from the screen
    def show(self, frame: Frame | None) -> None:
        if frame is not self._shown:
            now = self._clock()
            if (
                frame is not None
                and self._shown is not None
                and now - self._last_show < FAST_STEP_S
            ):
                self._scrolling_until = now + REST_S
            self._shown, self._last_show = frame, now
        self.frame = frame
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
        """Show the current state; in low bandwidth, at most ten times a second (a redraw
        asked for sooner is put off, and the latest state is shown then)."""
        if self.low_bandwidth and self.caching:
            wait = self._last_paint + 1 / MAX_PAINTS_PER_S - self._clock()
            if wait > 0:
                if self._pending is None:
                    self._pending = self.set_timer(wait, self._paint_pending)
                return
        if self._pending is not None:
            self._pending.stop()
            self._pending = None
        self._paint()

    def _paint_pending(self) -> None:
        self._pending = None
        if self.is_attached:
            self._paint()

    def _at_rest(self) -> None:
        """Scrolling stopped: the slice again, in full detail."""
        self._rest = None
        left = self._scrolling_until - self._clock()
        if left > 0:
            self._rest = self.set_timer(left, self._at_rest)
        elif self._coarse and self.is_attached:
            self.redraw()

    def _paint(self) -> None:
        now = self._clock()
        coarse = (
            self.low_bandwidth
            and self.caching
            and self.mode == "halfblock"
            and now < self._scrolling_until
        )
        if self._unchanged(coarse):
            return
        self._last_paint = now
        self.frames_rendered += 1
        self._coarse = coarse
        if self._coarse and self._rest is None:
            self._rest = self.set_timer(self._scrolling_until - now, self._at_rest)
        width, height = self.size
        if width <= 0 or height <= 0:
            self._strips, self._keys, self._signatures = [], None, []
            return
        rows = self._image_rows = self.image_rows()
        pixels, labels = self._canvas(width, height, rows)
        by_row = labels_by_row(labels, height, width)
        if self._kitty is not None:
            kitty = self._kitty
            lines = kitty.lines(imaging.to_rgb(pixels), (width, rows))

            def kitty_row(y: int) -> Strip:
                return kitty.row(lines, y, width, by_row.get(y))

            self._update_rows([kitty.images_sent] * height, by_row, kitty_row)
        elif self._sixel is not None:
            self._sixel.encode(imaging.to_rgb(pixels))
            sent = self._sixel.images_sent
            band = self._renderer.keys(np.zeros((2 * (height - rows), width, 3), np.uint8))
            self._renderer.prepare(band)

            def sixel_row(y: int) -> Strip:
                if y < rows:
                    return Strip([], width)
                return self._renderer.row(band[y - rows], by_row.get(y))

            self._update_rows([sent] * rows + [None] * (height - rows), by_row, sixel_row)
        else:
            self._update_cells(pixels, by_row)

    def _unchanged(self, coarse: bool) -> bool:
        """Whether a half-block paint would show what the last one did (and remember what
        this one shows, when not)."""
        if self.mode != "halfblock" or not self.caching:
            self._painted = None  # what is painted now is not what a caching paint shows
            return False
        state = (
            self.window, self.invert, self.zoom, self.center, self.marks, self.overlay_lines,
            self.waiting, self.size, coarse, self._colour_system(),
        )  # fmt: skip
        last = self._painted
        if (
            last is not None
            and self._keys is not None
            and last[0] is self.frame
            and last[1] == state
        ):
            return True
        self._painted = (self.frame, state)
        return False

    def _canvas(
        self, width: int, height: int, rows: int
    ) -> tuple[npt.NDArray[np.uint8], dict[tuple[int, int], Label]]:
        """The picture with its marks drawn in (RGB, or grey (h, w) when it has none), and
        the text cells to put over it."""
        cw, ch = self.cell_pixels
        geom = self.geometry()
        labels: dict[tuple[int, int], Label] = {}
        pixels: npt.NDArray[np.uint8]
        if geom is None or self.frame is None:
            pixels = np.zeros((ch * rows, cw * width), dtype=np.uint8)
        else:
            pixels = self._pixels(self.frame, geom)
            if self.marks:  # drawn on a copy: the slice's pixels are kept for the next paint
                pixels = imaging.to_rgb(pixels)
                self._draw_marks(pixels, geom, labels, width)
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
        return pixels, labels

    def _pixels(self, frame: Frame, geom: Geometry) -> npt.NDArray[np.uint8]:
        """The slice on the display grid in grey, before marks: computed again only when the
        frame, the window or the geometry changed (a cursor moving changes none of them)."""
        key = (frame, geom, self.window, self.invert, self._coarse)
        base = self._base
        if (
            base is None
            or self._base_for is None
            or not self.caching
            or self._base_for[0] is not key[0]
            or self._base_for[1:] != key[1:]
        ):
            # Shrunk, each display pixel is the mean of the image pixels under it (what it
            # stands for; picking one of them shows that one's noise, and noise is what
            # makes neighbouring cells differ and cost their own escape codes).
            resample: imaging.Resample = "box" if self.caching else "nearest"
            grey = imaging.render_grey_stored(
                frame.pixels, frame.slope, frame.intercept, geom, self.window, self.invert, resample
            )
            if self._coarse:
                grey = imaging.blocks(grey, COARSE_BLOCK)
            base = self._base = grey
            self._base_for = key
        return base

    def _update_cells(
        self, pixels: npt.NDArray[np.uint8], by_row: dict[int, dict[int, Label]]
    ) -> None:
        """Half-blocks: rebuild and refresh only the cells that changed (per row, the span
        from the first changed cell to the last)."""
        renderer = self._renderer
        palette = self.caching and self._colour_system() == "256"
        switched = renderer.configure(palette=palette, compact=self.caching)
        keys = renderer.keys(pixels)
        height = keys.shape[0]
        old = self._keys
        if (
            old is None
            or switched
            or not self.caching
            or old.shape != keys.shape
            or self._signatures
            or len(self._strips) != height
        ):
            self._strips = renderer.rows(keys, range(height), by_row)
            self.strips_rendered += height
            self._keys, self._signatures = keys, []
            self._row_labels = [by_row.get(y, {}) for y in range(height)]
            self.refresh()
            return
        changed = keys != old
        # Per row: whether any cell changed, and the first and last that did.
        rows_changed = changed.any(axis=1).tolist()
        firsts = changed.argmax(axis=1).tolist()
        lasts = (changed.shape[1] - 1 - changed[:, ::-1].argmax(axis=1)).tolist()
        labelled = {y for y in range(height) if self._row_labels[y]} | by_row.keys()
        regions, rebuilt = [], []
        for y in range(height):
            if not rows_changed[y] and y not in labelled:
                continue
            before, after = self._row_labels[y], by_row.get(y, {})
            cols = [firsts[y], lasts[y]] if rows_changed[y] else []
            if before != after:
                cols += [c for c in before.keys() | after.keys() if before.get(c) != after.get(c)]
            if not cols:
                continue
            rebuilt.append(y)
            self._row_labels[y] = after
            x0, x1 = min(cols), max(cols)
            regions.append(Region(x0, y, x1 - x0 + 1, 1))
        for y, strip in zip(rebuilt, renderer.rows(keys, rebuilt, by_row), strict=True):
            self._strips[y] = strip
        self.strips_rendered += len(rebuilt)
        self._keys = keys
        if regions:
            self.refresh(*regions)

    def _update_rows(
        self,
        signatures: list[object],
        by_row: dict[int, dict[int, Label]],
        build: Callable[[int], Strip],
    ) -> None:
        """kitty, sixel: rows are rebuilt and refreshed whole when their picture (which image
        the terminal has) or their text changed; a new picture repaints the view."""
        height = len(signatures)
        full = (
            not self.caching
            or len(self._signatures) != height
            or len(self._strips) != height
            or signatures[:1] != self._signatures[:1]
        )
        labels = [by_row.get(y, {}) for y in range(height)]
        changed = [
            y
            for y in range(height)
            if full or signatures[y] != self._signatures[y] or labels[y] != self._row_labels[y]
        ]
        if full:
            self._strips = [build(y) for y in range(height)]
        else:
            for y in changed:
                self._strips[y] = build(y)
        self.strips_rendered += len(changed)
        self._signatures, self._row_labels, self._keys = signatures, labels, None
        if full:
            self.refresh()
        else:
            width = self.size.width
            for y in changed:
                self.refresh(Region(0, y, width, 1))

    def _colour_system(self) -> str | None:
        try:
            return self.app.console.color_system
        except Exception:  # no app (a view built outside one)
            return None

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
            if mark.kind in ("cursor", "kbcursor") and self.mode == "kitty":
                # A cell over the image: moving it must not send the picture again.
                col, row = geom.image_to_cell(mark.points[0])
                style = Style(color=mark.colour, bgcolor="#000000", bold=True)
                labels.update(label_cells(CURSOR_GLYPH, row, col, style, width))
            elif mark.kind == "cursor" and self.mode == "sixel":
                pass  # named in the band: drawn in, each move would send the picture again
            elif mark.kind in ("point", "cursor", "kbcursor"):
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

    def render_lines(self, crop: Region) -> list[Strip]:
        """The rows as built, straight to the compositor when Textual would add nothing to
        them (its styled path looks the border, padding, tint... up again for each row
        repainted, a sixth of a slice step's CPU, to give back the row it was given)."""
        width = self.size.width
        lines = [self.render_line(y) for y in crop.line_range]
        if not self._plain() or any(line.cell_length != width for line in lines):
            return super().render_lines(crop)
        background = self.background_colors[1]
        for line_filter in self.get_line_filters():
            lines = [line.apply_filter(line_filter, background) for line in lines]
        x1, x2 = crop.column_span
        return lines if (x1, x2) == (0, width) else [line.crop(x1, x2) for line in lines]

    def _plain(self) -> bool:
        """Whether Textual's rendering of a row is the row: nothing for it to add."""
        styles = self.styles
        return not (
            any(edge for edge, _ in (*styles.border, *styles.outline))
            or any(styles.padding)
            or styles.tint.a
            or styles.text_opacity != 1.0
            or (styles.has_rule("hatch") and styles.hatch != "none")
            or self.opacity != 1.0
            or (self.border_title, self.border_subtitle) != (None, None)
            or (self.auto_links and self.hover_style.link_id)
        )

    def get_line_filters(self) -> Sequence[LineFilter]:
        """The app's line filters, but for the one turning ANSI colours into truecolor when
        half-blocks have none to turn: their cells, labels and marks are RGB already, and the
        border and background are checked (a theme may give those ANSI colours). It would
        copy every segment of every row repainted (most of a slice step's CPU in the
        compositor) to change nothing. kitty's and sixel's cells are left to it."""
        filters = super().get_line_filters()
        if self.mode != "halfblock":
            return filters
        base, background = self.background_colors
        frame = [base, background, *(colour for _, colour in self.styles.border)]
        if any(colour.ansi is not None for colour in frame):
            return filters
        return [f for f in filters if not isinstance(f, ANSIToTruecolor)]

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
