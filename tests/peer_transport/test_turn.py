"""Forced TURN relay through a real coturn on 127.0.0.1: data provably flows via the relay."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from crypto.identity import Identity
from peer_transport import frames as fr
from peer_transport.connection import Disconnected, PeerConnection, Received
from peer_transport.rtc import IceServer, RtcOptions
from registry.client import RegistryClient
from registry.records import NodeRecord
from registry.server import RegistryServer, TurnConfig
from tests.coturn import Coturn, coturn_server
from tests.peer_transport.helpers import REAL, mesh

pytestmark = [pytest.mark.timeout(90), pytest.mark.system]
SECRET = "radmesh-test-secret"


@pytest.fixture
def coturn(tmp_path: Path) -> Iterator[Coturn]:
    with coturn_server(tmp_path, SECRET, (49160, 49260)) as server:
        yield server


async def _registry_minted_ice_server(coturn: Coturn, tmp_path: Path) -> IceServer:
    """TURN credentials as a node gets them: minted by a real registry over its WebSocket."""
    turn_url = f"turn:127.0.0.1:{coturn.port}?transport=udp"
    server = RegistryServer(tmp_path / "registry.db", turn=TurnConfig(SECRET, (turn_url,)))
    url = await server.start("127.0.0.1", 0)
    identity = Identity.generate()
    client = RegistryClient(url, identity)
    try:  # the registry mints credentials only for nodes with a current record there
        await client.publish(NodeRecord.create(identity, now=int(time.time()), sequence=1))
        creds = await client.turn_credentials()
    finally:
        await client.close()
        await server.stop()
    return IceServer(creds.urls, creds.username, creds.password)


async def test_relay_only_connection_carries_data_through_coturn(
    coturn: Coturn, tmp_path: Path
) -> None:
    turn = await _registry_minted_ice_server(coturn, tmp_path)
    # Relay-only ICE waits on coturn's allocations and permissions: 0.5 s on a quiet
    # machine, once over the suite's 10 s in a clean-clone run with every worker busy.
    options = replace(
        REAL, rtc=RtcOptions(ice_servers=(turn,), relay_only=True), connect_timeout=30.0
    )
    async with mesh(real=True) as m:
        a, b = await m.node(options=options), await m.node(options=options)
        m.trust(a, b)
        conn_a = await a.connect(b.identity.public_key)
        conn_b = await b.accept(10)
        for conn in (conn_a, conn_b):
            assert conn._session is not None
            assert conn._session.link.selected_candidate_types() == ("relay", "relay")

        payload = [os.urandom(fr.MAX_BULK_PAYLOAD) for _ in range(8)]
        sender = asyncio.ensure_future(_send(conn_a, payload))
        got = [await _bulk(conn_b) for _ in payload]
        await sender
        assert got == payload
        text = coturn.log.read_text(errors="replace")
        assert text.count("Local relay addr: 127.0.0.1") >= 2  # one allocation per side
        assert "peer 127.0.0.1" in text  # permissions for the other side's relay

        # Relay-only means coturn is the one path: stop it and the link dies.
        coturn.proc.terminate()
        coturn.proc.wait(5)
        lost = await _next_disconnect(conn_a)
        assert "heartbeat" in lost.reason or "WebRTC" in lost.reason


async def _next_disconnect(conn: PeerConnection) -> Disconnected:
    while True:
        event = await conn.next_event(10)
        if isinstance(event, Disconnected):
            return event


async def _send(conn: PeerConnection, chunks: list[bytes]) -> None:
    for chunk in chunks:
        await conn.send_bulk(chunk)


async def _bulk(conn: PeerConnection) -> bytes:
    while True:
        event = await conn.next_event(20)
        if isinstance(event, Received) and event.channel == "bulk":
            return event.data
