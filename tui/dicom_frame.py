"""One frame of a decoded DICOM instance as the viewer's :class:`~tui.facade.Frame`.

The header values come through :mod:`node.dicom.files` (the one place that reads
DICOM attributes): absent or malformed ones fall back to what the viewer can still
show (1 mm pixels, no patient position, the window taken from the data).
"""

from __future__ import annotations

import pydicom

from node.dicom.files import float_of, floats_of, int_of
from tui.facade import Frame
from tui.imaging import Window


def frame_from_dataset(ds: pydicom.Dataset, frame: int) -> Frame:
    """Stored pixel values of one frame, with what the viewer needs to show them in HU/mm."""
    pixels = ds.pixel_array
    frames = max(1, int_of(ds, "NumberOfFrames") or 1)
    if pixels.ndim >= 3 and frames > 1:
        pixels = pixels[min(max(frame, 0), pixels.shape[0] - 1)]
    if pixels.ndim == 3:  # colour: show luminance
        pixels = pixels[..., :3].mean(axis=2)
    spacing = floats_of(ds, "PixelSpacing")
    origin = floats_of(ds, "ImagePositionPatient")
    center, width = float_of(ds, "WindowCenter"), float_of(ds, "WindowWidth")
    window = None if center is None or width is None else Window(center, max(1.0, width))
    has_spacing = spacing is not None and len(spacing) == 2
    return Frame(
        pixels,
        float_of(ds, "RescaleSlope") or 1.0,
        float_of(ds, "RescaleIntercept") or 0.0,
        (spacing[0], spacing[1]) if spacing is not None and has_spacing else (1.0, 1.0),
        has_spacing,
        (origin[0], origin[1], origin[2]) if origin and len(origin) == 3 else None,
        floats_of(ds, "ImageOrientationPatient"),
        window,
        frames,
        float_of(ds, "SliceLocation"),
        float_of(ds, "SliceThickness"),
    )
