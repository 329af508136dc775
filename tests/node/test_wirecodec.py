"""The wire codec gives back every file byte for byte, and shrinks CT pixel data."""

from __future__ import annotations

import dataclasses
import os
import threading
import warnings
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_files
from pydicom.uid import generate_uid

from bench.bench_codec import _file, ct_series, random_instance
from node.dicom import wirecodec
from node.dicom.wirecodec import CorruptInstance, Encoding, WireInstance


def _local_test_files() -> list[str]:
    # get_testdata_files lists only files shipped inside the pydicom package: no downloads.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sorted(f for f in get_testdata_files() if os.path.isfile(f))


def _round_trip(data: bytes) -> WireInstance:
    wire = wirecodec.encode(data)
    again = WireInstance.from_wire(wire.to_wire())
    assert wirecodec.decode(again) == data
    return wire


@pytest.mark.parametrize("path", _local_test_files(), ids=lambda p: Path(p).name)
def test_every_pydicom_sample_file_round_trips_byte_exact(path: str) -> None:
    _round_trip(Path(path).read_bytes())


def test_sample_files_cover_the_interesting_cases() -> None:
    # Guards the parametrised test above: it must really see JPEG-LS, compressed
    # transfer syntaxes, big endian and multi-frame files, not only trivial ones.
    names = {Path(p).name: p for p in _local_test_files()}
    seen = {Path(p).name: wirecodec.encode(Path(p).read_bytes()).encoding for p in names.values()}
    assert seen["CT_small.dcm"] is Encoding.JPEGLS
    assert seen["MR_small_implicit.dcm"] is Encoding.JPEGLS
    assert seen["MR_small_bigendian.dcm"] is not Encoding.JPEGLS
    assert seen["MR_small_jp2klossless.dcm"] is not Encoding.JPEGLS
    assert seen["rtdose.dcm"] is Encoding.ZSTD  # 15 frames, 32-bit: not eligible
    assert "rtdose_expb.dcm" in seen  # multi-frame, big endian
    assert "examples_ybr_color.dcm" in seen  # 30 frames, encapsulated JPEG


def test_generated_ct_uses_jpegls_and_beats_plain_zstd() -> None:
    for data in ct_series(3, seed=7):
        wire = _round_trip(data)
        assert wire.encoding is Encoding.JPEGLS
        assert wire.layout is not None
        assert wire.layout.precision <= 12
        assert wire.wire_size * 2 < len(data)
        assert wire.wire_size < wirecodec.encode_plain(data).wire_size


def test_incompressible_pixels_go_raw_and_round_trip() -> None:
    data = random_instance(seed=3, size=128)
    wire = _round_trip(data)
    assert wire.encoding is Encoding.RAW
    assert wire.wire_size == len(data)


def test_signed_multiframe_round_trips_with_jpegls() -> None:
    rng = np.random.default_rng(5)
    frames = rng.normal(-300, 40, size=(4, 64, 80)).astype("<i2")
    data = _file(frames, generate_uid(), generate_uid(), 0, bits_stored=16, signed=True)
    wire = _round_trip(data)
    assert wire.encoding is Encoding.JPEGLS
    assert wire.layout is not None
    assert wire.layout.frames == 4


def test_garbage_high_bits_beyond_bits_stored_still_round_trip() -> None:
    rng = np.random.default_rng(9)
    pixels = rng.integers(0, 4096, size=(64, 64), dtype=np.uint16)
    pixels[::7, ::5] |= 0xF000  # overlay bits or garbage above BitsStored=12
    data = _file(pixels.astype("<u2"), generate_uid(), generate_uid(), 0, 12, signed=False)
    _round_trip(data)


def test_candidate_that_does_not_round_trip_falls_back_to_zstd(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = wirecodec._code_pixels

    def off_by_one(*args: object) -> wirecodec.CodedPixels:
        coded = real(*args)  # type: ignore[arg-type]
        assert coded.frames
        return dataclasses.replace(coded, shift=coded.shift + 1)

    monkeypatch.setattr(wirecodec, "_code_pixels", off_by_one)
    data = ct_series(1, seed=2, size=64)[0]
    wire = _round_trip(data)
    assert wire.encoding is Encoding.ZSTD


_DTYPES = {"u1": (8, False), "i1": (8, True), "<u2": (16, False), "<i2": (16, True)}


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from(sorted(_DTYPES)),
    frames=st.integers(1, 3),
    rows=st.integers(1, 24),
    columns=st.integers(1, 24),
    seed=st.integers(0, 2**32 - 1),
    span=st.integers(0, 16),
)
def test_random_arrays_round_trip(
    dtype: str, frames: int, rows: int, columns: int, seed: int, span: int
) -> None:
    bits, signed = _DTYPES[dtype]
    info = np.iinfo(np.dtype(dtype))
    rng = np.random.default_rng(seed)
    base = int(rng.integers(info.min, info.max, endpoint=True))
    width = min(1 << min(span, bits), info.max - info.min + 1)
    values = (base + rng.integers(0, width, size=(frames, rows, columns))).clip(info.min, info.max)
    pixels = values.astype(dtype)
    data = _file(pixels if frames > 1 else pixels[0], "1.2.3", "1.2.3.4", 0, bits, signed)
    _round_trip(data)


# -- a damaged or lying wire instance is refused, never returned --------------------------


def _ct_wire() -> tuple[bytes, WireInstance]:
    data = ct_series(1, seed=4, size=64)[0]
    return data, wirecodec.encode(data)


def test_flipped_byte_in_a_frame_is_refused() -> None:
    _, wire = _ct_wire()
    frame = bytearray(wire.frames[0])
    frame[len(frame) // 2] ^= 0x40
    with pytest.raises(CorruptInstance):
        wirecodec.decode(dataclasses.replace(wire, frames=(bytes(frame),)))


def test_wrong_hash_is_refused() -> None:
    _, wire = _ct_wire()
    with pytest.raises(CorruptInstance, match="hash"):
        wirecodec.decode(dataclasses.replace(wire, sha256=bytes(32)))


def test_zstd_frame_declaring_a_huge_size_is_refused_before_allocation() -> None:
    data, _ = _ct_wire()
    bomb = zstandard.ZstdCompressor(write_content_size=True).compress(b"\0" * 10_000_000)
    lying = WireInstance(Encoding.ZSTD, len(data), wirecodec.sha256(data), bomb)
    with pytest.raises(CorruptInstance, match="declares"):
        wirecodec.decode(lying)


def test_from_wire_checks_size_before_parsing_and_rejects_bad_shapes() -> None:
    _, wire = _ct_wire()
    raw = wire.to_wire()
    with pytest.raises(CorruptInstance, match="exceeds"):
        WireInstance.from_wire(raw, max_size=len(raw) - 1)
    with pytest.raises(CorruptInstance):
        WireInstance.from_wire(msgpack.packb([1, "jpegls", 1, b"x" * 32, b"", None, []]))
    with pytest.raises(CorruptInstance):
        WireInstance.from_wire(b"\xc1garbage")


def test_parsing_in_several_threads_leaves_the_warning_filters_as_they_were() -> None:
    # The receiver decodes (and parses) on several threads, the sender encodes on several.
    files = ct_series(4, seed=9, size=32)
    before = list(warnings.filters)

    def parse() -> None:
        for _ in range(150):
            for data in files:
                wirecodec.parse_dicom(data)

    threads = [threading.Thread(target=parse) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert warnings.filters == before
