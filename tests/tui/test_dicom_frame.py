"""A decoded DICOM instance as the viewer's Frame (pydicom's bundled CT sample)."""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.data import get_testdata_file

from tui.dicom_frame import frame_from_dataset
from tui.imaging import Window


def _ct() -> pydicom.Dataset:
    source = get_testdata_file("CT_small.dcm")
    assert source is not None
    return pydicom.dcmread(source)


def test_a_real_ct_slice_has_its_pixels_spacing_position_and_rescale() -> None:
    ds = _ct()
    frame = frame_from_dataset(ds, 0)
    assert frame.pixels.shape == (128, 128)
    assert frame.has_spacing
    assert frame.spacing == tuple(float(v) for v in ds.PixelSpacing)
    assert frame.origin == tuple(float(v) for v in ds.ImagePositionPatient)
    assert np.allclose(frame.modality(), frame.pixels * frame.slope + frame.intercept)
    assert frame.frames == 1


def test_missing_or_malformed_header_values_fall_back_to_what_can_be_shown() -> None:
    ds = _ct()
    del ds.PixelSpacing
    ds.ImagePositionPatient = [1, 2]  # not a position
    ds.WindowCenter, ds.WindowWidth = 40, 0
    frame = frame_from_dataset(ds, 0)
    assert (frame.spacing, frame.has_spacing, frame.origin) == ((1.0, 1.0), False, None)
    assert frame.window == Window(40, 1)
