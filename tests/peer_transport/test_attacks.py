"""Misbehaving peers and relays: each attack ends that connection with a typed, logged
reason, and the attacked node keeps serving its other peers. Over memory links: the
signals, the fingerprint-bound handshake and the channel crypto are the real ones."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

import pytest

from crypto.errors import DecryptionFailed
from crypto.handshake import FingerprintMismatch, WrongIdentity
from crypto.identity import Identity
from peer_transport import frames as fr
from peer_transport.connection import Closed, PeerConnection, Transport
from peer_transport.errors import (
    ConnectTimeout,
    FrameTooLarge,
    HandshakeFailed,
    PeerNotReading,
    PeerRejected,
    RemoteProtocolError,
)
from peer_transport.memory import MemoryLink, MemoryNetwork
from peer_transport.rtc import Link, RtcOptions
from tests.peer_transport.helpers import Mesh, mesh, with_options

pytestmark = pytest.mark.timeout(60)


async def _echo(_conn: PeerConnection, body: bytes) -> bytes:
    return body


async def _victim_with_honest_peer(m: Mesh) -> tuple[Transport, PeerConnection]:
    """A victim node already connected to an honest peer that answers "echo"."""
    victim, honest = await m.node(), await m.node()
    m.trust(victim, honest)
    honest.handle("echo", _echo)
    return victim, await victim.connect(honest.identity.public_key)


async def _still_serves(conn: PeerConnection) -> None:
    assert await conn.request("echo", b"still here", timeout=5) == b"still here"


async def _closed_event(conn: PeerConnection) -> Closed:
    while True:
        event = await conn.next_event(10)
        if isinstance(event, Closed):
            return event


class Impostor(Transport):
    """Signals with its own key but proves a different key in the handshake."""

    other = Identity.generate()

    def _handshake_identity(self) -> Identity:
        return self.other


class FingerprintLiar(Transport):
    """Reports a DTLS fingerprint other than the one it saw (as a DTLS-terminating relay)."""

    def _fingerprints(self, link: Link) -> tuple[str, str]:
        return link.local_fingerprint, "sha-256 " + ":".join(["AB"] * 32)


async def _calling_it_fails(
    m: Mesh, kind: type[Transport], cause: type[Exception]
) -> tuple[Transport, PeerConnection]:
    """A victim with an honest peer calls a ``kind`` node: the handshake fails for
    ``cause``, and the honest peer is still served. Returns the victim and that peer."""
    victim, honest_conn = await _victim_with_honest_peer(m)
    liar = await m.node(kind)
    m.trust(victim, liar)
    with pytest.raises(HandshakeFailed) as failed:
        await victim.connect(liar.identity.public_key)
    assert isinstance(failed.value.__cause__, cause)
    await _still_serves(honest_conn)
    return victim, honest_conn


async def test_a_peer_proving_the_wrong_identity_is_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with mesh() as m:
        victim, honest_conn = await _calling_it_fails(m, Impostor, WrongIdentity)

        # The other direction: the impostor calls the victim.
        caplog.set_level(logging.WARNING)
        attacker = await m.node(Impostor, options=with_options(handshake_timeout=1.0))
        m.trust(victim, attacker)
        with pytest.raises(HandshakeFailed, match="dropped the connection"):
            await attacker.connect(victim.identity.public_key)
        assert "WrongIdentity" in caplog.text or "different node key" in caplog.text
        assert victim.connection(attacker.identity.public_key) is None
        await _still_serves(honest_conn)


async def test_a_mismatched_dtls_fingerprint_is_refused() -> None:
    async with mesh() as m:
        await _calling_it_fails(m, FingerprintLiar, FingerprintMismatch)


async def test_a_replayed_offer_is_refused_before_any_webrtc_work(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    async with mesh() as m:
        a, b = await m.node(), await m.node()
        m.trust(a, b)
        await a.connect(b.identity.public_key)
        await b.accept(10)
        b.handle("echo", _echo)
        offers = [d for s, t, d in m.hub.log if t == b.identity.public_key]
        await m.hub.inject(b.identity.public_key, offers[0])
        for _ in range(50):
            if "replay" in caplog.text:
                break
            await asyncio.sleep(0.05)
        assert "signal refused" in caplog.text
        assert "replay" in caplog.text
        connection = a.connection(b.identity.public_key)
        assert connection is not None
        await _still_serves(connection)


async def test_a_relay_that_swaps_the_sdp_gets_the_offer_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    async with mesh() as m:
        a = await m.node(options=with_options(connect_timeout=1.0))
        b = await m.node()
        m.trust(a, b)

        def swap(_sender: bytes, _to: bytes, data: bytes) -> bytes:
            tampered = bytearray(data)
            tampered[len(tampered) // 2] ^= 0x01
            return bytes(tampered)

        m.hub.intercept = swap
        with pytest.raises(ConnectTimeout):
            await a.connect(b.identity.public_key)
        assert "signal refused" in caplog.text


async def _attacker_link(m: Mesh) -> tuple[Transport, PeerConnection, PeerConnection]:
    """(victim, honest conn of the victim, attacker's conn to the victim)."""
    victim, honest_conn = await _victim_with_honest_peer(m)
    attacker = await m.node()
    m.trust(victim, attacker)
    conn = await attacker.connect(victim.identity.public_key)
    return victim, honest_conn, conn


@pytest.mark.parametrize(
    ("channel", "payload", "expected"),
    [
        ("bulk", b"garbage, not even ciphertext", DecryptionFailed),
        ("live", b"\xc1" * 100, RemoteProtocolError),  # encrypts fine, not msgpack
        ("live", bytes(fr.MAX_FRAME + 28), FrameTooLarge),  # decrypts to more than the cap
        ("presence", fr.Bulk(0, b"x").to_wire(), RemoteProtocolError),  # wrong channel
    ],
    ids=["not-ciphertext", "not-msgpack", "over-the-cap", "wrong-channel"],
)
async def test_bad_frames_drop_only_that_connection(
    channel: str, payload: bytes, expected: type[Exception], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with mesh() as m:
        victim, honest_conn, attack = await _attacker_link(m)
        victim_conn = await victim.accept(10)
        session = attack._session
        assert session is not None
        wire = payload if expected is DecryptionFailed else session.sealers[channel].seal(payload)
        session.link.send(channel, wire)
        closed = await _closed_event(victim_conn)
        assert isinstance(victim_conn.error, expected), closed
        assert expected.__name__ in caplog.text
        assert victim.connection(attack.transport.identity.public_key) is None
        await _still_serves(honest_conn)


async def _send_many(conn: PeerConnection, chunk: bytes, count: int) -> None:
    for _ in range(count):
        await conn.send_bulk(chunk)


async def test_a_peer_that_stops_reading_is_disconnected() -> None:
    async with mesh() as m:
        victim = await m.node(options=with_options(stall_timeout=0.5))
        honest = await m.node()
        m.trust(victim, honest)
        honest.handle("echo", _echo)
        honest_conn = await victim.connect(honest.identity.public_key)
        sloth = await m.node()
        m.trust(victim, sloth)
        conn = await victim.connect(sloth.identity.public_key)
        await sloth.accept(10)  # ...and never reads its events
        chunk = os.urandom(fr.MAX_BULK_PAYLOAD)
        with pytest.raises(PeerNotReading):
            await _send_many(conn, chunk, 100)
        assert isinstance(conn.error, PeerNotReading)
        await _still_serves(honest_conn)


class CountingNetwork(MemoryNetwork):
    """Memory links that count how many links this node ever made."""

    def __init__(self) -> None:
        super().__init__()
        self.made = 0

    def __call__(
        self,
        options: RtcOptions,
        on_message: Callable[[str, bytes], None],
        on_down: Callable[[str], None],
    ) -> MemoryLink:
        self.made += 1
        return super().__call__(options, on_message, on_down)


async def test_an_unknown_callers_offer_is_refused_before_any_link_is_made(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    network = CountingNetwork()
    async with mesh() as m:
        victim = await m.node(options=with_options(link=network))
        stranger = await m.node()
        m.trusted[stranger.identity.public_key].add(victim.identity.public_key)  # one-sided
        with pytest.raises(PeerRejected, match="does not know you"):
            await stranger.connect(victim.identity.public_key)
        assert "connection from untrusted node" in caplog.text
        assert network.made == 0
        assert victim.connection(stranger.identity.public_key) is None
