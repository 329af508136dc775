"""TURN credentials handed out by the registry are accepted by a real coturn (loopback)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aioice import stun, turn

from crypto.identity import Identity
from registry.client import RegistryClient
from registry.server import RegistryServer, TurnConfig
from tests.coturn import coturn_server
from tests.registry.conftest import make_record

SECRET = "registry-test-secret"
ALICE = Identity(bytes([51]) * 32)


@pytest.fixture
def coturn(tmp_path: Path) -> Iterator[int]:
    with coturn_server(tmp_path, SECRET, (49000, 49100)) as server:
        yield server.port


async def _allocate(port: int, username: str, password: str) -> tuple[str, int]:
    last: Exception | None = None
    for _ in range(20):  # coturn takes a moment to start listening
        try:
            transport, _ = await asyncio.wait_for(
                turn.create_turn_endpoint(
                    asyncio.DatagramProtocol, ("127.0.0.1", port), username, password
                ),
                3,
            )
        except ConnectionRefusedError as exc:
            last = exc
            await asyncio.sleep(0.2)
            continue
        relayed: tuple[str, int] = transport.get_extra_info("sockname")
        transport.close()
        return relayed
    raise AssertionError(f"coturn never answered: {last!r}")


@pytest.mark.slow
@pytest.mark.system
async def test_registry_turn_credentials_allocate_on_real_coturn(
    coturn: int, tmp_path: Path
) -> None:
    config = TurnConfig(SECRET, (f"turn:127.0.0.1:{coturn}",), ttl=600)
    server = RegistryServer(tmp_path / "r.db", turn=config)
    await server.start("127.0.0.1", 0)
    try:
        async with RegistryClient(server.url, ALICE) as client:
            await client.publish(make_record(ALICE, now=int(time.time())))
            creds = await client.turn_credentials()
    finally:
        await server.stop()
    relayed = await _allocate(coturn, creds.username, creds.password)
    assert relayed[0] == "127.0.0.1"
    # A wrong password (e.g. another registry's secret) is refused by coturn.
    with pytest.raises(stun.TransactionFailed, match="401"):
        await _allocate(coturn, creds.username, creds.password[:-4] + "AAA=")
