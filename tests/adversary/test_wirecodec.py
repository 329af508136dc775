"""A peer's wire instance is hostile until decoded and hashed: an unknown codec id, a
truncated stream, dimensions that lie, a frame missing from a multi-frame instance are
refused as :class:`CorruptInstance` (:class:`Oversized` where a size lies), before the
decoder is handed anything it would allocate for."""

from __future__ import annotations

import dataclasses

import imagecodecs
import msgpack
import numpy as np
import pytest
from pydicom.uid import generate_uid

from bench.bench_codec import _file, ct_series
from node.dicom import wirecodec
from node.dicom.wirecodec import CorruptInstance, Encoding, Oversized, WireInstance


def _ct_wire(size: int = 64) -> tuple[bytes, WireInstance]:
    [data] = ct_series(1, seed=11, size=size)
    wire = wirecodec.encode(data)
    assert wire.encoding is Encoding.JPEGLS
    return data, wire


def _multiframe_wire(frames: int = 3) -> tuple[bytes, WireInstance]:
    rng = np.random.default_rng(12)
    pixels = rng.normal(1000, 30, size=(frames, 32, 40)).clip(0, 4095).astype("<u2")
    data = _file(pixels, generate_uid(), generate_uid(), 0, bits_stored=12, signed=False)
    wire = wirecodec.encode(data)
    assert wire.encoding is Encoding.JPEGLS
    assert len(wire.frames) == frames
    return data, wire


def _fields(wire: WireInstance) -> list[object]:
    fields: list[object] = msgpack.unpackb(wire.to_wire(), raw=False)
    return fields


@pytest.mark.parametrize("codec", ["jpegxl", "htj2k", "interslice", "JPEGLS", ""])
def test_an_unknown_codec_id_is_refused_by_name_before_anything_is_decoded(codec: str) -> None:
    data, wire = _ct_wire()
    fields = _fields(wire)
    fields[1] = codec
    with pytest.raises(CorruptInstance, match="unknown encoding") as refused:
        WireInstance.from_wire(msgpack.packb(fields, use_bin_type=True))
    assert repr(codec) in str(refused.value)  # the reader is told which id it was
    # The honest encoding of the same instance is still accepted: the id alone decided.
    assert wirecodec.decode(WireInstance.from_wire(wire.to_wire())) == data


def test_a_wire_version_from_the_future_is_refused() -> None:
    _, wire = _ct_wire()
    fields = _fields(wire)
    fields[0] = wirecodec.WIRE_VERSION + 1
    with pytest.raises(CorruptInstance, match="version"):
        WireInstance.from_wire(msgpack.packb(fields, use_bin_type=True))


@pytest.mark.parametrize("keep", [1, 3, 11, 0.5, 0.9, -1])
def test_a_truncated_jpegls_stream_is_refused(keep: float) -> None:
    _, wire = _ct_wire()
    frame = wire.frames[0]
    cut = frame[: int(len(frame) * keep)] if isinstance(keep, float) else frame[:keep]
    with pytest.raises(CorruptInstance):
        wirecodec.decode(dataclasses.replace(wire, frames=(cut,)))


