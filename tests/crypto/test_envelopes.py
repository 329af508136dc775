"""Signed and sealed envelopes: every alteration, wrong domain, expiry and replay is refused."""

from __future__ import annotations

from typing import Any

import pytest

from crypto.envelope import ReplayGuard, SignedEnvelope, open_sealed, seal
from crypto.errors import (
    BadSignature,
    CryptoError,
    DecryptionFailed,
    Expired,
    NotYetValid,
    Replayed,
    WrongDomain,
)
from crypto.identity import Identity

ALICE = Identity(bytes([1]) * 32)
BOB = Identity(bytes([2]) * 32)
MALLORY = Identity(bytes([3]) * 32)
NOW = 1_800_000_000


def open_signed(data: bytes, expected_type: str, expected_version: int = 1) -> tuple[bytes, Any]:
    envelope = SignedEnvelope.from_wire(data)
    return envelope.signer, envelope.verify(expected_type, expected_version)


def test_signed_envelope_round_trip() -> None:
    wire = SignedEnvelope.create(ALICE, "greeting", {"text": "hi"}).to_wire()
    signer, body = open_signed(wire, "greeting")
    assert signer == ALICE.public_key
    assert body == {"text": "hi"}


def test_flipping_any_byte_of_a_signed_envelope_is_rejected() -> None:
    wire = SignedEnvelope.create(ALICE, "greeting", {"text": "hi", "n": 7}).to_wire()
    for index in range(len(wire)):
        tampered = bytearray(wire)
        tampered[index] ^= 0x01
        with pytest.raises(CryptoError):
            open_signed(bytes(tampered), "greeting")


def test_signature_for_one_type_does_not_verify_as_another() -> None:
    wire = SignedEnvelope.create(ALICE, "consult-request", {"x": 1}).to_wire()
    with pytest.raises(WrongDomain):
        open_signed(wire, "consult-report")


def test_retyped_envelope_fails_signature() -> None:
    envelope = SignedEnvelope.create(ALICE, "consult-request", {"x": 1})
    forged = SignedEnvelope(
        "consult-report", 1, envelope.signer, envelope.payload, envelope.signature
    )
    with pytest.raises(BadSignature):
        open_signed(forged.to_wire(), "consult-report")


def test_wrong_version_is_rejected() -> None:
    wire = SignedEnvelope.create(ALICE, "greeting", {}, version=2).to_wire()
    with pytest.raises(WrongDomain, match="version"):
        open_signed(wire, "greeting", expected_version=1)


def test_sealed_envelope_opens_for_recipient_only() -> None:
    data = seal(ALICE, BOB.public_key, "sdp-offer", {"sdp": "v=0"}, now=NOW)
    opened = open_sealed(BOB, data, "sdp-offer", now=NOW + 1, replay_guard=ReplayGuard())
    assert opened.sender == ALICE.public_key
    assert opened.body == {"sdp": "v=0"}
    with pytest.raises(DecryptionFailed):
        open_sealed(MALLORY, data, "sdp-offer", now=NOW + 1, replay_guard=None)


def test_flipping_any_byte_of_a_sealed_envelope_is_rejected() -> None:
    data = seal(ALICE, BOB.public_key, "sdp-offer", {"sdp": "v=0"}, now=NOW)
    for index in range(0, len(data), 3):
        tampered = bytearray(data)
        tampered[index] ^= 0x80
        with pytest.raises(CryptoError):
            open_sealed(BOB, bytes(tampered), "sdp-offer", now=NOW, replay_guard=None)


def test_replayed_sealed_envelope_is_refused() -> None:
    guard = ReplayGuard()
    data = seal(ALICE, BOB.public_key, "sdp-offer", {"sdp": "v=0"}, now=NOW)
    open_sealed(BOB, data, "sdp-offer", now=NOW, replay_guard=guard)
    with pytest.raises(Replayed):
        open_sealed(BOB, data, "sdp-offer", now=NOW + 5, replay_guard=guard)


def test_expired_sealed_envelope_is_refused() -> None:
    data = seal(ALICE, BOB.public_key, "sdp-offer", {}, now=NOW, ttl=60)
    with pytest.raises(Expired):
        open_sealed(BOB, data, "sdp-offer", now=NOW + 61, replay_guard=None)


def test_sealed_envelope_from_the_future_is_refused() -> None:
    data = seal(ALICE, BOB.public_key, "sdp-offer", {}, now=NOW + 3600)
    with pytest.raises(NotYetValid):
        open_sealed(BOB, data, "sdp-offer", now=NOW, replay_guard=None)


def test_sealed_envelope_of_another_type_is_refused() -> None:
    data = seal(ALICE, BOB.public_key, "sdp-offer", {}, now=NOW)
    with pytest.raises(WrongDomain):
        open_sealed(BOB, data, "sdp-answer", now=NOW, replay_guard=None)


def test_envelope_signed_for_someone_else_and_resealed_is_refused() -> None:
    """Bob must not be able to forward Alice's message to Mallory as if sent to Mallory."""
    import nacl.public

    from crypto.identity import x25519_public

    data = seal(ALICE, BOB.public_key, "sdp-offer", {}, now=NOW)
    inner = nacl.public.SealedBox(BOB.x25519_private()).decrypt(data)
    resealed = nacl.public.SealedBox(
        nacl.public.PublicKey(x25519_public(MALLORY.public_key))
    ).encrypt(inner)
    with pytest.raises(BadSignature, match="different recipient"):
        open_sealed(MALLORY, bytes(resealed), "sdp-offer", now=NOW, replay_guard=None)


def test_replay_guard_stays_bounded() -> None:
    guard = ReplayGuard(capacity=10)
    for index in range(50):
        guard.check_and_remember(b"k" * 32, index.to_bytes(16, "big"), NOW + index, NOW)
    assert len(guard) <= 10
