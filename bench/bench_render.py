"""Viewer rendering: one 512x512 CT slice into a 200x60 cell viewport (goal < 10 ms).

Run: ``python -m bench render``. Baseline, measured in the same run: a naive
per-pixel loop (window every source pixel, pick per display pixel, build a new
Rich Style per cell), i.e. what the pipeline would cost without resampling
first, vectorising and caching styles.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
from rich.color import Color
from rich.segment import Segment
from rich.style import Style
from textual.strip import Strip

from bench.bench_codec import ct_slice_hu
from tui import imaging
from tui.halfblock import UPPER_HALF, HalfBlockRenderer

CELLS = (200, 60)


def _time(fn: Callable[[], object], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def naive_frame(hu: np.ndarray, geom: imaging.Geometry, window: imaging.Window) -> list[Strip]:
    c, w = window.center, window.width
    rows, cols = hu.shape
    grey = [[0] * cols for _ in range(rows)]
    for y in range(rows):
        for x in range(cols):
            v = float(hu[y, x])
            t = min(1.0, max(0.0, (v - (c - 0.5)) / (w - 1) + 0.5))
            grey[y][x] = int(t * 255 + 0.5)
    gw, gh = geom.grid
    strips = []
    for row in range(gh // 2):
        segs = []
        for col in range(gw):
            pair = []
            for dy in (0, 1):
                ix, iy = geom.display_to_image((col + 0.5, 2 * row + dy + 0.5))
                xi, yi = int(ix + 0.5), int(iy + 0.5)
                pair.append(grey[yi][xi] if 0 <= xi < cols and 0 <= yi < rows else 0)
            up, low = pair
            style = Style(color=Color.from_rgb(up, up, up), bgcolor=Color.from_rgb(low, low, low))
            segs.append(Segment(UPPER_HALF, style))
        strips.append(Strip(segs, gw))
    return strips


def main() -> None:
    rng = np.random.default_rng(7)
    hu = ct_slice_hu(rng, 0.3).astype(np.float32)
    geom = imaging.Geometry.for_cells(hu.shape, CELLS)
    window = dict(imaging.PRESETS)["abdomen"]
    renderer = HalfBlockRenderer()

    def fast(mode: imaging.Resample) -> Callable[[], object]:
        return lambda: renderer.strips(
            imaging.to_rgb(imaging.render_grey(hu, geom, window, mode=mode))
        )

    fast("nearest")()  # warm the style cache as a running viewer would have it
    nearest = _time(fast("nearest"), 60)
    area = _time(fast("area"), 60)
    windows = [w for _, w in imaging.PRESETS]
    cold = _time(
        lambda: HalfBlockRenderer().strips(
            imaging.to_rgb(imaging.render_grey(hu, geom, windows[0]))
        ),
        10,
    )
    naive = _time(lambda: naive_frame(hu, geom, window), 3)
    med = statistics.median
    print(f"render 512x512 -> {CELLS[0]}x{CELLS[1]} cells, half-block truecolor")
    print(
        f"  nearest, warm style cache : median {med(nearest):6.2f} ms  p95 "
        f"{sorted(nearest)[int(0.95 * len(nearest))]:6.2f} ms  (goal < 10 ms)"
    )
    print(f"  area average, warm cache  : median {med(area):6.2f} ms")
    print(f"  nearest, cold style cache : median {med(cold):6.2f} ms")
    print(f"  naive per-pixel baseline  : median {med(naive):6.2f} ms")
    print(f"  speed-up vs naive         : {med(naive) / med(nearest):6.1f}x")
    full_resolution(hu, window)


def full_resolution(hu: np.ndarray, window: imaging.Window) -> None:
    """The same viewport at a typical 10x20 pixel cell through kitty graphics and sixel: the
    pipeline at 2000x1200 pixels plus textual-image's encoding (PNG for kitty, sixel)."""
    import io
    import sys

    from tui.widgets.protocol_image import KittyImage, SixelImage

    cell = (10, 20)
    geom = imaging.Geometry.for_cells(hu.shape, CELLS, cell)

    def pixels() -> np.ndarray:
        return imaging.to_rgb(imaging.render_grey(hu, geom, window))

    kitty, sixel = KittyImage(), SixelImage()
    real_stdout = sys.__stdout__
    setattr(sys, "__stdout__", io.StringIO())  # noqa: B010 - kitty writes to the terminal
    try:
        grid = _time(pixels, 10)
        rgb = pixels()  # sixel is drawn pixel for pixel: the full grid
        native = imaging.Geometry.for_cells(hu.shape, CELLS, cell).at_most_native(CELLS)
        small = imaging.to_rgb(imaging.render_grey(hu, native, window))
        native_ms = _time(lambda: imaging.to_rgb(imaging.render_grey(hu, native, window)), 10)
        png = _time(lambda: kitty.strips(small, CELLS, {}), 5)
        kitty.close()
        six = _time(lambda: sixel.encode(rgb), 2)
    finally:
        setattr(sys, "__stdout__", real_stdout)  # noqa: B010
    med = statistics.median
    w, h = geom.grid
    print(f"full resolution, {w}x{h} pixels ({cell[0]}x{cell[1]} pixel cells):")
    print(f"  pixel pipeline            : median {med(grid):6.2f} ms")
    nw, nh = native.grid
    print(f"  kitty draws it at {nw}x{nh} (the image's own resolution; kitty scales it):")
    print(f"    pixel pipeline          : median {med(native_ms):6.2f} ms")
    print(f"    + PNG and placeholders  : median {med(png):6.2f} ms")
    print(f"  + sixel encoding          : median {med(six):6.2f} ms")


if __name__ == "__main__":
    main()
