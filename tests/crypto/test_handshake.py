"""The session handshake agrees on keys only between the intended, untampered peers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto import canonical
from crypto.channel import (
    DatagramOpener,
    DatagramSealer,
    ReplayWindow,
    StreamOpener,
    StreamSealer,
)
from crypto.errors import BadSignature, CryptoError, DecryptionFailed, EncodingError, Replayed
from crypto.handshake import (
    FingerprintMismatch,
    HandshakeStateError,
    Initiator,
    ReplayCache,
    Resp,
    Responder,
    SessionKeys,
    WrongIdentity,
)
from crypto.identity import Identity

FP_A = "sha-256 aa:bb:cc"
FP_B = "sha-256 11:22:33"


def _run(
    alice: Identity, bob: Identity, cache: ReplayCache | None = None
) -> tuple[SessionKeys, SessionKeys]:
    initiator = Initiator(alice, bob.public_key, FP_A, FP_B)
    responder = Responder(bob, alice.public_key, FP_B, FP_A, cache)
    resp = responder.receive_init(initiator.start())
    fin, keys_a = initiator.receive_resp(resp)
    return keys_a, responder.receive_fin(fin)


def test_both_sides_derive_mirrored_keys_and_learn_each_other() -> None:
    alice, bob = Identity.generate(), Identity.generate()
    keys_a, keys_b = _run(alice, bob)
    assert keys_a.send == keys_b.receive
    assert keys_a.receive == keys_b.send
    assert keys_a.send != keys_a.receive
    assert keys_a.peer_public_key == bob.public_key
    assert keys_b.peer_public_key == alice.public_key
    assert keys_a.channel_keys("bulk") == keys_b.channel_keys("bulk")[::-1]
    assert keys_a.channel_keys("bulk") != keys_a.channel_keys("live")


def test_two_sessions_never_share_keys() -> None:
    alice, bob = Identity.generate(), Identity.generate()
    assert _run(alice, bob)[0].send != _run(alice, bob)[0].send


def test_fingerprints_are_compared_in_one_spelling() -> None:
    alice, bob = Identity.generate(), Identity.generate()
    initiator = Initiator(alice, bob.public_key, "SHA-256  aa:bb:cc", FP_B)
    responder = Responder(bob, None, FP_B, FP_A)
    fin, _ = initiator.receive_resp(responder.receive_init(initiator.start()))
    assert responder.receive_fin(fin).peer_public_key == alice.public_key


def test_initiator_refuses_a_responder_with_another_key() -> None:
    alice, bob, mallory = Identity.generate(), Identity.generate(), Identity.generate()
    initiator = Initiator(alice, bob.public_key, FP_A, FP_B)
    responder = Responder(mallory, None, FP_B, FP_A)
    with pytest.raises(WrongIdentity):
        initiator.receive_resp(responder.receive_init(initiator.start()))


def test_responder_refuses_an_initiator_other_than_the_offer_signer() -> None:
    alice, bob, mallory = Identity.generate(), Identity.generate(), Identity.generate()
    initiator = Initiator(mallory, bob.public_key, FP_A, FP_B)
    responder = Responder(bob, alice.public_key, FP_B, FP_A)
    fin, _ = initiator.receive_resp(responder.receive_init(initiator.start()))
    with pytest.raises(WrongIdentity):
        responder.receive_fin(fin)


def test_a_relay_showing_each_side_its_own_dtls_certificate_is_detected() -> None:
    alice, bob = Identity.generate(), Identity.generate()
    # The relay gave alice FP_M as bob's fingerprint and bob FP_N as alice's.
    initiator = Initiator(alice, bob.public_key, FP_A, "sha-256 de:ad")
    responder = Responder(bob, alice.public_key, FP_B, "sha-256 be:ef")
    with pytest.raises(FingerprintMismatch):
        initiator.receive_resp(responder.receive_init(initiator.start()))


def test_rewriting_the_fingerprints_in_transit_breaks_the_signature() -> None:
    alice, bob = Identity.generate(), Identity.generate()
    initiator = Initiator(alice, bob.public_key, FP_A, "sha-256 de:ad")
    responder = Responder(bob, alice.public_key, FP_B, FP_A)
    resp = Resp.from_wire(responder.receive_init(initiator.start()))
    forged = Resp(
        resp.ephemeral, resp.nonce, resp.public_key, FP_A, "sha-256 de:ad", resp.signature, resp.mac
    )
    with pytest.raises(BadSignature):
        initiator.receive_resp(forged.to_wire())


def test_replayed_init_is_refused_by_the_cache() -> None:
    alice, bob = Identity.generate(), Identity.generate()
    cache = ReplayCache()
    initiator = Initiator(alice, bob.public_key, FP_A, FP_B)
    init = initiator.start()
    Responder(bob, None, FP_B, FP_A, cache).receive_init(init)
    with pytest.raises(Replayed):
        Responder(bob, None, FP_B, FP_A, cache).receive_init(init)


def test_replayed_fin_from_an_old_session_fails_key_confirmation() -> None:
    alice, bob = Identity.generate(), Identity.generate()
    initiator = Initiator(alice, bob.public_key, FP_A, FP_B)
    init = initiator.start()
    old_fin, _ = initiator.receive_resp(Responder(bob, None, FP_B, FP_A).receive_init(init))
    fresh = Responder(bob, None, FP_B, FP_A)
    fresh.receive_init(init)  # no cache: only the signature/MAC stand in the way
    with pytest.raises(BadSignature):
        fresh.receive_fin(old_fin)


def test_a_message_twice_or_out_of_order_is_a_state_error() -> None:
    alice, bob = Identity.generate(), Identity.generate()
    initiator = Initiator(alice, bob.public_key, FP_A, FP_B)
    responder = Responder(bob, None, FP_B, FP_A)
    init = initiator.start()
    with pytest.raises(HandshakeStateError):
        responder.receive_fin(init)
    with pytest.raises(HandshakeStateError):
        initiator.start()


def test_low_order_ephemeral_is_refused() -> None:
    bob = Identity.generate()
    init = canonical.encode({"v": 1, "e": bytes(32), "n": bytes(16)})
    with pytest.raises(BadSignature):
        Responder(bob, None, FP_B, FP_A).receive_init(init)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=1200))
def test_garbage_handshake_messages_raise_only_crypto_errors(data: bytes) -> None:
    bob, alice = Identity.generate(), Identity.generate()
    with pytest.raises(CryptoError):
        Responder(bob, None, FP_B, FP_A).receive_init(data)
    initiator = Initiator(alice, bob.public_key, FP_A, FP_B)
    initiator.start()
    with pytest.raises(CryptoError):
        initiator.receive_resp(data)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 300), st.integers(0, 7))
def test_flipping_any_bit_of_resp_is_detected(index: int, bit: int) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    initiator = Initiator(alice, bob.public_key, FP_A, FP_B)
    resp = bytearray(Responder(bob, None, FP_B, FP_A).receive_init(initiator.start()))
    resp[index % len(resp)] ^= 1 << bit
    with pytest.raises(CryptoError):
        initiator.receive_resp(bytes(resp))


def test_secretstream_round_trip_and_tamper_reorder_detection() -> None:
    key = bytes(range(32))
    sealer, opener = StreamSealer(key), StreamOpener(key)
    first, second, third = (sealer.seal(m) for m in (b"one", b"two", b"three"))
    assert opener.open(first) == b"one"
    with pytest.raises(DecryptionFailed):
        opener.open(third)  # skipped "two": reordering is caught
    with pytest.raises(DecryptionFailed):
        opener.open(second)  # and the stream stays broken
    fresh = StreamOpener(key)
    tampered = bytearray(first)
    tampered[-1] ^= 1
    with pytest.raises(DecryptionFailed):
        fresh.open(bytes(tampered))
    with pytest.raises(DecryptionFailed):
        StreamOpener(bytes(32)).open(first)


def test_datagrams_survive_loss_and_reordering_but_not_replay() -> None:
    key = bytes(range(32))
    sealer, opener = DatagramSealer(key), DatagramOpener(key, window=64)
    sent = [sealer.seal(bytes([i])) for i in range(100)]
    assert opener.open(sent[5]) == b"\x05"
    assert opener.open(sent[2]) == b"\x02"  # late but inside the window
    with pytest.raises(Replayed):
        opener.open(sent[5])
    assert opener.open(sent[90]) == b"Z"
    with pytest.raises(Replayed):
        opener.open(sent[3])  # now behind the window
    forged = sent[91][:-1] + bytes([sent[91][-1] ^ 1])
    with pytest.raises(DecryptionFailed):
        opener.open(forged)
    assert opener.open(sent[91]) == b"["  # a forgery does not burn the counter


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 300), max_size=60))
def test_replay_window_accepts_each_counter_at_most_once(counters: list[int]) -> None:
    window = ReplayWindow(32)
    accepted: list[int] = []
    for c in counters:
        try:
            window.accept(c)
        except Replayed:
            continue
        accepted.append(c)
    assert len(accepted) == len(set(accepted))
    for c in accepted:
        with pytest.raises(Replayed):
            window.check(c)


def test_handshake_messages_have_a_size_cap() -> None:
    bob = Identity.generate()
    with pytest.raises(EncodingError):
        Responder(bob, None, FP_B, FP_A).receive_init(b"\x00" * 5000)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=600))
def test_garbage_fin_raises_only_crypto_errors(data: bytes) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    responder = Responder(bob, alice.public_key, FP_B, FP_A)
    responder.receive_init(Initiator(alice, bob.public_key, FP_A, FP_B).start())
    with pytest.raises(CryptoError):
        responder.receive_fin(data)
