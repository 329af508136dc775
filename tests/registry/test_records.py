"""Node records: self-certifying, size-limited, expiring, newer sequence wins."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto import canonical
from crypto.envelope import SignedEnvelope
from crypto.identity import Identity
from registry import wsproto
from registry.errors import RecordError, RegistryError, StaleRecord
from registry.records import (
    MAX_RECORD_SIZE,
    LanPointer,
    NodeRecord,
    parse_verified,
    require_newer,
    supersedes,
)
from tests.registry.conftest import NOW, make_record

ALICE = Identity(bytes(range(32)))
MALLORY = Identity(bytes(range(1, 33)))


def test_record_round_trips_and_verifies() -> None:
    record = make_record(ALICE)
    again = parse_verified(record.to_wire(), NOW + 10, ALICE.node_id)
    assert again == record
    assert again.lan_urls == ("http://127.0.0.1:7400",)


def test_any_flipped_byte_is_refused() -> None:
    wire = bytearray(make_record(ALICE).to_wire())
    refused = 0
    for index in range(0, len(wire), 3):
        tampered = bytearray(wire)
        tampered[index] ^= 0x01
        with pytest.raises(RecordError):
            parse_verified(bytes(tampered), NOW)
        refused += 1
    assert refused > 50


def test_field_changed_after_signing_fails_verify() -> None:
    record = make_record(ALICE)
    forged = dataclasses.replace(record, subspecialties=("cardiac",))
    with pytest.raises(RecordError, match="does not verify"):
        forged.verify(NOW)


def test_record_resigned_by_another_key_is_not_the_node() -> None:
    body = canonical.decode(SignedEnvelope.from_wire(make_record(ALICE).to_wire()).payload)
    forged = SignedEnvelope.create(MALLORY, "node-record", body).to_wire()
    assert NodeRecord.from_wire(forged).node_id == MALLORY.node_id
    with pytest.raises(RecordError, match="swapped"):
        parse_verified(forged, NOW, ALICE.node_id)


def test_expired_record_is_refused() -> None:
    record = make_record(ALICE, ttl=60)
    record.verify(NOW + 59)
    with pytest.raises(RecordError, match="expired"):
        record.verify(NOW + 60)


def test_future_dated_record_is_refused() -> None:
    with pytest.raises(RecordError, match="future"):
        make_record(ALICE, now=NOW + 3600).verify(NOW)


def test_other_signed_type_is_not_a_record() -> None:
    wire = SignedEnvelope.create(ALICE, "org-cert", {"x": 1}).to_wire()
    with pytest.raises(RecordError):
        NodeRecord.from_wire(wire)


def test_newer_sequence_replaces_older() -> None:
    old, new = make_record(ALICE, seq=4), make_record(ALICE, seq=5)
    assert supersedes(new, old)
    assert supersedes(new, None)
    assert not supersedes(old, new)
    assert not supersedes(old, old)
    with pytest.raises(StaleRecord):
        require_newer(old, new)
    with pytest.raises(RecordError):
        supersedes(make_record(MALLORY, seq=9), old)


def test_limits_enforced_when_creating() -> None:
    with pytest.raises(RecordError, match="at most 16 items"):
        make_record(ALICE, subs=tuple(f"s{i}" for i in range(17)))
    with pytest.raises(RecordError, match="lan:"):
        make_record(ALICE, endpoints=("http://x",))
    with pytest.raises(RecordError, match="lifetime"):
        make_record(ALICE, ttl=30 * 24 * 3600)


def test_oversized_wire_refused_before_parsing() -> None:
    with pytest.raises(RecordError, match="limit"):
        NodeRecord.from_wire(b"\x00" * (MAX_RECORD_SIZE + 1))


def test_lan_pointer_fits_a_txt_string_and_verifies() -> None:
    pointer = LanPointer.create(ALICE, "http://127.0.0.1:7400", 3)
    wire = pointer.to_wire()
    assert len(wire) < 250
    assert LanPointer.from_wire(wire) == pointer
    tampered = wire.replace(b"7400", b"7401")
    with pytest.raises(RecordError):
        LanPointer.from_wire(tampered)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_record_decoder_raises_only_record_error(data: bytes) -> None:
    with pytest.raises(RecordError):
        NodeRecord.from_wire(data)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.text(max_size=8), st.one_of(st.integers(-(2**63), 2**63 - 1), st.text(), st.binary())
    )
)
def test_fuzz_signed_record_bodies(body: dict[str, object]) -> None:
    """A correctly signed envelope with a junk body is still refused, with RecordError."""
    wire = SignedEnvelope.create(ALICE, "node-record", body).to_wire()
    with pytest.raises(RecordError):
        NodeRecord.from_wire(wire)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=1024))
def test_fuzz_signaling_frame_decoder_raises_only_registry_error(data: bytes) -> None:
    with contextlib.suppress(RegistryError):
        wsproto.from_wire(data)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["challenge", "auth", "send", "msg", "ack", "turn", "error", "ready"]),
    st.dictionaries(
        st.sampled_from(["c", "url", "k", "s", "to", "d", "ref", "from", "st", "u", "p", "id"]),
        st.one_of(st.integers(-5, 5), st.text(max_size=60), st.binary(max_size=70)),
    ),
)
def test_fuzz_typed_signaling_frames(kind: str, fields: dict[str, object]) -> None:
    with contextlib.suppress(RegistryError):
        wsproto.from_wire(canonical.encode({**fields, "t": kind}))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_lan_pointer_decoder_raises_only_record_error(data: bytes) -> None:
    with pytest.raises(RecordError):
        LanPointer.from_wire(data)
