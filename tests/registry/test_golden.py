"""Golden bytes: a change to a registry wire format shows up as a changed fixture."""

from __future__ import annotations

from pathlib import Path

import pytest

from crypto.identity import Identity
from registry import wsproto
from registry.records import Availability, LanPointer, NodeRecord, parse_verified

GOLDEN = Path(__file__).parent / "golden"
ALICE = Identity(bytes(range(32)))  # Ed25519 signatures are deterministic


def _record() -> NodeRecord:
    return NodeRecord.create(
        ALICE,
        now=1_800_000_000,
        sequence=7,
        ttl=3600,
        display_name="Dr Golden",
        institution="CHU Golden",
        country="FR",
        subspecialties=("neuro",),
        jurisdictions=("FR",),
        languages=("fr", "en"),
        timezone="Europe/Paris",
        availability=Availability.ON_CALL,
        endpoints=("lan:http://192.0.2.10:7400", "registry:https://registry.example"),
    )


def test_node_record_bytes() -> None:
    golden = (GOLDEN / "node_record.bin").read_bytes()
    assert _record().to_wire() == golden
    assert parse_verified(golden, 1_800_000_001, ALICE.node_id) == _record()


def test_lan_pointer_bytes() -> None:
    golden = (GOLDEN / "lan_pointer.bin").read_bytes()
    assert LanPointer.create(ALICE, "http://192.0.2.10:7400", 7).to_wire() == golden
    assert LanPointer.from_wire(golden).endpoint == "http://192.0.2.10:7400"


def test_signaling_send_frame_bytes() -> None:
    golden = (GOLDEN / "ws_send.bin").read_bytes()
    frame = wsproto.Send(ALICE.node_id, b"\x01\x02sealed", 5)
    assert wsproto.to_wire(frame) == golden
    assert wsproto.from_wire(golden) == frame


BOB = Identity(bytes(range(32, 64)))
FRAMES = [
    wsproto.Challenge(bytes(range(32)), "https://registry.example"),
    wsproto.Auth(ALICE.public_key, bytes(64)),
    wsproto.Ready(ALICE.node_id, 2),
    wsproto.Deliver(ALICE.node_id, BOB.node_id, b"\x01\x02sealed"),
    wsproto.Ack(5, "stored"),
    wsproto.TurnRequest(),
    wsproto.TurnCredentials("1800000000:alice", "secret", 600, ("turn:192.0.2.1:3478",)),
    wsproto.Error("not authenticated", "sign the challenge first", 5),
    wsproto.Replaced(),
]


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: f.T)
def test_every_signaling_frame_bytes(frame: wsproto.Frame) -> None:
    golden = (GOLDEN / f"ws_{type(frame).__name__.lower()}.bin").read_bytes()
    assert frame.to_wire() == golden
    assert wsproto.from_wire(golden) == frame
