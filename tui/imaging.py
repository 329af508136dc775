"""The viewer's pixel pipeline: pure numpy, no Textual.

stored pixels -> modality LUT (rescale slope/intercept) -> resample onto the
display grid -> VOI window (DICOM linear function) -> optional invert -> grey.

Resampling happens *before* windowing, so a 512x512 slice shown in a 200x120
pixel viewport costs a 24k-element window, not a 262k-element one.

Image coordinates are (x, y) = (column, row) with pixel centres on integers,
as in :mod:`consult.measure`: pixel 0 covers [-0.5, 0.5). Display pixels are
square; each terminal cell shows two of them stacked (half-block rendering),
so cell (col, row) holds display pixels (col, 2*row) and (col, 2*row+1).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Any, Literal, NamedTuple

import numpy as np
import numpy.typing as npt

Grey = npt.NDArray[np.uint8]
Floats = npt.NDArray[np.float32]
RGB = tuple[int, int, int]
Point = tuple[float, float]
Resample = Literal["nearest", "area", "box"]

MIN_ZOOM = 0.25
MAX_ZOOM = 16.0


@dataclass(frozen=True)
class Window:
    center: float
    width: float

    def __post_init__(self) -> None:
        if not self.width >= 1:
            raise ValueError(f"window width must be at least 1, got {self.width}")

    def adjusted(self, d_center: float, d_width: float) -> Window:
        return Window(self.center + d_center, max(1.0, self.width + d_width))


# Number keys 1-8 pick these, in this order.
PRESETS: tuple[tuple[str, Window], ...] = (
    ("brain", Window(40, 80)),
    ("subdural", Window(75, 215)),
    ("stroke", Window(40, 40)),
    ("bone", Window(500, 2000)),
    ("lung", Window(-600, 1500)),
    ("abdomen", Window(50, 400)),
    ("liver", Window(60, 160)),
    ("mediastinum", Window(50, 350)),
)


def modality_lut(stored: npt.NDArray[Any], slope: float = 1.0, intercept: float = 0.0) -> Floats:
    """Stored values to modality units (HU for CT): ``stored * slope + intercept``."""
    # One pass where one will do (the same float32 operations as a copy, then *=, then +=).
    if slope != 1.0:
        out: Floats = np.multiply(stored, np.float32(slope), dtype=np.float32)
    elif intercept != 0.0:
        return np.add(stored, np.float32(intercept), dtype=np.float32)  # type: ignore[no-any-return]
    else:
        return stored.astype(np.float32, copy=True)
    if intercept != 0.0:
        out += np.float32(intercept)
    return out


def voi_linear(values: npt.NDArray[Any], window: Window, invert: bool = False) -> Grey:
    """DICOM PS3.3 C.11.2.1.2.1 linear VOI function onto 0..255.

    below c - 0.5 - (w-1)/2 -> 0; above c - 0.5 + (w-1)/2 -> 255;
    otherwise ((x - (c - 0.5)) / (w - 1) + 0.5) * 255, rounded.
    """
    c, w = window.center, window.width
    x = values.astype(np.float32, copy=False)
    if w == 1:
        grey = np.where(x <= c - 0.5, np.float32(0), np.float32(255))
    else:
        grey = (x - np.float32(c - 0.5)) * np.float32(1.0 / (w - 1)) + np.float32(0.5)
        np.clip(grey, 0, 1, out=grey)
        grey *= np.float32(255)
        grey += np.float32(0.5)
    out = grey.astype(np.uint8)
    if invert:
        np.subtract(255, out, out=out)
    return out


def window_from_data(values: npt.NDArray[Any]) -> Window:
    """A starting window covering the 1st..99th percentile, for images without a preset."""
    lo, hi = np.percentile(values, [1, 99])
    return Window(float(lo + hi) / 2, max(1.0, float(hi - lo)))


def window_from_drag(start: Window, dx: float, dy: float, sensitivity: float) -> Window:
    """Drag right widens the window, drag down raises the level (the common convention)."""
    return start.adjusted(dy * sensitivity, dx * sensitivity)


@dataclass(frozen=True)
class Geometry:
    """Where the image sits in a viewport of ``grid`` display pixels (w, h).

    ``center`` is the image coordinate shown in the middle of the viewport;
    ``spacing`` is (row_mm, col_mm) so non-square pixels keep their true shape.
    """

    image_shape: tuple[int, int]  # rows, cols
    grid: tuple[int, int]  # display pixels: width, height (height = 2 x cell rows)
    spacing: tuple[float, float] = (1.0, 1.0)
    zoom: float = 1.0
    center: Point | None = None
    cell: tuple[float, float] = (1, 2)  # display pixels per terminal cell (w, h)

    @classmethod
    def for_cells(
        cls,
        image_shape: tuple[int, int],
        cells: tuple[int, int],
        cell: tuple[float, float] = (1, 2),
        **kw: Any,
    ) -> Geometry:
        """Half-block cells by default; a graphics protocol gives the cell's real pixels."""
        grid = (max(1, round(cells[0] * cell[0])), max(1, round(cells[1] * cell[1])))
        return cls(image_shape, grid, cell=cell, **kw)

    def at_most_native(self, cells: tuple[int, int]) -> Geometry:
        """The same view on a coarser grid when the image is magnified (more than one display
        pixel per image pixel): for a terminal that scales the picture itself, extra pixels
        cost encoding time and show nothing new."""
        magnified = min(self.scale)
        if magnified <= 1:
            return self
        cell = (self.cell[0] / magnified, self.cell[1] / magnified)
        return Geometry.for_cells(
            self.image_shape, cells, cell, spacing=self.spacing, zoom=self.zoom, center=self.center
        )

    @property
    def view_center(self) -> Point:
        if self.center is not None:
            return self.center
        rows, cols = self.image_shape
        return ((cols - 1) / 2, (rows - 1) / 2)

    @property
    def scale(self) -> tuple[float, float]:
        """Display pixels per image pixel along x and y."""
        rows, cols = self.image_shape
        row_mm, col_mm = self.spacing
        fit = min(self.grid[0] / (cols * col_mm), self.grid[1] / (rows * row_mm))
        return fit * self.zoom * col_mm, fit * self.zoom * row_mm

    def image_to_display(self, p: Point) -> Point:
        sx, sy = self.scale
        cx, cy = self.view_center
        return (p[0] - cx) * sx + self.grid[0] / 2, (p[1] - cy) * sy + self.grid[1] / 2

    def display_to_image(self, d: Point) -> Point:
        sx, sy = self.scale
        cx, cy = self.view_center
        return (d[0] - self.grid[0] / 2) / sx + cx, (d[1] - self.grid[1] / 2) / sy + cy

    def image_to_cell(self, p: Point) -> tuple[int, int]:
        dx, dy = self.image_to_display(p)
        return math.floor(dx / self.cell[0]), math.floor(dy / self.cell[1])

    def cell_to_image(self, col: int, row: int) -> Point:
        """The image point under the middle of a terminal cell (for mouse hits)."""
        cw, ch = self.cell
        return self.display_to_image(((col + 0.5) * cw, (row + 0.5) * ch))

    def zoomed(self, factor: float) -> Geometry:
        return replace(self, zoom=min(MAX_ZOOM, max(MIN_ZOOM, self.zoom * factor)))

    def panned(self, d_cols: float, d_rows: float) -> Geometry:
        """Move the view by a number of *display* pixels."""
        sx, sy = self.scale
        cx, cy = self.view_center
        return replace(self, center=(cx + d_cols / sx, cy + d_rows / sy))

    def sample_axes(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Image x of each display column centre and image y of each display row centre."""
        xs = self.display_to_image_axis(np.arange(self.grid[0], dtype=np.float64) + 0.5, axis=0)
        ys = self.display_to_image_axis(np.arange(self.grid[1], dtype=np.float64) + 0.5, axis=1)
        return xs, ys

    def display_to_image_axis(
        self, d: npt.NDArray[np.float64], axis: int
    ) -> npt.NDArray[np.float64]:
        s = self.scale[axis]
        c = self.view_center[axis]
        return (d - self.grid[axis] / 2) / s + c


def resample(modality: Floats, geom: Geometry, mode: Resample = "nearest") -> tuple[Floats, Any]:
    """Values on the display grid (h, w) and a boolean mask of where the image is.

    ``nearest`` picks the pixel under each display pixel centre; ``area`` averages
    every image pixel whose centre falls in the display pixel's footprint (used
    when the image is shrunk, so fine detail averages instead of aliasing);
    ``box``, for the viewer on every slice step, is nearly that at a tenth of the
    cost: the image in tiles of the largest whole number of pixels a display pixel
    spans, each display pixel the mean of the tile under its centre.
    """
    return resample_stored(modality, 1.0, 0.0, geom, mode)  # the LUT that changes nothing


def resample_stored(
    stored: npt.NDArray[Any],
    slope: float,
    intercept: float,
    geom: Geometry,
    mode: Resample = "nearest",
) -> tuple[Floats, Any]:
    """``resample(modality_lut(stored, slope, intercept), geom, mode)``, bit for bit, without
    the LUT's pass over every pixel where that can be promised (on every slice step):
    ``nearest`` puts only the pixels it shows through the LUT (the same float32 operations on
    the same values); ``box`` sums each tile's stored values in integers when the float32
    sums are exact integers too (:func:`stored_block_means`)."""
    grid = _sampling(geom, *stored.shape)
    if mode == "area" and grid.shrunk:
        xs, ys = geom.sample_axes()
        out = _area_average(modality_lut(stored, slope, intercept), xs, ys, *geom.scale)
    elif mode == "box" and grid.tiles is not None:
        means = stored_block_means(stored, slope, intercept, grid.block)
        if means is None:
            means = block_means(modality_lut(stored, slope, intercept), grid.block)
        out = np.take(means, grid.tiles)
    else:
        out = modality_lut(np.take(stored, grid.pixels), slope, intercept)
    return out, grid.mask


class _Sampling(NamedTuple):
    pixels: npt.NDArray[np.intp]  # the image pixel under each display pixel (flat index)
    mask: npt.NDArray[np.bool_]  # where the image is
    shrunk: bool  # less than one display pixel per image pixel along an axis
    block: int  # box: the tile size
    tiles: npt.NDArray[np.intp] | None  # box: the tile under each display pixel, or None


@functools.lru_cache(maxsize=16)
def _sampling(geom: Geometry, rows: int, cols: int) -> _Sampling:
    """Where each display pixel samples an image of rows x cols (the same for every slice of
    a series, so kept): a centre off the image takes the nearest edge pixel, and in the
    ragged edge left out of the tiles the last tile."""
    xs, ys = geom.sample_axes()
    ix = np.floor(xs + 0.5).astype(np.intp)
    iy = np.floor(ys + 0.5).astype(np.intp)
    mask = ((iy >= 0) & (iy < rows))[:, None] & ((ix >= 0) & (ix < cols))[None, :]
    ix, iy = np.clip(ix, 0, cols - 1), np.clip(iy, 0, rows - 1)
    sx, sy = geom.scale
    block = int(1 / max(sx, sy)) if sx < 1 and sy < 1 else 1
    tiles = None
    if block >= 2 and rows >= block and cols >= block:
        tile_rows, tile_cols = rows // block, cols // block
        by, bx = np.minimum(iy // block, tile_rows - 1), np.minimum(ix // block, tile_cols - 1)
        tiles = by[:, None] * tile_cols + bx[None, :]
        tiles.flags.writeable = False
    pixels = iy[:, None] * cols + ix[None, :]
    for array in (pixels, mask):
        array.flags.writeable = False  # shared by every call with this geometry
    return _Sampling(pixels, mask, sx < 1 or sy < 1, block, tiles)


def block_means(values: Floats, block: int) -> Floats:
    """Means of block x block tiles (a ragged right or bottom edge is left out)."""
    rows, cols = values.shape[0] // block * block, values.shape[1] // block * block
    total = np.zeros((rows // block, cols // block), dtype=np.float32)
    for dy in range(block):
        for dx in range(block):
            total += values[dy:rows:block, dx:cols:block]
    total *= np.float32(1.0 / (block * block))
    return total


# float32 holds every integer up to this exactly: sums below it add without rounding.
FLOAT32_EXACT = 2**24


def stored_block_means(
    stored: npt.NDArray[Any], slope: float, intercept: float, block: int
) -> Floats | None:
    """``block_means(modality_lut(stored, slope, intercept), block)`` bit for bit, from the
    tile sums of the stored values (no pass of the LUT over every pixel), or None when that
    cannot be promised.

    It can when the LUT only adds an integer (slope 1, as CT's -1024) to small integers: each
    modality value is then an integer float32 holds exactly, and so is every partial sum of
    a tile while a tile's values cannot reach 2**24 in magnitude together, so the float32 sums
    are exact integers: the stored values' sum plus block**2 intercepts, in any order."""
    if stored.dtype.kind not in "iu" or stored.dtype.itemsize > 2 or slope != 1.0:
        return None
    if not (math.isfinite(intercept) and float(intercept).is_integer()):
        return None
    info = np.iinfo(stored.dtype)
    largest = max(-int(info.min), int(info.max)) + abs(int(intercept))
    if largest * block * block > FLOAT32_EXACT:
        return None
    rows, cols = stored.shape[0] // block * block, stored.shape[1] // block * block
    # Summed in float32 (exact, as said): the rows of each tile first (whole rows added,
    # contiguous), then its columns.
    by_rows = np.add(stored[0:rows:block, :cols], stored[1:rows:block, :cols], dtype=np.float32)
    for dy in range(2, block):
        by_rows += stored[dy:rows:block, :cols]
    total: Floats = np.add(by_rows[:, 0::block], by_rows[:, 1::block])
    for dx in range(2, block):
        total += by_rows[:, dx::block]
    total += np.float32(int(intercept) * block * block)
    total *= np.float32(1.0 / (block * block))
    return total


def _area_average(
    modality: Floats,
    xs: npt.NDArray[np.float64],
    ys: npt.NDArray[np.float64],
    sx: float,
    sy: float,
) -> Floats:
    rows, cols = modality.shape
    integral = np.zeros((rows + 1, cols + 1), dtype=np.float64)
    np.cumsum(np.cumsum(modality, axis=0, dtype=np.float64), axis=1, out=integral[1:, 1:])
    half_x, half_y = 0.5 / sx, 0.5 / sy
    # Pixel centres p with lo <= p < hi: indices ceil(lo) .. ceil(hi) - 1.
    x0 = np.clip(np.ceil(xs - half_x), 0, cols).astype(np.intp)
    x1 = np.clip(np.ceil(xs + half_x), 0, cols).astype(np.intp)
    y0 = np.clip(np.ceil(ys - half_y), 0, rows).astype(np.intp)
    y1 = np.clip(np.ceil(ys + half_y), 0, rows).astype(np.intp)
    x1 = np.maximum(x1, np.minimum(x0 + 1, cols))
    y1 = np.maximum(y1, np.minimum(y0 + 1, rows))
    total = (
        integral[y1[:, None], x1[None, :]]
        - integral[y0[:, None], x1[None, :]]
        - integral[y1[:, None], x0[None, :]]
        + integral[y0[:, None], x0[None, :]]
    )
    count = (y1 - y0)[:, None] * (x1 - x0)[None, :]
    return (total / np.maximum(count, 1)).astype(np.float32)


def render_grey(
    modality: Floats,
    geom: Geometry,
    window: Window,
    invert: bool = False,
    mode: Resample = "nearest",
) -> Grey:
    """The display grid (h, w) in 0..255; outside the image is black."""
    return render_grey_stored(modality, 1.0, 0.0, geom, window, invert, mode)  # LUT: identity


def render_grey_stored(
    stored: npt.NDArray[Any],
    slope: float,
    intercept: float,
    geom: Geometry,
    window: Window,
    invert: bool = False,
    mode: Resample = "nearest",
) -> Grey:
    """:func:`render_grey` of ``modality_lut(stored, slope, intercept)``, bit for bit, with the
    cheaper resampling of :func:`resample_stored`."""
    values, mask = resample_stored(stored, slope, intercept, geom, mode)
    grey = voi_linear(values, window, invert)
    grey[~mask] = 0
    return grey


def blocks(grey: Grey, size: int) -> Grey:
    """The grid in size x size blocks, each the mean of its pixels (a ragged right or
    bottom edge is kept as it is): coarse, but cheap to send as terminal cells."""
    h, w = grey.shape
    bh, bw = h - h % size, w - w % size
    out = grey.copy()
    if bh and bw:
        means = grey[:bh, :bw].reshape(bh // size, size, bw // size, size).mean(axis=(1, 3))
        block = np.rint(means).astype(np.uint8)
        out[:bh, :bw] = np.repeat(np.repeat(block, size, axis=0), size, axis=1)
    return out


def to_rgb(pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """Grey (h, w) as RGB (h, w, 3), a new array; RGB as it is."""
    if pixels.ndim == 3:
        return pixels
    return np.repeat(pixels[:, :, None], 3, axis=2)


# --- overlays, drawn in display pixels so half-blocks keep their precision ---


def draw_line(rgb: npt.NDArray[np.uint8], a: Point, b: Point, color: RGB) -> None:
    """A 1-pixel line between two display points, clipped to the grid."""
    h, w = rgb.shape[:2]
    span = _clip_span(a, b, w, h)
    if span is None:
        return
    t0, t1 = span
    length = max(abs(b[0] - a[0]), abs(b[1] - a[1])) * (t1 - t0)
    t = np.linspace(t0, t1, int(length) + 2)
    x = np.floor(a[0] + (b[0] - a[0]) * t).astype(np.intp)
    y = np.floor(a[1] + (b[1] - a[1]) * t).astype(np.intp)
    ok = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    rgb[y[ok], x[ok]] = color


def _clip_span(a: Point, b: Point, w: int, h: int) -> tuple[float, float] | None:
    """The part [t0, t1] of the segment a + t(b - a) inside the grid (Liang-Barsky)."""
    t0, t1 = 0.0, 1.0
    for p, q in (
        (-(b[0] - a[0]), a[0] + 1),
        (b[0] - a[0], w - a[0]),
        (-(b[1] - a[1]), a[1] + 1),
        (b[1] - a[1], h - a[1]),
    ):
        if p == 0:
            if q < 0:
                return None
            continue
        r = q / p
        if p < 0:
            t0 = max(t0, r)
        else:
            t1 = min(t1, r)
    return (t0, t1) if t0 <= t1 else None


def draw_ellipse(
    rgb: npt.NDArray[np.uint8], center: Point, rx: float, ry: float, color: RGB
) -> None:
    """The outline of an axis-aligned ellipse given in display pixels."""
    h, w = rgb.shape[:2]
    n = int(min(4 * (w + h), max(16, 2 * math.pi * max(rx, ry) * 1.5)))
    t = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    with np.errstate(over="ignore", invalid="ignore"):  # a peer's huge radius: inf, NaN
        x = np.floor(center[0] + rx * np.cos(t))
        y = np.floor(center[1] + ry * np.sin(t))
    ok = (x >= 0) & (x < w) & (y >= 0) & (y < h)  # false for inf and NaN: cast only these
    rgb[y[ok].astype(np.intp), x[ok].astype(np.intp)] = color


def draw_cross(rgb: npt.NDArray[np.uint8], p: Point, color: RGB, arm: int = 2) -> None:
    draw_line(rgb, (p[0] - arm, p[1]), (p[0] + arm, p[1]), color)
    draw_line(rgb, (p[0], p[1] - arm), (p[0], p[1] + arm), color)


def draw_arrow(rgb: npt.NDArray[np.uint8], tail: Point, head: Point, color: RGB) -> None:
    draw_line(rgb, tail, head, color)
    angle = math.atan2(head[1] - tail[1], head[0] - tail[0])
    for side in (-1, 1):
        wing = angle + math.pi + side * 0.5
        draw_line(rgb, head, (head[0] + 3 * math.cos(wing), head[1] + 3 * math.sin(wing)), color)


def position_mm(
    p: Point,
    spacing: tuple[float, float],
    origin: tuple[float, float, float] | None = None,
    orientation: tuple[float, ...] | None = None,
) -> tuple[float, float, float] | tuple[float, float]:
    """Patient position (mm) of image point p: DICOM Image Position/Orientation when known,
    otherwise just the in-plane offset from the first pixel."""
    row_mm, col_mm = spacing
    if origin is None or orientation is None or len(orientation) != 6:
        return p[0] * col_mm, p[1] * row_mm
    rx, ry, rz, cx, cy, cz = orientation
    return (
        origin[0] + rx * col_mm * p[0] + cx * row_mm * p[1],
        origin[1] + ry * col_mm * p[0] + cy * row_mm * p[1],
        origin[2] + rz * col_mm * p[0] + cz * row_mm * p[1],
    )


# The first window of a series without one in its files.
SOFT_TISSUE = Window(40, 400)
BRAIN = Window(40, 80)
HEAD_WORDS = ("head", "brain", "skull", "cran", "neuro")


def default_window(
    file_window: Window | None, modality: str, description: str, values: npt.NDArray[Any]
) -> Window:
    """The window a series opens in: its own Window Center/Width (first value, already
    read into ``file_window``) when it has a sane one, else CT brain (head series) or
    soft tissue, else (MR and the rest) the 1st..99th percentile of the pixels."""
    if (
        file_window is not None
        and math.isfinite(file_window.center)
        and math.isfinite(file_window.width)
    ):
        return file_window
    if modality.strip().upper() == "CT":
        head = any(word in description.lower() for word in HEAD_WORDS)
        return BRAIN if head else SOFT_TISSUE
    finite = values[np.isfinite(values)] if values.size else values
    if finite.size == 0:
        return SOFT_TISSUE
    return window_from_data(finite)
