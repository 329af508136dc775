"""Signaling: sealed offers/answers, and real LAN and registry-WebSocket carriers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from crypto.envelope import ReplayGuard
from crypto.identity import Identity
from peer_transport.connection import PeerConnection, Transport
from peer_transport.errors import SignalingError
from peer_transport.rtc import restrict_host_addresses
from peer_transport.signaling import LanSignaling, RegistrySignaling, Signaling, SignalMessage
from registry.client import RegistryClient
from registry.lan import LanEndpoint
from registry.records import NodeRecord
from registry.server import RegistryServer
from tests.peer_transport.helpers import FAST

pytestmark = pytest.mark.timeout(60)
NOW = 1_800_000_000
SID = bytes(range(16))


def test_an_offer_opens_once_for_its_recipient_only() -> None:
    alice, bob, eve = Identity.generate(), Identity.generate(), Identity.generate()
    sealed = SignalMessage("offer", SID, "v=0 sdp").seal(alice, bob.public_key, NOW)
    guard = ReplayGuard()
    sender, message = SignalMessage.open(bob, sealed, NOW, guard)
    assert sender == alice.public_key
    assert message == SignalMessage("offer", SID, "v=0 sdp")
    with pytest.raises(SignalingError, match="replay"):
        SignalMessage.open(bob, sealed, NOW, guard)
    with pytest.raises(SignalingError):
        SignalMessage.open(eve, sealed, NOW, ReplayGuard())
    with pytest.raises(SignalingError, match="expired"):
        SignalMessage.open(bob, sealed, NOW + 3600, ReplayGuard())
    with pytest.raises(SignalingError, match="limit"):
        SignalMessage.open(bob, bytes(70_000), NOW, ReplayGuard())


@pytest.mark.parametrize(
    "body",
    [
        {"k": "offer", "sid": b"short", "sdp": "", "r": ""},
        {"k": "hello", "sid": SID, "sdp": "", "r": ""},
        {"k": "offer", "sid": SID, "sdp": 5, "r": ""},
        {"k": "offer", "sid": SID},
        ["offer"],
    ],
)
def test_malformed_signal_bodies_are_refused(body: object) -> None:
    with pytest.raises(SignalingError):
        SignalMessage.from_body(body)


async def _echo(_conn: PeerConnection, body: bytes) -> bytes:
    return body


async def _connect_and_echo(
    make: Callable[[Identity], Signaling], a_id: Identity, b_id: Identity
) -> None:
    restrict_host_addresses(["127.0.0.1"])
    trust = {a_id.public_key, b_id.public_key}
    a = Transport(a_id, make(a_id), is_trusted=trust.__contains__, options=FAST)
    b = Transport(b_id, make(b_id), is_trusted=trust.__contains__, options=FAST)
    b.handle("echo", _echo)
    async with a, b:
        conn = await a.connect(b_id.public_key)
        assert await conn.request("echo", b"hi") == b"hi"


def _no_record() -> NodeRecord:
    raise LookupError("not served in this test")


async def test_direct_lan_signaling_through_real_lan_endpoints() -> None:
    a_id, b_id = Identity.generate(), Identity.generate()
    urls: dict[bytes, str] = {}
    endpoints: list[LanEndpoint] = []

    async def resolve(key: bytes) -> str:
        return urls[key]

    def make(identity: Identity) -> Signaling:
        signaling = LanSignaling(resolve)
        endpoints.append(LanEndpoint(_no_record, signaling.deliver))
        return signaling

    sig_a, sig_b = make(a_id), make(b_id)
    try:
        urls[a_id.public_key] = await endpoints[0].start("127.0.0.1")
        urls[b_id.public_key] = await endpoints[1].start("127.0.0.1")
        given = iter([sig_a, sig_b])
        await _connect_and_echo(lambda _i: next(given), a_id, b_id)
    finally:
        for endpoint in endpoints:
            await endpoint.stop()


async def test_signaling_through_a_real_registry_websocket(tmp_path: Path) -> None:
    server = RegistryServer(tmp_path / "registry.db")
    url = await server.start("127.0.0.1", 0)
    a_id, b_id = Identity.generate(), Identity.generate()
    clients = [RegistryClient(url, a_id), RegistryClient(url, b_id)]
    try:
        async with clients[0].connect() as conn_a, clients[1].connect() as conn_b:
            given = iter([RegistrySignaling(conn_a), RegistrySignaling(conn_b)])
            await _connect_and_echo(lambda _i: next(given), a_id, b_id)
    finally:
        for client in clients:
            await client.close()
        await server.stop()
