"""The registry server: HTTP API for signed records, signaling WebSocket, TURN credentials.

A registry is untrusted by design. It stores records that nodes signed, so it
cannot forge them; it relays sealed envelopes it cannot read; it learns who
talks to whom and when, nothing more.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import WSMsgType, web

from crypto.errors import CryptoError
from crypto.identity import NodeId
from registry import wsproto
from registry.errors import AuthError, RecordError, RegistryError, StaleRecord
from registry.limits import RateLimiter
from registry.records import MAX_RECORD_SIZE, NodeRecord
from registry.store import RegistryDB

log = logging.getLogger(__name__)

MAX_QUERY_VALUE = 64
AUTH_TIMEOUT = 10.0


@dataclass(frozen=True)
class TurnConfig:
    secret: str
    urls: tuple[str, ...]
    ttl: int = 3600


def turn_credentials(config: TurnConfig, node_id: NodeId, now: int) -> wsproto.TurnCredentials:
    """coturn's REST-API scheme (``use-auth-secret``): the password is HMAC-SHA1 of the name."""
    username = f"{now + config.ttl}:{node_id}"
    digest = hmac.new(config.secret.encode(), username.encode(), hashlib.sha1).digest()
    return wsproto.TurnCredentials(
        username, base64.b64encode(digest).decode(), config.ttl, config.urls
    )


@dataclass(frozen=True)
class Limits:
    publish_rate: float = 1.0  # per node, per second
    publish_burst: float = 10
    address_rate: float = 50.0  # every HTTP request and WS connect, per address
    address_burst: float = 200
    send_rate: float = 50.0  # relayed messages, per node
    send_burst: float = 200
    mailbox_ttl: int = 7 * 24 * 3600
    mailbox_cap: int = 256
    max_connections: int = 10_000


