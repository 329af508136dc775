"""Behind a reverse proxy (several instances behind one URL, TLS at the proxy), the
per-address limits count the client the proxy forwards, not the proxy itself."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import aiohttp

from registry.server import Limits, RegistryServer
from tests.registry.conftest import Clock

LIMITS = Limits(address_rate=0.001, address_burst=2, address_sockets=2)


def registry(
    tmp_path: Path, clock: Clock, proxies: frozenset[str]
) -> AbstractAsyncContextManager[RegistryServer]:
    @asynccontextmanager
    async def run() -> AsyncIterator[RegistryServer]:
        server = RegistryServer(
            tmp_path / "r.db", clock=clock, limits=LIMITS, trusted_proxies=proxies
        )
        await server.start("127.0.0.1", 0)
        try:
            yield server
        finally:
            await server.stop()

    return run()


async def _status(url: str, forwarded: str) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}/v1/health", headers={"X-Forwarded-For": forwarded}) as response,
    ):
        return response.status


async def test_a_trusted_proxy_s_clients_are_limited_one_by_one(
    tmp_path: Path, clock: Clock
) -> None:
    async with registry(tmp_path, clock, frozenset({"127.0.0.1"})) as server:
        url = server.url
        assert await _status(url, "10.0.0.1") == 200
        assert await _status(url, "10.0.0.1") == 200
        assert await _status(url, "10.0.0.1") == 429
        # The client cannot dodge it by prepending its own claim: the proxy's entry counts.
        assert await _status(url, "192.0.2.7, 10.0.0.1") == 429
        assert await _status(url, "10.0.0.2") == 200  # another client is not affected


async def test_forwarded_headers_from_anyone_else_are_ignored(tmp_path: Path, clock: Clock) -> None:
    async with registry(tmp_path, clock, frozenset()) as server:
        url = server.url
        assert await _status(url, "10.0.0.1") == 200
        assert await _status(url, "10.0.0.2") == 200
        assert await _status(url, "10.0.0.3") == 429  # all three were 127.0.0.1


async def _sockets_served(url: str, count: int) -> int:
    """Open ``count`` sockets at once and ask on each; how many were answered."""
    host, port = url.removeprefix("http://").split(":")
    opened = [await asyncio.open_connection(host, int(port)) for _ in range(count)]
    served = 0
    try:
        for n, (reader, writer) in enumerate(opened):
            writer.write(
                b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.1.0.%d\r\n\r\n" % n
            )
            await writer.drain()
            async with asyncio.timeout(5):
                served += (await reader.read(12)).startswith(b"HTTP/1.1 200")
    finally:
        for _, writer in opened:
            writer.close()
    return served


async def test_the_socket_cap_does_not_apply_to_a_trusted_proxy(
    tmp_path: Path, clock: Clock
) -> None:
    async with registry(tmp_path, clock, frozenset({"127.0.0.1"})) as server:
        assert await _sockets_served(server.url, 4) == 4  # the proxy's limit_conn caps clients
        assert server.guard.refused == 0
    async with registry(tmp_path, clock, frozenset()) as server:
        assert await _sockets_served(server.url, 4) == 2  # a plain client: two sockets at most
        assert server.guard.refused == 2
