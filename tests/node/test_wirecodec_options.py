"""The lossless options the codec benchmark compares (bench/bench_codec.py) are what they
claim: every one gives each frame back exactly, the benchmark's sample mapping is the
wire codec's, and an inter-slice frame cannot be decoded without its reference."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.uid import generate_uid

from bench.bench_codec import (
    JPEGLS,
    METHODS,
    Method,
    PixelSet,
    _file,
    _inter,
    box3,
    code_set,
    phantom_ct,
    samples,
)
from node.dicom import wirecodec
from node.dicom.wirecodec import CorruptInstance


def _series() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    frames = phantom_ct(3, "nps", 0.5, size=48)
    # Values a CT never has but a file may: 0 next to 0xFFFF, so differences wrap.
    frames.append(rng.integers(0, 1 << 16, size=(48, 48), dtype=np.uint16))
    frames.append(np.zeros((48, 48), dtype="<u2"))
    return frames


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_every_compared_method_is_lossless_over_a_series(method: Method) -> None:
    frames = _series()
    out = code_set(PixelSet("test", "synthetic", frames), method, 0)  # raises if not exact
    assert out.ratio > 0
    # And independently of code_set's own check: decode frame by frame here.
    prev = None
    for frame in frames:
        stream = method.encode(frame, prev if method.inter else None)
        back = method.decode(stream, prev if method.inter else None, frame.shape)
        assert back.dtype == np.dtype("<u2")
        assert np.array_equal(back, frame)
        prev = frame


def test_methods_include_the_baseline_and_inter_slice_prediction() -> None:
    assert METHODS[0] is JPEGLS
    assert any(m.inter for m in METHODS)
    assert any("JPEG-XL" in m.name for m in METHODS)
    assert any("HTJ2K" in m.name for m in METHODS)


@pytest.mark.parametrize(
    ("dtype", "signed"), [("<u2", False), ("<i2", True)], ids=["unsigned", "signed"]
)
def test_the_bench_maps_samples_as_the_wire_codec_does(dtype: str, signed: bool) -> None:
    rng = np.random.default_rng(4)
    pixels = rng.normal(-200 if signed else 900, 25, size=(40, 40)).astype(dtype)
    data = _file(pixels, generate_uid(), generate_uid(), 0, bits_stored=16, signed=signed)
    wire = wirecodec.encode(data)
    assert wire.layout is not None
    coded, low = samples(pixels)
    assert low == wire.layout.shift
    assert int(coded.max()).bit_length() <= wire.layout.precision


def test_a_predicted_frame_without_its_reference_is_refused() -> None:
    frames = phantom_ct(2, "white", size=32)
    for method in (m for m in METHODS if m.inter):
        stream = method.encode(frames[1], frames[0])
        with pytest.raises(CorruptInstance, match="without its reference"):
            method.decode(stream, None, frames[1].shape)
        # The wrong reference gives other pixels: a receiver must know which one it is.
        other = method.decode(stream, frames[1], frames[1].shape)
        assert not np.array_equal(other, frames[1])


def test_the_smoothed_reference_is_the_same_on_both_sides_and_wraps_exactly() -> None:
    assert box3(np.array([[0, 9], [9, 0]], dtype="<u2")).tolist() == [[4, 5], [5, 4]]  # floor
    frame = np.array([[0, 0xFFFF], [0xFFFF, 0]], dtype="<u2")
    assert box3(frame).tolist() == [[29126, 36408], [36408, 29126]]  # no 16-bit overflow
    method = _inter(JPEGLS, "t", box3)
    later = np.array([[1, 2], [3, 0xFFFE]], dtype="<u2")
    back = method.decode(method.encode(later, frame), frame, later.shape)
    assert np.array_equal(back, later)
