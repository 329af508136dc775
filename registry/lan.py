"""The node's small LAN HTTP endpoint: its own signed record and direct signaling.

``GET /v1/record`` serves the node's current signed record so a peer that
heard of it by mDNS can fetch and verify it. ``POST /v1/signal`` accepts one
sealed envelope (size-capped) and hands it to a callback; the transport opens
it with ``open_sealed``, so this endpoint needs no authentication of its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from crypto.identity import NodeId
from registry.errors import RegistryUnavailable, RemoteRegistryError
from registry.httpclient import client_session
from registry.limits import RateLimiter, address_key
from registry.netguard import AddressGuard, GuardedSite, handler_factory, headers_arrived
from registry.records import MAX_RECORD_SIZE, NodeRecord, bare_http_url, parse_verified
from registry.wsproto import MAX_SEALED

FETCH_TIMEOUT = 5.0
# The endpoint listens on the LAN: the registry's socket defences, with tighter caps.
ADDRESS_SOCKETS = 16  # open connections per address
CONNECT_RATE, CONNECT_BURST = 10.0, 50  # new connections per address
HEADER_TIMEOUT = 10.0  # first request's headers, from connect
IDLE_TIMEOUT = 15.0  # keep-alive between requests
BODY_TIMEOUT = 10.0  # a signal's body, once the headers are in


class LanEndpoint:
    def __init__(
        self,
        record_provider: Callable[[], NodeRecord],
        on_signal: Callable[[bytes], Awaitable[None]],
        *,
        rate: float = 20.0,
        burst: float = 100,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._record_provider = record_provider
        self._on_signal = on_signal
        self._limiter = RateLimiter(rate, burst, max_keys=10_000)
        self._clock = clock
        self.guard = AddressGuard(ADDRESS_SOCKETS, CONNECT_RATE, CONNECT_BURST)
        self._runner: web.AppRunner | None = None
        self.url = ""
        self.app = web.Application(client_max_size=MAX_SEALED, middlewares=[headers_arrived])
        self.app.router.add_get("/v1/record", self._record)
        self.app.router.add_post("/v1/signal", self._signal)

    async def start(self, host: str, port: int = 0) -> str:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        factory = handler_factory(
            self._runner,
            self.guard,
            self._clock,
            header_timeout=HEADER_TIMEOUT,
            idle_timeout=IDLE_TIMEOUT,
        )
        await GuardedSite(self._runner, host, port, factory).start()
        bound = int(self._runner.addresses[0][1])
        self.url = f"http://{host}:{bound}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _allowed(self, request: web.Request) -> bool:
        return self._limiter.allow(address_key(request.remote), self._clock())

    async def _record(self, request: web.Request) -> web.Response:
        if not self._allowed(request):
            return web.json_response(
                {"error": "too many requests", "hint": "slow down"}, status=429
            )
        return web.Response(
            body=self._record_provider().to_wire(), content_type="application/octet-stream"
        )

    async def _signal(self, request: web.Request) -> web.Response:
        if not self._allowed(request):
            return web.json_response(
                {"error": "too many requests", "hint": "slow down"}, status=429
            )
        if request.content_length is None or request.content_length > MAX_SEALED:
            return web.json_response(
                {"error": "signal missing length or too large", "hint": f"at most {MAX_SEALED}"},
                status=413,
            )
        try:
            async with asyncio.timeout(BODY_TIMEOUT):
                data = await request.read()
        except TimeoutError:
            return web.json_response(
                {"error": "signal took too long to arrive", "hint": "check the link"}, status=408
            )
        except web.HTTPRequestEntityTooLarge:
            return web.json_response(
                {"error": "signal too large", "hint": f"at most {MAX_SEALED} bytes"}, status=413
            )
        await self._on_signal(data)
        return web.json_response({"status": "accepted"}, status=202)


async def _session_request(
    method: str, url: str, limit: int, data: bytes | None = None
) -> tuple[int, bytes]:
    try:
        async with (
            client_session(FETCH_TIMEOUT) as session,
            session.request(method, url, data=data, allow_redirects=False) as response,
        ):
            body = await response.content.read(limit + 1)
            if len(body) > limit:
                raise RemoteRegistryError(url, response.status, "response too large")
            return response.status, body
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise RegistryUnavailable(url, type(exc).__name__) from exc


def endpoint_url(base_url: str, path: str) -> str:
    """Our own fixed ``path`` on a peer's LAN endpoint, built from its validated host and
    port only (raises :class:`~registry.errors.BadEndpoint` for anything else)."""
    scheme, host, port = bare_http_url(base_url)
    netloc = f"[{host}]" if ":" in host else host
    return f"{scheme}://{netloc}:{port}{path}"


async def fetch_record(base_url: str, now: int, expected: NodeId | None = None) -> NodeRecord:
    """Fetch a node's record from its LAN endpoint and verify it (and whose it is)."""
    url = endpoint_url(base_url, "/v1/record")
    status, body = await _session_request("GET", url, MAX_RECORD_SIZE)
    if status != 200:
        raise RemoteRegistryError(url, status, "peer did not serve its record")
    return parse_verified(body, now, expected)


async def post_signal(base_url: str, sealed: bytes) -> None:
    """Send one sealed envelope directly to a peer's LAN endpoint."""
    if len(sealed) > MAX_SEALED:
        raise RemoteRegistryError(base_url, 413, f"signal over {MAX_SEALED} bytes")
    url = endpoint_url(base_url, "/v1/signal")
    status, body = await _session_request("POST", url, 4096, sealed)
    if status != 202:
        raise RemoteRegistryError(url, status, body[:200].decode(errors="replace"))
