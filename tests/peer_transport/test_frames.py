"""The frame codec: golden bytes for every frame type, size cap before decoding, typed errors."""

from __future__ import annotations

import os
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peer_transport import frames as fr
from peer_transport.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "frames"

# One example per frame type; each is stored as tests/fixtures/frames/<name>.bin.
EXAMPLES: dict[str, fr.Frame] = {
    "handshake": fr.Handshake(1, b"\x81\xa1e\xc4\x20" + bytes(32)),
    "ready": fr.Ready(),
    "request": fr.Request(7, "study.offer", b"\x01\x02"),
    "response": fr.Response(7, b"ok"),
    "error_reply": fr.ErrorReply(8, "not-found", "no such study"),
    "ping": fr.Ping(300),
    "pong": fr.Pong(300),
    "message": fr.Message(b"transfer-control"),
    "bulk": fr.Bulk(70000, b"\xde\xad\xbe\xef"),
    "bulk_ack": fr.BulkAck(70000),
    "live": fr.Live(b"crdt-update"),
    "presence": fr.Presence(b"cursor"),
    "close": fr.Close("heartbeat", "peer stopped answering"),
}


def test_every_frame_type_has_a_golden_example() -> None:
    assert {type(f) for f in EXAMPLES.values()} == set(fr.FRAME_TYPES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_frame_matches_its_golden_bytes(name: str) -> None:
    path = FIXTURES / f"{name}.bin"
    if os.environ.get("RADMESH_REGEN_FIXTURES"):
        path.write_bytes(EXAMPLES[name].to_wire())
    golden = path.read_bytes()
    assert EXAMPLES[name].to_wire() == golden
    assert fr.decode(golden) == EXAMPLES[name]


def test_bulk_frame_at_the_payload_limit_fits_and_one_more_byte_does_not() -> None:
    biggest = fr.Bulk(2**64 - 1, bytes(fr.MAX_BULK_PAYLOAD))
    wire = biggest.to_wire()
    assert len(wire) <= fr.MAX_FRAME
    assert fr.decode(wire) == biggest
    with pytest.raises(LocalProtocolError):
        fr.Bulk(0, bytes(fr.MAX_FRAME)).to_wire()


def test_oversized_frame_is_refused_before_decoding() -> None:
    with pytest.raises(FrameTooLarge):
        fr.decode(b"\x92" + b"\x00" * fr.MAX_FRAME)


@pytest.mark.parametrize(
    "raw",
    [
        [99, b""],  # unknown type
        [5],  # Ping without seq
        [5, 1, 2],  # Ping with an extra field
        [5, -1],  # negative counter
        [5, True],  # bool is not an int here
        [2, 1, "kind", "not-bytes"],
        [12, "code", "x" * 5000],  # reason too long
        {"t": 5},
        "ping",
    ],
)
def test_malformed_frames_raise_remote_protocol_error(raw: object) -> None:
    with pytest.raises(RemoteProtocolError):
        fr.decode(msgpack.packb(raw, use_bin_type=True))


def test_trailing_bytes_are_refused() -> None:
    with pytest.raises(RemoteProtocolError):
        fr.decode(fr.Ping(1).to_wire() + b"\x00")


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2048))
def test_garbage_bytes_only_ever_raise_remote_protocol_error(data: bytes) -> None:
    try:
        frame = fr.decode(data)
    except RemoteProtocolError:
        return
    assert frame.to_wire() == data or fr.decode(frame.to_wire()) == frame


frame_strategy = st.one_of(
    st.builds(fr.Request, st.integers(0, 2**64 - 1), st.text(max_size=50), st.binary(max_size=200)),
    st.builds(fr.Bulk, st.integers(0, 2**64 - 1), st.binary(max_size=500)),
    st.builds(fr.Close, st.text(max_size=30), st.text(max_size=100)),
    st.builds(fr.Presence, st.binary(max_size=100)),
)


@settings(max_examples=200, deadline=None)
@given(frame_strategy)
def test_every_frame_round_trips(frame: fr.Frame) -> None:
    assert fr.decode(frame.to_wire()) == frame
