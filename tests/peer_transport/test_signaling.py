"""Signaling: sealed offers/answers, carried by a running node's LAN endpoint or its
registry WebSocket (the node's SignalRouter, which is what production uses)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from crypto.envelope import ReplayGuard
from crypto.identity import Identity
from node.app.runtime import NodeRuntime
from peer_transport.errors import SignalingError
from peer_transport.signaling import SignalMessage
from registry.server import RegistryServer
from tests.node.test_runtime import make_home, started

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


@pytest.fixture
async def registry_url(tmp_path: Path) -> AsyncIterator[str]:
    server = RegistryServer(tmp_path / "registry.sqlite")
    yield await server.start("127.0.0.1", 0)
    await server.stop()


async def _echo(_conn: object, body: bytes) -> bytes:
    return body


@asynccontextmanager
async def _two_nodes(
    tmp_path: Path, registry: str
) -> AsyncIterator[tuple[NodeRuntime, NodeRuntime]]:
    """Two running nodes that trust each other; the transport's signaling is the node's
    own SignalRouter (LAN endpoint first, then the registry WebSocket)."""
    rural_home, rural = make_home(tmp_path, "rural", registry, [])
    neuro_home, neuro = make_home(tmp_path, "neuro", registry, ["neuro"])
    a = await started(rural_home, rural)
    try:
        b = await started(neuro_home, neuro)
        try:
            a.trust.mark_verified(neuro.node_id, a.now())
            b.trust.mark_verified(rural.node_id, b.now())
            b.transport.handle("echo", _echo)
            yield a, b
        finally:
            await b.stop()
    finally:
        await a.stop()


async def test_offer_and_answer_cross_the_lan_endpoints_of_two_running_nodes(
    tmp_path: Path,
) -> None:
    async with _two_nodes(tmp_path, registry="") as (a, b):  # no registry: LAN only
        assert a.record is not None
        assert b.record is not None
        a.directory.remember(b.record, "test", a.now())  # as if found by mDNS
        b.directory.remember(a.record, "test", b.now())
        conn = await a.transport.connect(b.identity.public_key)
        assert await conn.request("echo", b"hi", timeout=5) == b"hi"


async def test_offers_cross_the_registry_websocket_when_the_lan_endpoint_is_unreachable(
    tmp_path: Path, registry_url: str
) -> None:
    async with _two_nodes(tmp_path, registry_url) as (a, b):
        await b.lan.stop()  # b's record still names it: a's LAN attempt fails
        conn = await a.transport.connect(b.identity.public_key)
        assert await conn.request("echo", b"hi", timeout=5) == b"hi"
