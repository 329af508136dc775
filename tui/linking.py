"""Linking a prior to the current study slice by slice (issue 16): by where each slice is
in the patient, not by its index.

A slice's location is ImagePositionPatient projected on the slice normal (the cross
product of the two ImageOrientationPatient direction cosines), in mm. Two studies of
one patient are seldom scanned at the same table position, so the reader can set an
offset once ("these two slices show the same level") and the link keeps it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def slice_location(
    position: Sequence[float] | None, orientation: Sequence[float] | None
) -> float | None:
    """Where the slice lies along its normal (mm), or None without position/orientation."""
    if position is None or orientation is None or len(position) != 3 or len(orientation) != 6:
        return None
    rx, ry, rz, cx, cy, cz = (float(v) for v in orientation)
    normal = (ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx)
    length = math.sqrt(sum(n * n for n in normal))
    if not math.isfinite(length) or length < 1e-6:
        return None
    value = sum(float(p) * n for p, n in zip(position, normal, strict=True)) / length
    return value if math.isfinite(value) else None


def nearest(locations: Sequence[float | None], target: float) -> int | None:
    """Index of the slice closest to ``target`` (mm), None when no slice has a location."""
    best: tuple[float, int] | None = None
    for index, location in enumerate(locations):
        if location is None:
            continue
        distance = abs(location - target)
        if best is None or distance < best[0]:
            best = (distance, index)
    return None if best is None else best[1]


def linked_index(
    current: Sequence[float | None],
    prior: Sequence[float | None],
    index: int,
    offset: float = 0.0,
) -> int | None:
    """The prior's slice at the current slice ``index`` (plus ``offset`` mm), by location;
    None when either slice has no location (the caller then keeps the prior where it is)."""
    if not 0 <= index < len(current):
        return None
    here = current[index]
    return None if here is None else nearest(prior, here + offset)