def test_a_truncated_jpegls_stream_with_its_end_marker_put_back_is_refused() -> None:
    _, wire = _ct_wire()
    frame = wire.frames[0]
    with pytest.raises(CorruptInstance, match="damaged"):  # by CharLS, now handed it
        wirecodec.decode(
            dataclasses.replace(wire, frames=(frame[: len(frame) // 2] + b"\xff\xd9",))
        )


def test_a_truncated_zstd_residual_is_refused() -> None:
    _, wire = _ct_wire()
    with pytest.raises(CorruptInstance):
        wirecodec.decode(dataclasses.replace(wire, body=wire.body[: len(wire.body) // 2]))


def test_a_truncated_wire_message_is_refused() -> None:
    _, wire = _ct_wire()
    raw = wire.to_wire()
    for cut in (1, len(raw) // 2, len(raw) - 1):
        with pytest.raises(CorruptInstance):
            WireInstance.from_wire(raw[:cut])


def test_a_jpegls_frame_of_other_dimensions_than_the_layout_is_refused_before_decoding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A well-formed 64x64 stream sent for a 128x128 layout (smaller, so no bomb: the
    # check is equality, not only "not larger"), and the other way round.
    _, small = _ct_wire(64)
    _, large = _ct_wire(128)
    called: list[bytes] = []
    monkeypatch.setattr(imagecodecs, "jpegls_decode", called.append)
    for wire, stream in ((large, small.frames[0]), (small, large.frames[0])):
        with pytest.raises(Oversized, match="JPEG-LS frame 0 declares"):
            wirecodec.decode(dataclasses.replace(wire, frames=(stream,)))
    assert called == []  # CharLS never saw either stream


def test_a_layout_whose_length_does_not_match_its_dimensions_is_refused() -> None:
    _, wire = _ct_wire()
    assert wire.layout is not None
    fields = _fields(wire)
    layout = list(wire.layout.to_list())
    layout[1] += 2  # two more pixel bytes than rows x columns x width
    fields[5] = layout
    with pytest.raises(CorruptInstance, match="inconsistent pixel layout"):
        WireInstance.from_wire(msgpack.packb(fields, use_bin_type=True))


def test_a_layout_claiming_more_pixels_than_the_file_holds_is_refused_before_decoding() -> None:
    _data, wire = _ct_wire()
    assert wire.layout is not None
    rows = wire.layout.rows * 4
    lying = dataclasses.replace(
        wire.layout, rows=rows, length=rows * wire.layout.columns * wire.layout.bytes_per_sample
    )
    with pytest.raises(Oversized, match="does not fit"):
        wirecodec.decode(dataclasses.replace(wire, layout=lying))


def test_a_multiframe_instance_missing_a_frame_is_refused() -> None:
    # The codec's frames travel together in one instance: a frame cannot be left to
    # "come later" or be taken from another instance.
    data, wire = _multiframe_wire()
    fields = _fields(wire)
    fields[6] = list(wire.frames[:-1])
    with pytest.raises(CorruptInstance, match="frame count"):
        WireInstance.from_wire(msgpack.packb(fields, use_bin_type=True))
    # decode() checks it too, not only the parser: a short list once left the last
    # frame's pixels unwritten (np.empty), and only the hash stood in the way.
    with pytest.raises(CorruptInstance, match="carries 2 frames where its layout has 3"):
        wirecodec.decode(dataclasses.replace(wire, frames=wire.frames[:-1]))
    with pytest.raises(CorruptInstance, match="carries 4 frames"):
        wirecodec.decode(dataclasses.replace(wire, frames=(*wire.frames, wire.frames[0])))
    assert wirecodec.decode(wire) == data


def test_frames_swapped_between_positions_are_caught_by_the_hash() -> None:
    _data, wire = _multiframe_wire()
    swapped = (wire.frames[1], wire.frames[0], *wire.frames[2:])
    with pytest.raises(CorruptInstance, match="hash"):
        wirecodec.decode(dataclasses.replace(wire, frames=swapped))


@pytest.mark.parametrize("sample", ["u1", "<u2"])
def test_a_jpegls_frame_of_another_sample_size_than_the_layout_is_refused(sample: str) -> None:
    """The receiver decodes a frame straight into the file's own buffer when the layout's
    samples are the file's: a peer's frame of the right dimensions but another sample size
    (8 bits for a 12-bit layout, or 16 for an 8-bit one) is refused, never written there
    as whatever CharLS made of it."""
    _, wire = _ct_wire()
    assert wire.layout is not None
    if sample == "<u2":  # an 8-bit layout: a CT slice whose values fit 8 bits
        rng = np.random.default_rng(13)
        pixels = rng.integers(0, 200, size=(1, 64, 64)).astype("<u2")
        data = _file(pixels, generate_uid(), generate_uid(), 0, bits_stored=12, signed=False)
        wire = wirecodec.encode(data)
        assert wire.layout is not None
        assert wire.layout.precision <= 8
    layout = wire.layout
    assert layout is not None
    shape = (layout.rows, layout.columns)
    other = bytes(imagecodecs.jpegls_encode(np.full(shape, 100, dtype=np.dtype(sample))))
    with pytest.raises(CorruptInstance):
        wirecodec.decode(dataclasses.replace(wire, frames=(other,)))