@dataclass
class RegistryServer:
    """``start(host, port)`` / ``stop()``; ``app`` alone serves the aiohttp test client."""

    db_path: str | Path
    public_url: str = ""
    turn: TurnConfig | None = None
    limits: Limits = field(default_factory=Limits)
    clock: Callable[[], float] = time.time
    purge_interval: float = 60.0

    def __post_init__(self) -> None:
        self.db = RegistryDB(self.db_path)
        self._publish = RateLimiter(self.limits.publish_rate, self.limits.publish_burst)
        self._address = RateLimiter(self.limits.address_rate, self.limits.address_burst)
        self._send = RateLimiter(self.limits.send_rate, self.limits.send_burst)
        self.connections: dict[NodeId, web.WebSocketResponse] = {}
        self._runner: web.AppRunner | None = None
        self._purger: asyncio.Task[None] | None = None
        self.app = self._build_app()

    # lifecycle -----------------------------------------------------------
    def _build_app(self) -> web.Application:
        app = web.Application(
            client_max_size=MAX_RECORD_SIZE + 1024, middlewares=[self._errors_and_limits]
        )
        app.router.add_get("/v1/health", self._health)
        app.router.add_post("/v1/records", self._publish_record)
        app.router.add_get("/v1/records/{node_id}", self._lookup)
        app.router.add_get("/v1/search", self._search)
        app.router.add_get("/v1/ws", self._websocket)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        self._purger = asyncio.create_task(self._purge_loop())

    async def _on_shutdown(self, app: web.Application) -> None:
        for ws in list(self.connections.values()):
            await ws.close(code=1001, message=b"registry shutting down")

    async def _on_cleanup(self, app: web.Application) -> None:
        if self._purger is not None:
            self._purger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purger
        self.db.close()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = int(self._runner.addresses[0][1])
        if not self.public_url:
            self.public_url = f"http://{host}:{bound}"
        return self.public_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        return self.public_url

    def now(self) -> int:
        return int(self.clock())

    async def _purge_loop(self) -> None:
        while True:
            await asyncio.sleep(self.purge_interval)
            removed = self.db.purge(self.now())
            if removed:
                log.debug("purged %d expired records and messages", removed)

    # middleware ----------------------------------------------------------
    @web.middleware
    async def _errors_and_limits(
        self, request: web.Request, handler: Callable[[web.Request], object]
    ) -> web.StreamResponse:
        address = request.remote or "?"
        if not self._address.allow(address, self.clock()):
            return _error(
                429,
                "too many requests from this address",
                f"slow down; retry after {self._address.retry_after(address):.1f} s",
            )
        try:
            response = await handler(request)  # type: ignore[misc]
        except web.HTTPRequestEntityTooLarge:
            return _error(
                413, "request body too large", f"a record is at most {MAX_RECORD_SIZE} bytes"
            )
        except web.HTTPException as exc:
            if exc.status >= 400:
                return _error(exc.status, exc.reason, "check the URL and method")
            raise
        assert isinstance(response, web.StreamResponse)  # noqa: S101 - aiohttp contract
        return response

    # HTTP ----------------------------------------------------------------
    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "status": "ok",
                "records": self.db.count(self.now()),
                "connected": len(self.connections),
                "turn": self.turn is not None,
            }
        )

    async def _publish_record(self, request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > MAX_RECORD_SIZE:
            return _error(413, "record too large", f"a record is at most {MAX_RECORD_SIZE} bytes")
        data = await request.read()
        now = self.now()
        try:
            record = NodeRecord.from_wire(data).verify(now)
        except RecordError as exc:
            return _error(400, str(exc), "sign the record with the node key and a future expiry")
        if not self._publish.allow(str(record.node_id), self.clock()):
            return _error(429, "this node publishes too often", "publish at most once a second")
        try:
            self.db.put(record, now)
        except StaleRecord as exc:
            return _error(409, str(exc), "increase the sequence number")
        except RecordError as exc:
            return _error(400, str(exc), "publish a valid record")
        return web.json_response({"node_id": str(record.node_id), "seq": record.sequence})

    async def _lookup(self, request: web.Request) -> web.Response:
        try:
            node_id = NodeId.parse(request.match_info["node_id"][:80])
        except CryptoError as exc:
            return _error(400, str(exc), "use the id printed by `radmesh id`")
        wire = self.db.get_wire(node_id, self.now())
        if wire is None:
            return _error(404, "no current record for this node", "the node may be offline")
        return web.Response(body=wire, content_type="application/octet-stream")

    async def _search(self, request: web.Request) -> web.Response:
        query = request.query
        allowed = {"subspecialty", "jurisdiction", "language", "online", "after", "limit"}
        unknown = set(query) - allowed
        if unknown:
            return _error(
                400,
                f"unknown search parameter {sorted(unknown)[0][:20]!r}",
                f"use {sorted(allowed)}",
            )
        values = {k: query.get(k, "") for k in allowed}
        if any(len(v) > MAX_QUERY_VALUE for v in values.values()) or len(query) > len(allowed):
            return _error(400, "search parameter too long", f"at most {MAX_QUERY_VALUE} characters")
        if values["online"] not in ("", "0", "1"):
            return _error(400, "online must be 0 or 1", "use online=1 for nodes online now")
        try:
            limit = int(values["limit"] or 50)
        except ValueError:
            return _error(400, "limit must be a number", "use limit=1..100")
        if not 1 <= limit <= 100:
            return _error(400, "limit must be between 1 and 100", "page with after=<last node id>")
        wires = self.db.search(
            self.now(),
            subspecialty=values["subspecialty"],
            jurisdiction=values["jurisdiction"],
            language=values["language"],
            online=values["online"] == "1",
            after=values["after"],
            limit=limit,
        )
        return web.json_response({"records": [base64.b64encode(w).decode() for w in wires]})

    # WebSocket -----------------------------------------------------------
    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        if len(self.connections) >= self.limits.max_connections:
            return _error(503, "registry is full", "try another registry or later")
        ws = web.WebSocketResponse(max_msg_size=wsproto.MAX_FRAME, heartbeat=30.0)
        await ws.prepare(request)
        node_id: NodeId | None = None
        try:
            node_id = await self._authenticate(ws)
            old = self.connections.get(node_id)
            self.connections[node_id] = ws
            if old is not None:
                await old.close(code=4000, message=b"replaced by a newer connection")
            pending = self.db.mailbox_peek(node_id, self.now())
            await ws.send_bytes(wsproto.to_wire(wsproto.Ready(node_id, len(pending))))
            delivered: list[int] = []
            try:
                for stored in pending:
                    await ws.send_bytes(
                        wsproto.to_wire(wsproto.Deliver(stored.sender, node_id, stored.data))
                    )
                    delivered.append(stored.id)
            finally:
                # What could not be written stays for the next connection.
                self.db.mailbox_delete(delivered)
            await self._serve(ws, node_id)
        except AuthError as exc:
            await _ws_error(ws, str(exc), "sign the challenge of this registry with the node key")
        except (RegistryError, TimeoutError) as exc:
            await _ws_error(ws, str(exc), "the connection is closed; reconnect")
        finally:
            if node_id is not None and self.connections.get(node_id) is ws:
                del self.connections[node_id]
            await ws.close()
        return ws

    async def _authenticate(self, ws: web.WebSocketResponse) -> NodeId:
        challenge = os.urandom(wsproto.CHALLENGE_SIZE)
        await ws.send_bytes(wsproto.to_wire(wsproto.Challenge(challenge, self.public_url)))
        message = await ws.receive(timeout=AUTH_TIMEOUT)
        if message.type != WSMsgType.BINARY:
            raise AuthError("expected an auth frame")
        frame = wsproto.from_wire(message.data)
        if not isinstance(frame, wsproto.Auth):
            raise AuthError("expected an auth frame first")
        return wsproto.check_auth(frame, challenge, self.public_url)

    async def _serve(self, ws: web.WebSocketResponse, node_id: NodeId) -> None:
        async for message in ws:
            if message.type != WSMsgType.BINARY:
                if message.type == WSMsgType.ERROR:
                    return
                raise RegistryError("only binary frames are accepted")
            frame = wsproto.from_wire(message.data)
            if isinstance(frame, wsproto.Send):
                await self._relay(ws, node_id, frame)
            elif isinstance(frame, wsproto.TurnRequest):
                if self.turn is None:
                    await _ws_error(ws, "this registry offers no TURN relay", "use another")
                else:
                    creds = turn_credentials(self.turn, node_id, self.now())
                    await ws.send_bytes(wsproto.to_wire(creds))
            else:
                raise RegistryError(f"unexpected {frame.T!r} frame from a node")

    async def _relay(self, ws: web.WebSocketResponse, sender: NodeId, frame: wsproto.Send) -> None:
        if not self._send.allow(str(sender), self.clock()):
            await _ws_error(ws, "sending too fast", "at most 50 messages a second", frame.ref)
            return
        target = self.connections.get(frame.to)
        deliver = wsproto.to_wire(wsproto.Deliver(sender, frame.to, frame.data))
        if target is not None and not target.closed:
            try:
                await target.send_bytes(deliver)
            except (ConnectionError, RuntimeError):
                target = None
            else:
                await ws.send_bytes(wsproto.to_wire(wsproto.Ack(frame.ref, "delivered")))
                return
        stored = self.db.mailbox_put(
            frame.to,
            sender,
            frame.data,
            now=self.now(),
            ttl=self.limits.mailbox_ttl,
            cap=self.limits.mailbox_cap,
        )
        if stored:
            await ws.send_bytes(wsproto.to_wire(wsproto.Ack(frame.ref, "stored")))
        else:
            await _ws_error(ws, "recipient's mailbox is full", "try again later", frame.ref)


def _error(status: int, error: str, hint: str) -> web.Response:
    return web.json_response({"error": error, "hint": hint}, status=status)


async def _ws_error(ws: web.WebSocketResponse, error: str, hint: str, ref: int = -1) -> None:
    if not ws.closed:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.send_bytes(wsproto.to_wire(wsproto.Error(error[:1024], hint[:1024], ref)))


async def run_forever(server: RegistryServer, host: str, port: int) -> None:
    url = await server.start(host, port)
    print(f"radmesh registry listening on {url} (database {server.db_path})", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()
