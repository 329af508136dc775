"""Which annotation a click is on: pure geometry in image coordinates (x, y), no Textual.

Shapes use consult's point conventions: point (p), arrow (tail, head), length
(a, b), angle (vertex, a, b: two legs from the vertex), ellipse (centre,
(rx, ry)). A click inside an ellipse ROI hits it, but anything drawn closer to
the click wins.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Point = tuple[float, float]


def distance_to_segment(p: Point, a: Point, b: Point) -> float:
    ax, ay = a
    dx, dy = b[0] - ax, b[1] - ay
    length2 = dx * dx + dy * dy
    t = 0.0 if length2 == 0 else max(0.0, min(1.0, ((p[0] - ax) * dx + (p[1] - ay) * dy) / length2))
    return math.hypot(p[0] - (ax + t * dx), p[1] - (ay + t * dy))


def distance_to_ellipse(p: Point, center: Point, rx: float, ry: float) -> float:
    """Approximate distance to the outline (exact on the axes)."""
    rx, ry = max(abs(rx), 1e-6), max(abs(ry), 1e-6)
    dx, dy = p[0] - center[0], p[1] - center[1]
    r = math.hypot(dx / rx, dy / ry)
    if r == 0:
        return min(rx, ry)
    # The outline point on the ray from the centre through p.
    return math.hypot(dx - dx / r, dy - dy / r)


def distance(kind: str, points: Sequence[Point], p: Point, tolerance: float) -> float:
    """How far ``p`` is from the drawn shape; ``math.inf`` for a shape without its points."""
    if not points:
        return math.inf
    if kind == "ellipse":
        if len(points) != 2:
            return math.inf
        (cx, cy), (rx, ry) = points
        outline = distance_to_ellipse(p, (cx, cy), rx, ry)
        inside = ((p[0] - cx) / max(abs(rx), 1e-6)) ** 2 + (
            (p[1] - cy) / max(abs(ry), 1e-6)
        ) ** 2 <= 1
        return min(outline, tolerance) if inside else outline
    if kind in ("arrow", "length", "angle") and len(points) >= 2:
        # length/arrow: one segment; angle: both legs from the vertex (points[0]).
        return min(distance_to_segment(p, points[0], end) for end in points[1:])
    return math.hypot(p[0] - points[0][0], p[1] - points[0][1])


def pick(shapes: Sequence[tuple[str, Sequence[Point]]], p: Point, tolerance: float) -> int | None:
    """Index of the shape nearest to ``p`` within ``tolerance`` (image pixels); the most
    recently drawn (last) wins a tie. None when nothing is that close."""
    best: int | None = None
    best_d = math.inf
    for index, (kind, points) in enumerate(shapes):
        d = distance(kind, points, p, tolerance)
        if d <= tolerance and d <= best_d:
            best, best_d = index, d
    return best
