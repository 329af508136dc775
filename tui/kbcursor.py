"""The keyboard cursor: where a measurement point goes when there is no mouse.

Pure geometry, in image pixels (x = column, y = row): the viewer moves it with the
arrows or hjkl while a tool is active (shift: bigger steps) and places a point with
space. Over plain SSH, without mouse reporting, every tool works this way.
"""

from __future__ import annotations

import math

Point = tuple[float, float]
BIG_STEP = 8  # shift+arrow / HJKL: this many small steps


def start(shape: tuple[int, int], pointer: Point | None = None) -> Point:
    """Where the cursor appears when a tool is picked: the mouse pointer if there is one
    on the image, else the image centre (``shape`` is rows, cols)."""
    rows, cols = shape
    if pointer is not None and math.isfinite(pointer[0]) and math.isfinite(pointer[1]):
        return clamp(pointer, shape)
    return (float((cols - 1) // 2), float((rows - 1) // 2))


def clamp(point: Point, shape: tuple[int, int]) -> Point:
    """``point`` kept on the image (whole pixels)."""
    rows, cols = shape
    x = min(max(0.0, round(point[0])), float(max(0, cols - 1)))
    y = min(max(0.0, round(point[1])), float(max(0, rows - 1)))
    return (float(x), float(y))


def step_pixels(cell_width: float, scale_x: float) -> float:
    """One small step: one terminal cell across, in image pixels (at least one pixel), so a
    step always moves the cursor on screen whatever the zoom."""
    if not (cell_width > 0 and scale_x > 0 and math.isfinite(cell_width / scale_x)):
        return 1.0
    return max(1.0, cell_width / scale_x)


def moved(
    point: Point, dx: int, dy: int, shape: tuple[int, int], step: float, big: bool = False
) -> Point:
    """``point`` moved by ``dx``, ``dy`` steps of ``step`` image pixels (``big``: BIG_STEP
    times that), kept on the image."""
    factor = step * (BIG_STEP if big else 1)
    return clamp((point[0] + dx * factor, point[1] + dy * factor), shape)
