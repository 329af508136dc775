"""Measurements against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from consult.errors import InvalidMeasurement
from consult.measure import (
    PixelSpacing,
    angle_degrees,
    ellipse_roi_stats,
    length_mm,
)


def test_length_uses_row_spacing_for_y_and_column_spacing_for_x() -> None:
    spacing = PixelSpacing(row_mm=0.5, col_mm=0.8)
    # dx = 3 px * 0.8 mm = 2.4 mm, dy = 4 px * 0.5 mm = 2.0 mm
    assert length_mm((0, 0), (3, 4), spacing) == pytest.approx(math.sqrt(2.4**2 + 2.0**2))
    # swapping the spacing order would give sqrt(1.5^2 + 3.2^2): make sure it does not
    assert length_mm((0, 0), (3, 4), spacing) != pytest.approx(math.sqrt(1.5**2 + 3.2**2))


def test_pixel_spacing_from_dicom_value_and_refusals() -> None:
    assert PixelSpacing.from_dicom(["0.7", "0.6"]) == PixelSpacing(0.7, 0.6)
    with pytest.raises(InvalidMeasurement):
        PixelSpacing.from_dicom(None)
    with pytest.raises(InvalidMeasurement):
        PixelSpacing(0.0, 1.0)


def test_angle_in_pixels_and_in_anisotropic_physical_space() -> None:
    assert angle_degrees((0, 0), (1, 0), (0, 1)) == pytest.approx(90.0)
    assert angle_degrees((0, 0), (1, 0), (1, 1)) == pytest.approx(45.0)
    # rows twice as far apart as columns: arm b is (1 mm, 2 mm), atan(2) = 63.43 degrees
    tall = PixelSpacing(row_mm=2.0, col_mm=1.0)
    assert angle_degrees((0, 0), (1, 0), (1, 1), tall) == pytest.approx(63.434948822922)
    assert angle_degrees((5, 5), (6, 5), (4, 5)) == pytest.approx(180.0)
    with pytest.raises(InvalidMeasurement):
        angle_degrees((0, 0), (0, 0), (1, 1))


def test_ellipse_roi_stats_in_hounsfield_units() -> None:
    raw = np.arange(25, dtype=np.uint16).reshape(5, 5)  # value = 5 * row + column
    stats = ellipse_roi_stats(
        raw, (2, 2), 1, 1, PixelSpacing(0.5, 0.5), slope=2.0, intercept=-1024.0
    )
    # inside: centre 12 and its four neighbours 7, 11, 13, 17 -> HU = 2 v - 1024
    assert stats.pixels == 5
    assert stats.mean == pytest.approx(-1000.0)
    assert stats.min == -1010.0
    assert stats.max == -990.0
    assert stats.sd == pytest.approx(2 * math.sqrt((0 + 1 + 1 + 25 + 25) / 5))
    assert stats.area_mm2 == pytest.approx(math.pi * 0.5 * 0.5)


def test_ellipse_roi_is_elliptical_not_rectangular() -> None:
    image = np.zeros((9, 9))
    stats = ellipse_roi_stats(image, (4, 4), 4, 2, PixelSpacing(1, 1))
    # columns 0..8 on the centre row (9), narrowing above and below
    row_counts = [9, 7, 7, 1, 1]  # rows 4, 3, 5, 2, 6
    assert stats.pixels == sum(row_counts)
    assert stats.area_mm2 == pytest.approx(math.pi * 8)


def test_roi_refusals() -> None:
    with pytest.raises(InvalidMeasurement):
        ellipse_roi_stats(np.zeros((4, 4)), (1, 1), 0, 1, PixelSpacing(1, 1))
    with pytest.raises(InvalidMeasurement, match="no pixel"):
        ellipse_roi_stats(np.zeros((4, 4)), (10, 10), 1, 1, PixelSpacing(1, 1))
    with pytest.raises(InvalidMeasurement, match="2-D"):
        ellipse_roi_stats(np.zeros((2, 4, 4)), (1, 1), 1, 1, PixelSpacing(1, 1))
