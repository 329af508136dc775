"""Measurements on image pixels, in patient units: pure numpy.

Coordinates are (x, y) = (column, row) in pixels, as the viewer draws them.
DICOM Pixel Spacing is [row spacing, column spacing] in mm: the distance between
rows (a step in y) then between columns (a step in x) — the order trips people up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from consult.errors import InvalidMeasurement

Point = tuple[float, float]


@dataclass(frozen=True)
class PixelSpacing:
    row_mm: float  # between rows: a step in y
    col_mm: float  # between columns: a step in x

    def __post_init__(self) -> None:
        if not (self.row_mm > 0 and self.col_mm > 0):
            raise InvalidMeasurement(
                "Pixel Spacing must be positive; this image has no usable spacing, "
                "so lengths and areas cannot be given in mm"
            )

    @classmethod
    def from_dicom(cls, value: object) -> PixelSpacing:
        """From the (0028,0030) value, e.g. ``ds.PixelSpacing``."""
        try:
            row, col = (float(v) for v in value)  # type: ignore[attr-defined]
        except (TypeError, ValueError) as exc:
            raise InvalidMeasurement(f"Pixel Spacing {value!r} is not two numbers") from exc
        return cls(row, col)


def length_mm(a: Point, b: Point, spacing: PixelSpacing) -> float:
    dx = (b[0] - a[0]) * spacing.col_mm
    dy = (b[1] - a[1]) * spacing.row_mm
    return math.hypot(dx, dy)


def angle_degrees(vertex: Point, a: Point, b: Point, spacing: PixelSpacing | None = None) -> float:
    """The angle a-vertex-b in degrees (0..180), in physical space when spacing is given."""
    sx, sy = (spacing.col_mm, spacing.row_mm) if spacing else (1.0, 1.0)
    ux, uy = (a[0] - vertex[0]) * sx, (a[1] - vertex[1]) * sy
    vx, vy = (b[0] - vertex[0]) * sx, (b[1] - vertex[1]) * sy
    nu, nv = math.hypot(ux, uy), math.hypot(vx, vy)
    if nu == 0 or nv == 0:
        raise InvalidMeasurement("an angle needs two arms of non-zero length")
    cos = max(-1.0, min(1.0, (ux * vx + uy * vy) / (nu * nv)))
    return math.degrees(math.acos(cos))


@dataclass(frozen=True)
class RoiStats:
    area_mm2: float
    pixels: int
    mean: float
    sd: float
    min: float
    max: float

    def to_wire(self) -> dict[str, float]:
        return {
            "area_mm2": self.area_mm2,
            "pixels": self.pixels,
            "mean": self.mean,
            "sd": self.sd,
            "min": self.min,
            "max": self.max,
        }


def ellipse_mask(
    shape: tuple[int, int], center: Point, rx: float, ry: float
) -> npt.NDArray[np.bool_]:
    """Pixels whose centres lie inside the axis-aligned ellipse (radii in pixels)."""
    if rx <= 0 or ry <= 0:
        raise InvalidMeasurement("an ellipse ROI needs positive radii")
    rows, cols = shape
    y, x = np.ogrid[:rows, :cols]
    return ((x - center[0]) / rx) ** 2 + ((y - center[1]) / ry) ** 2 <= 1.0


def ellipse_roi_stats(
    pixels: npt.NDArray[np.generic],
    center: Point,
    rx: float,
    ry: float,
    spacing: PixelSpacing,
    *,
    slope: float = 1.0,
    intercept: float = 0.0,
) -> RoiStats:
    """Stats of an ellipse ROI in modality units (HU for CT); SD is the population SD.

    The area is the geometric ellipse area (pi rx ry in mm), not the pixel count
    times pixel area: that is what a radiologist compares across viewers.
    """
    if pixels.ndim != 2:
        raise InvalidMeasurement(f"ROI stats need one 2-D frame, got {pixels.ndim} dimensions")
    mask = ellipse_mask((pixels.shape[0], pixels.shape[1]), center, rx, ry)
    inside = pixels[mask].astype(np.float64) * slope + intercept
    if inside.size == 0:
        raise InvalidMeasurement("the ellipse ROI contains no pixel centre: draw it larger")
    area = math.pi * rx * spacing.col_mm * ry * spacing.row_mm
    return RoiStats(
        area_mm2=area,
        pixels=int(inside.size),
        mean=float(inside.mean()),
        sd=float(inside.std()),
        min=float(inside.min()),
        max=float(inside.max()),
    )
