"""Nodes take TURN credentials from their registry and connect through a real coturn."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from node.app.runtime import NodeRuntime
from peer_transport.rtc import IceServer, RtcOptions
from registry.server import RegistryServer, TurnConfig
from tests.coturn import Coturn, coturn_server
from tests.node.test_runtime import FAST, REAL, make_home, wait_for
from tests.peer_transport.test_turn import SECRET

pytestmark = [pytest.mark.timeout(120), pytest.mark.system]


@pytest.fixture
def coturn(tmp_path: Path) -> Iterator[Coturn]:
    with coturn_server(tmp_path, SECRET, (49300, 49400)) as server:
        yield server


# No ICE servers of their own, relay candidates only: a connection exists only if the
# TURN credentials the registry minted reached the transport.
RELAY_ONLY = replace(REAL, rtc=RtcOptions(ice_servers=(), relay_only=True))


async def test_two_nodes_connect_through_the_relay_their_registry_hands_out(
    coturn: Coturn,
    tmp_path: Path,
) -> None:
    turn_url = f"turn:127.0.0.1:{coturn.port}?transport=udp"
    server = RegistryServer(tmp_path / "registry.db", turn=TurnConfig(SECRET, (turn_url,)))
    registry = await server.start("127.0.0.1", 0)
    nodes: list[NodeRuntime] = []
    try:
        for name in ("rural", "neuro"):
            home, identity = make_home(tmp_path, name, registry, [])
            node = NodeRuntime(home, identity, transport_options=RELAY_ONLY)
            await node.start()
            nodes.append(node)
        a, b = nodes
        for node in nodes:
            await wait_for(lambda n=node: bool(n.transport.turn_servers))
            assert node.status().turn == f"relay from registry {registry}"
        a.trust.mark_verified(b.identity.node_id, a.now())
        b.trust.mark_verified(a.identity.node_id, b.now())
        assert await b.directory.resolve(a.identity.node_id, b.now()) is not None

        conn = await a.transport.connect(b.identity.public_key)
        assert conn._session is not None
        assert conn._session.link.selected_candidate_types() == ("relay", "relay")
        assert "Local relay addr: 127.0.0.1" in coturn.log.read_text(errors="replace")
    finally:
        for node in nodes:
            await node.stop()
        await server.stop()


async def test_a_registry_without_a_relay_leaves_the_node_without_turn(
    tmp_path: Path, registry: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="node.app.runtime")
    home, identity = make_home(tmp_path, "rural", registry, [])
    node = NodeRuntime(home, identity, transport_options=FAST)
    await node.start()
    try:
        await wait_for(lambda: "offers no TURN relay" in caplog.text)  # asked, and answered
        assert node.transport.turn_servers == ()
        assert node.status().turn == "none"
    finally:
        await node.stop()


async def test_turn_servers_in_the_config_carry_the_configured_credentials(
    tmp_path: Path,
) -> None:
    home, identity = make_home(tmp_path, "rural", "", [])
    config = home.load_config()
    network = replace(
        config.network,
        ice_servers=["stun:stun.hospital.example:3478", "turn:turn.hospital.example:3478"],
        turn_username="radmesh",
        turn_password="from-it",
    )
    home.save_config(replace(config, network=network))
    node = NodeRuntime(home, identity)  # the transport options come from config.toml
    await node.start()
    try:
        assert node.transport.options.rtc.ice_servers == (
            IceServer(("stun:stun.hospital.example:3478",)),  # STUN takes no credentials
            IceServer(("turn:turn.hospital.example:3478",), "radmesh", "from-it"),
        )
    finally:
        await node.stop()
