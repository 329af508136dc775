"""The registry server: HTTP API for signed records, signaling WebSocket, TURN credentials.

A registry is untrusted by design. It stores records that nodes signed, so it
cannot forge them; it relays sealed envelopes it cannot read; it learns who
talks to whom and when, nothing more.

Why one module: One aiohttp application: its routes, the relay socket and the limits
they share (per address, per key) live with the app that owns them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import os
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from crypto.errors import CryptoError
from crypto.identity import NodeId
from crypto.org import verify_certificate
from registry import wsproto
from registry.errors import AuthError, RecordError, RegistryError, StaleRecord, TlsSetupError
from registry.limits import MailboxQuota, RateLimiter, address_key
from registry.netguard import (
    AddressGuard,
    GuardedSite,
    Outbox,
    Relayed,
    SharedSockets,
    handler_factory,
    headers_arrived,
)
from registry.records import MAX_RECORD_SIZE, Availability, NodeRecord
from registry.storage import (
    MailOffer,
    RegistryStore,
    SqliteStore,
    node_key,
    parse_node,
)
from registry.store import RegistryDB, Stored

log = logging.getLogger(__name__)

MAX_QUERY_VALUE = 64
AUTH_TIMEOUT = 10.0
MAX_TURN_TTL = 6 * 3600


@dataclass(frozen=True)
class TurnConfig:
    """coturn's shared secret and URLs. Credentials go only to nodes with a current record
    here and, when ``trusted_orgs`` is set, a certificate from one of those organisations."""

    secret: str
    urls: tuple[str, ...]
    ttl: int = 1800
    trusted_orgs: frozenset[bytes] = frozenset()

    def __post_init__(self) -> None:
        if not 60 <= self.ttl <= MAX_TURN_TTL:
            raise ValueError(f"TURN credential lifetime must be 60 s to {MAX_TURN_TTL} s")


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
    address_send_rate: float = 200.0  # relayed messages, all nodes of one address together
    address_send_burst: float = 1000
    mailbox_ttl: int = 7 * 24 * 3600
    mailbox: MailboxQuota = field(default_factory=MailboxQuota)
    # Mail waits only for nodes with a record here, current or expired at most this long
    # ago (a node off for the weekend still gets its mail; 0 = current records only).
    mail_record_grace: int = 7 * 24 * 3600
    max_records: int = 100_000  # records kept, current or in their grace period
    new_record_rate: float = 0.1  # records of nodes new to this registry, per address
    new_record_burst: float = 20
    max_connections: int = 10_000  # signaling sockets, all addresses together
    address_sockets: int = 32  # open TCP connections per address (HTTP and WebSocket)
    connect_rate: float = 20.0  # new TCP connections per address, per second
    connect_burst: float = 100
    header_timeout: float = 10.0  # a connection's first request headers, from connect
    idle_timeout: float = 30.0  # an HTTP keep-alive connection between requests
    body_timeout: float = 10.0  # a record's body, once the headers are in
    send_queue: int = 64  # frames waiting for one signaling socket before it is dropped
    send_timeout: float = 10.0  # one write to a signaling socket before it is dropped
    turn_rate: float = 1 / 60  # TURN credentials per node, per second
    turn_burst: float = 5


@dataclass
class RegistryServer:
    """``start(host, port)`` / ``stop()``; ``app`` alone serves the aiohttp test client."""

    db_path: str | Path
    public_url: str = ""
    turn: TurnConfig | None = None
    limits: Limits = field(default_factory=Limits)
    clock: Callable[[], float] = time.time
    purge_interval: float = 60.0
    poll_interval: float = 2.0  # shared storage: mail no notification announced
    # Reverse proxies in front (TLS at the proxy): their X-Forwarded-For names the client.
    trusted_proxies: frozenset[str] = frozenset()
    # Serve HTTPS/WSS directly (server_tls_context); None: plain HTTP, for loopback or a
    # reverse proxy that terminates TLS.
    tls: ssl.SSLContext | None = None

    def __post_init__(self) -> None:
        self.store: RegistryStore = open_store(self.db_path)
        self._inflight: dict[NodeId, set[int]] = {}  # mailbox ids queued to each socket
        self._background: set[asyncio.Task[None]] = set()
        self._dropping: dict[NodeId, asyncio.Task[None]] = {}
        self._draining: dict[NodeId, bool] = {}  # recipient -> mail came in meanwhile
        self._poller: asyncio.Task[None] | None = None
        self._publish = RateLimiter(self.limits.publish_rate, self.limits.publish_burst)
        self._address = RateLimiter(self.limits.address_rate, self.limits.address_burst)
        self._send = RateLimiter(self.limits.send_rate, self.limits.send_burst)
        self._address_send = RateLimiter(
            self.limits.address_send_rate, self.limits.address_send_burst
        )
        self._new_record = RateLimiter(self.limits.new_record_rate, self.limits.new_record_burst)
        self._turn_limit = RateLimiter(self.limits.turn_rate, self.limits.turn_burst)
        self.trusted_proxies = frozenset(address_key(a) for a in self.trusted_proxies)
        self.guard = AddressGuard(
            self.limits.address_sockets,
            self.limits.connect_rate,
            self.limits.connect_burst,
            exempt=self.trusted_proxies,
            shared=SharedSockets(self._socket_open, self.store.socket_closed)
            if self.store.shared
            else None,
        )
        self.connections: dict[NodeId, Outbox] = {}
        self.accepted = 0  # signaling sockets authenticated so far (status, tests)
        self.replaced = 0  # of those, closed because a newer one took their place
        self._runner: web.AppRunner | None = None
        self._purger: asyncio.Task[None] | None = None
        self.app = self._build_app()

    # lifecycle -----------------------------------------------------------
    def _build_app(self) -> web.Application:
        app = web.Application(
            client_max_size=MAX_RECORD_SIZE + 1024,
            middlewares=[headers_arrived, self._errors_and_limits],
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

    def client_address(self, request: web.Request) -> str:
        """Whom per-address limits count: the peer, or behind a trusted proxy the address
        it appended last to X-Forwarded-For (earlier entries are the client's own claim)."""
        peer = address_key(request.remote)
        if peer in self.trusted_proxies:
            forwarded = request.headers.get("X-Forwarded-For", "").rsplit(",", 1)[-1].strip()
            if forwarded:
                return address_key(forwarded)
        return peer

    @property
    def db(self) -> RegistryDB:
        """The SQLite database itself (tests and tools; the server goes through ``store``)."""
        if not isinstance(self.store, SqliteStore):
            raise RegistryError("this registry's database is PostgreSQL, not SQLite")
        return self.store.db

    async def _on_startup(self, app: web.Application) -> None:
        await self.store.open()
        self.store.on_mail(self._mail_arrived)
        self.store.on_kick(self._taken_elsewhere)
        self._purger = asyncio.create_task(self._purge_loop())
        if self.store.shared:
            self._poller = asyncio.create_task(self._poll_loop())

    async def _on_shutdown(self, app: web.Application) -> None:
        closing = [
            o.ws.close(code=1001, message=b"registry shutting down")
            for o in list(self.connections.values())
        ]
        with contextlib.suppress(TimeoutError):  # one bound for all: some may not read
            async with asyncio.timeout(self.limits.send_timeout):
                await asyncio.gather(*closing, return_exceptions=True)

    async def _on_cleanup(self, app: web.Application) -> None:
        for task in (self._purger, self._poller):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self.store.close()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        factory = handler_factory(
            self._runner,
            self.guard,
            self.clock,
            header_timeout=self.limits.header_timeout,
            idle_timeout=self.limits.idle_timeout,
        )
        site = GuardedSite(
            self._runner,
            host,
            port,
            factory,
            ssl_context=self.tls,
            handshake_timeout=self.limits.header_timeout,
        )
        await site.start()
        bound = int(self._runner.addresses[0][1])
        if not self.public_url:
            self.public_url = f"{'https' if self.tls else 'http'}://{host}:{bound}"
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
            try:
                removed = await self.store.purge(self.now(), self.limits.mail_record_grace)
            except (OSError, RegistryError) as exc:
                log.warning("purging the registry database failed: %s", exc)
                continue
            if removed:
                log.debug("purged %d expired records and messages", removed)

    # middleware ----------------------------------------------------------
    @web.middleware
    async def _errors_and_limits(
        self, request: web.Request, handler: Callable[[web.Request], object]
    ) -> web.StreamResponse:
        address = self.client_address(request)
        try:
            if not await self._allow_address(self._address, "address", address):
                wait = self._address.retry_after(address) or 1 / self.limits.address_rate
                return _error(
                    429,
                    "too many requests from this address",
                    f"slow down; retry after {wait:.1f} s",
                )
            response = await handler(request)  # type: ignore[misc]
        except web.HTTPRequestEntityTooLarge:
            return _error(
                413, "request body too large", f"a record is at most {MAX_RECORD_SIZE} bytes"
            )
        except web.HTTPException as exc:
            if exc.status >= 400:
                return _error(exc.status, exc.reason, "check the URL and method")
            raise
        except RegistryError as exc:  # the shared database is unavailable
            log.warning("answered 503: %s", exc)
            return _error(503, str(exc), "try again shortly, or another registry")
        assert isinstance(response, web.StreamResponse)  # noqa: S101 - aiohttp contract
        return response

    # HTTP ----------------------------------------------------------------
    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "status": "ok",
                "records": await self.store.count(self.now()),
                "connected": len(self.connections),
                "turn": self.turn is not None,
            }
        )

    async def _publish_record(self, request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > MAX_RECORD_SIZE:
            return _error(413, "record too large", f"a record is at most {MAX_RECORD_SIZE} bytes")
        try:
            async with asyncio.timeout(self.limits.body_timeout):
                data = await request.read()
        except TimeoutError:
            return _error(408, "the record took too long to arrive", "check the connection")
        now = self.now()
        try:
            record = NodeRecord.from_wire(data).verify(now)
        except RecordError as exc:
            return _error(400, str(exc), "sign the record with the node key and a future expiry")
        if not await self._allow(self._publish, "publish", str(record.node_id)):
            return _error(429, "this node publishes too often", "publish at most once a second")
        refused = await self._refuse_new_node(record.node_id, self.client_address(request))
        if refused is not None:
            return refused
        try:
            await self.store.put(record, now)
        except StaleRecord as exc:
            # The record held, signed by the node itself: proof of the sequence to beat
            # (kept past its expiry for the mail grace period, so a lookup may not show it).
            held = await self.store.get_wire(record.node_id, -1) or b""
            return web.json_response(
                {
                    "error": str(exc),
                    "hint": "publish with a sequence above the one this registry holds",
                    "held_record": base64.b64encode(held).decode(),
                },
                status=409,
            )
        except RecordError as exc:
            return _error(400, str(exc), "publish a valid record")
        return web.json_response({"node_id": str(record.node_id), "seq": record.sequence})

    async def _allow(self, limiter: RateLimiter, kind: str, key: str) -> bool:
        """One token from a bucket: in this process, or shared by every instance."""
        if not self.store.shared:
            return limiter.allow(key, self.clock())
        return await self.store.rate_allow(kind, key, limiter.rate, limiter.burst, self.clock())

    async def _allow_address(self, limiter: RateLimiter, kind: str, key: str) -> bool:
        """A per-address token: from this process's bucket (a flood is refused without a
        database round trip) and, with several instances, from the shared one too."""
        if not limiter.allow(key, self.clock()):
            return False
        return not self.store.shared or await self.store.rate_allow(
            kind, key, limiter.rate, limiter.burst, self.clock()
        )

    async def _socket_open(self, address: str) -> bool:
        """A new TCP connection, against the connect rate and the socket cap of all
        instances together (several instances only; each also has its own caps)."""
        limits = self.limits
        if not await self.store.rate_allow(
            "connect", address, limits.connect_rate, limits.connect_burst, self.clock()
        ):
            return False
        return await self.store.socket_open(address, limits.address_sockets)

    async def _refuse_new_node(self, node_id: NodeId, address: str) -> web.Response | None:
        """Records of nodes new here cost disk: a cap in all and a rate per address."""
        if await self.store.known_since(node_id, -1):
            return None
        if await self.store.record_count() >= self.limits.max_records:
            return _error(507, "this registry holds as many records as it can", "use another")
        if not await self._allow(self._new_record, "new_record", address):
            return _error(
                429, "too many new nodes from this address", "publish again in a few minutes"
            )
        return None

    async def _lookup(self, request: web.Request) -> web.Response:
        try:
            node_id = NodeId.parse(request.match_info["node_id"][:80])
        except CryptoError as exc:
            return _error(400, str(exc), "use the id printed by `radmesh id`")
        wire = await self.store.get_wire(node_id, self.now())
        if wire is None:
            return _error(404, "no current record for this node", "the node may be offline")
        return web.Response(body=wire, content_type="application/octet-stream")

    async def _search(self, request: web.Request) -> web.Response:
        query = request.query
        allowed = {
            "subspecialty",
            "jurisdiction",
            "language",
            "online",
            "on_call",
            "after",
            "limit",
        }
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
        for flag in ("online", "on_call"):
            if values[flag] not in ("", "0", "1"):
                return _error(400, f"{flag} must be 0 or 1", f"use {flag}=1 to ask for it")
        # Each flag asks for that availability; both ask for either; none for any.
        availability = tuple(
            a.value
            for a, flag in ((Availability.ONLINE, "online"), (Availability.ON_CALL, "on_call"))
            if values[flag] == "1"
        )
        try:
            limit = int(values["limit"] or 50)
        except ValueError:
            return _error(400, "limit must be a number", "use limit=1..100")
        if not 1 <= limit <= 100:
            return _error(400, "limit must be between 1 and 100", "page with after=<last node id>")
        wires = await self.store.search(
            self.now(),
            subspecialty=values["subspecialty"],
            jurisdiction=values["jurisdiction"],
            language=values["language"],
            availability=availability,
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
        outbox: Outbox | None = None
        try:
            node_id = await self._authenticate(ws)
            outbox = self._outbox(ws, request.transport, node_id, self.client_address(request))
            self.accepted += 1
            old = self.connections.get(node_id)
            self.connections[node_id] = outbox
            if old is not None:
                self._retire(old, "replaced by a newer connection")
            await self.store.connected(node_id)
            pending = await self.store.mailbox_peek(node_id, self.now())
            # Only now may mail be queued to it: nothing goes out before Ready (a client
            # drops a connection whose first frame is not Ready, and the mail with it).
            self._inflight[node_id] = set()
            outbox.push(wsproto.to_wire(wsproto.Ready(node_id, len(pending))))
            for stored in pending:  # deleted once written; what is not stays for next time
                if not await self._deliver_stored(outbox, node_id, stored):
                    break
            if self.store.shared:  # what other instances stored since the peek
                self._mail_arrived(node_id, 0)
            await self._serve(ws, outbox, node_id)
        except AuthError as exc:
            await _ws_error(ws, str(exc), "sign the challenge of this registry with the node key")
        except (RegistryError, TimeoutError) as exc:
            if outbox is not None:
                _push_error(outbox, str(exc), "the connection is closed; reconnect")
            else:
                await _ws_error(ws, str(exc), "the connection is closed; reconnect")
        finally:
            if node_id is not None and self.connections.get(node_id) is outbox:
                del self.connections[node_id]
                self._inflight.pop(node_id, None)
                with contextlib.suppress(OSError, RegistryError):
                    await self.store.disconnected(node_id)
            if outbox is not None:
                await self._finish(outbox)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.limits.send_timeout):
                    await ws.close()
            if request.transport is not None and not ws.closed:
                request.transport.abort()
        return ws

    def _outbox(
        self,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport | None,
        node_id: NodeId,
        address: str,
    ) -> Outbox:
        def sent(relayed: Relayed) -> None:
            if relayed.stored_id:
                self._spawn(self._delete_sent(node_id, relayed.stored_id))

        def dropped(unsent: list[Relayed]) -> None:
            # Live messages its reader never took wait in the mailbox like any other
            # (stored ones are still there).
            live = [r for r in unsent if not r.stored_id]
            if live:
                task = self._spawn(self._keep_all(node_id, live))
                self._dropping[node_id] = task

        return Outbox(
            ws,
            transport,
            size=self.limits.send_queue,
            timeout=self.limits.send_timeout,
            on_drop=dropped,
            on_sent=sent,
            address=address,
        )

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _delete_sent(self, node_id: NodeId, message_id: int) -> None:
        """A message written to its socket leaves the mailbox; until its row is gone it
        stays marked in flight, so a drain running meanwhile does not send it again."""
        try:
            await self.store.mailbox_delete([message_id])
        except Exception as exc:  # it stays, and may be delivered twice: harmless
            log.warning("could not delete a delivered message: %s", exc)
        finally:
            self._inflight.get(node_id, set()).discard(message_id)

    async def _keep_all(self, node_id: NodeId, unsent: list[Relayed]) -> None:
        try:
            for relayed in unsent:
                await self._keep_for_later(node_id, relayed.sender, relayed.data, relayed.origin)
        except (OSError, RegistryError) as exc:
            log.warning("could not keep %d undelivered messages: %s", len(unsent), exc)
        finally:
            if self._dropping.get(node_id) is asyncio.current_task():
                del self._dropping[node_id]

    async def _deliver_stored(self, outbox: Outbox, node_id: NodeId, stored: Stored) -> bool:
        """Queue a mailbox message to its recipient's socket (once per socket)."""
        inflight = self._inflight.get(node_id)
        if inflight is None or stored.id in inflight:
            return True
        inflight.add(stored.id)
        deliver = wsproto.Deliver(stored.sender, node_id, stored.data)
        return await outbox.put(
            wsproto.to_wire(deliver), Relayed(stored.sender, stored.data, stored.id)
        )

    def _mail_arrived(
        self, recipient: NodeId, message_id: int, stored: Stored | None = None
    ) -> None:
        """Another instance (or this one) stored mail for a node: deliver it if it is here.
        Notifications come in commit order: one that carries the message is queued at
        once; otherwise one drain per recipient at a time reads the mailbox, oldest first."""
        outbox = self.connections.get(recipient)
        inflight = self._inflight.get(recipient)
        if outbox is None or outbox.dropped or inflight is None or message_id in inflight:
            return
        if stored is not None and recipient not in self._draining:
            inflight.add(message_id)
            deliver = wsproto.to_wire(wsproto.Deliver(stored.sender, recipient, stored.data))
            outbox.push(deliver, Relayed(stored.sender, stored.data, message_id))
            return
        if recipient in self._draining:
            self._draining[recipient] = True  # look again when this drain is done
            return
        self._draining[recipient] = False
        self._spawn(self._drain(outbox, recipient))

    async def _drain(self, outbox: Outbox, recipient: NodeId) -> None:
        try:
            while not outbox.dropped:
                self._draining[recipient] = False
                pending = await self.store.mailbox_peek(
                    recipient, self.now(), self.limits.mailbox.recipient_messages
                )
                for stored in pending:
                    if not await self._deliver_stored(outbox, recipient, stored):
                        return
                if not self._draining.get(recipient):
                    return
        except Exception as exc:  # the database went away: the poll tries again
            log.warning("could not deliver mail from the shared mailbox: %s", exc)
        finally:
            self._draining.pop(recipient, None)

    def _taken_elsewhere(self, node_id: NodeId, instance: str) -> None:
        """The node connected to another instance: one socket per node, the newest."""
        outbox = self.connections.get(node_id)
        if outbox is not None and not outbox.dropped:
            self._spawn(self._retire_if_elsewhere(node_id, outbox))

    async def _retire_if_elsewhere(self, node_id: NodeId, outbox: Outbox) -> None:
        """A kick can be stale: the node left the other instance and came back here
        meanwhile (its socket here is then the newest). Retiring is for good on the node's
        side, so it takes the presence table to agree that the node is held elsewhere."""
        try:
            elsewhere = await self.store.online_elsewhere(node_id)
        except Exception as exc:  # the database went away: close it, and let it come back
            log.warning("could not check where a node is connected: %s", exc)
            outbox.drop("replaced by a newer connection to another registry instance, perhaps")
            return
        if elsewhere and self.connections.get(node_id) is outbox:
            self._retire(outbox, "replaced by a newer connection to another registry instance")

    def _retire(self, outbox: Outbox, reason: str) -> None:
        """One socket per node, the newest: the older is told why (a node started twice
        stops reconnecting instead of taking the place back forever), then closed."""
        if not outbox.dropped:
            self.replaced += 1
        outbox.retire(wsproto.to_wire(wsproto.Replaced()), reason, wsproto.CLOSE_REPLACED)

    async def _poll_loop(self) -> None:
        """Mail for connected nodes that no notification announced (a LISTEN connection
        that broke, an instance that died after storing): delivered within a poll."""
        while True:
            await asyncio.sleep(self.poll_interval)
            if not self.connections:
                continue
            try:
                waiting = await self.store.mailbox_waiting(
                    [node_key(n) for n in self.connections], self.now()
                )
            except Exception as exc:  # the database went away: try again next time
                log.warning("polling the shared mailbox failed: %s", exc)
                continue
            for recipient, message_id in waiting:
                self._mail_arrived(parse_node(recipient), message_id)

    async def _finish(self, outbox: Outbox) -> None:
        """Let frames already queued (the last error) go out, briefly, then stop."""
        if not outbox.dropped:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await outbox.drain()
        await outbox.close()

    async def _authenticate(self, ws: web.WebSocketResponse) -> NodeId:
        challenge = os.urandom(wsproto.CHALLENGE_SIZE)
        async with asyncio.timeout(self.limits.send_timeout):
            await ws.send_bytes(wsproto.to_wire(wsproto.Challenge(challenge, self.public_url)))
        message = await ws.receive(timeout=AUTH_TIMEOUT)
        if message.type != WSMsgType.BINARY:
            raise AuthError("expected an auth frame")
        frame = wsproto.from_wire(message.data)
        if not isinstance(frame, wsproto.Auth):
            raise AuthError("expected an auth frame first")
        return wsproto.check_auth(frame, challenge, self.public_url)

    async def _serve(self, ws: web.WebSocketResponse, outbox: Outbox, node_id: NodeId) -> None:
        async for message in ws:
            if message.type != WSMsgType.BINARY:
                if message.type == WSMsgType.ERROR:
                    return
                raise RegistryError("only binary frames are accepted")
            frame = wsproto.from_wire(message.data)
            if isinstance(frame, wsproto.Send):
                await self._relay(outbox, node_id, frame)
            elif isinstance(frame, wsproto.TurnRequest):
                await self._turn_request(outbox, node_id)
            else:
                raise RegistryError(f"unexpected {frame.T!r} frame from a node")
            if outbox.dropped:
                return

    async def _turn_request(self, outbox: Outbox, node_id: NodeId) -> None:
        """TURN relays cost bandwidth: only for nodes this registry knows, now, not too often."""
        if self.turn is None:
            _push_error(outbox, "this registry offers no TURN relay", "use another")
            return
        if not await self._allow(self._turn_limit, "turn", str(node_id)):
            _push_error(outbox, "asking for TURN credentials too often", "reuse the ones you have")
            return
        now = self.now()
        wire = await self.store.get_wire(node_id, now)
        if wire is None:
            _push_error(
                outbox,
                "TURN credentials are only for nodes with a current record here",
                "publish this node's record to this registry, then ask again",
            )
            return
        if self.turn.trusted_orgs:
            record = NodeRecord.from_wire(wire)
            cert = record.org_certificate
            try:
                if cert is None:
                    raise CryptoError("the record carries no organisation certificate")
                verify_certificate(
                    cert, trusted_orgs=self.turn.trusted_orgs, now=now, node_key=record.public_key
                )
            except CryptoError as exc:
                _push_error(
                    outbox,
                    f"this registry's TURN relay serves member organisations only: {exc}",
                    "publish a record carrying a certificate from a member organisation",
                )
                return
        await self.store.turn_issued(node_id, now)
        outbox.push(wsproto.to_wire(turn_credentials(self.turn, node_id, now)))

    async def _relay(self, outbox: Outbox, sender: NodeId, frame: wsproto.Send) -> None:
        now = self.clock()
        if not self._send.allow(node_key(sender), now) or not self._address_send.allow(
            outbox.address, now
        ):
            hint = f"at most {self.limits.send_rate:g} messages a second"
            _push_error(outbox, "sending too fast", hint, frame.ref)
            return
        if self.store.shared:
            await self._relay_shared(outbox, sender, frame)
            return
        target = self.connections.get(frame.to)
        if target is not None and not target.dropped:
            deliver = wsproto.to_wire(wsproto.Deliver(sender, frame.to, frame.data))
            # Never waits: a target that does not read loses its socket, not the sender.
            if target.push(deliver, Relayed(sender, frame.data, origin=outbox.address)):
                outbox.push(wsproto.to_wire(wsproto.Ack(frame.ref, "delivered")))
                return
            # Its queue was full and it is dropped: this message waits with the others.
            if (pending := self._dropping.get(frame.to)) is not None:
                await asyncio.wait([pending])  # after those, in order
        refused = await self._keep_for_later(frame.to, sender, frame.data, outbox.address)
        if refused is None:
            outbox.push(wsproto.to_wire(wsproto.Ack(frame.ref, "stored")))
        else:
            _push_error(outbox, refused, "try again later", frame.ref)

    async def _relay_shared(self, outbox: Outbox, sender: NodeId, frame: wsproto.Send) -> None:
        """Several instances: every message is written to the shared mailbox before it is
        acknowledged (an instance that dies loses nothing acknowledged), then handed to
        the recipient's socket here, or by the instance holding it (notified)."""
        target = self.connections.get(frame.to)
        here = target is not None and not target.dropped
        # The address's relay rate across instances, in parallel with the presence look-up
        # (two connections of the pool: no added latency).
        rate = self.limits.address_send_rate, self.limits.address_send_burst
        allowed, online = await asyncio.gather(
            self.store.rate_allow("address_send", outbox.address, *rate, self.clock()),
            _true() if here else self.store.online_elsewhere(frame.to),
        )
        if not allowed:
            hint = f"at most {self.limits.address_send_rate:g} messages a second from an address"
            _push_error(outbox, "sending too fast", hint, frame.ref)
            return
        ident, refused = await self._offer(frame.to, sender, frame.data, outbox.address, online)
        if refused is not None:
            _push_error(outbox, refused, "try again later", frame.ref)
            return
        if here and target is not None:
            self._inflight.setdefault(frame.to, set()).add(ident)
            deliver = wsproto.to_wire(wsproto.Deliver(sender, frame.to, frame.data))
            online = target.push(deliver, Relayed(sender, frame.data, ident, outbox.address))
        status = "delivered" if online else "stored"
        outbox.push(wsproto.to_wire(wsproto.Ack(frame.ref, status)))

    async def _offer(
        self, recipient: NodeId, sender: NodeId, data: bytes, origin: str, online: bool = False
    ) -> tuple[int, str | None]:
        now = self.now()
        offer = MailOffer(
            recipient,
            sender,
            data,
            now,
            self.limits.mailbox_ttl,
            origin,
            self.limits.mailbox,
            # Mail waits only for known nodes; a node connected right now gets it anyway.
            None if online else now - self.limits.mail_record_grace,
        )
        return await self.store.mailbox_offer(offer)

    async def _keep_for_later(
        self, recipient: NodeId, sender: NodeId, data: bytes, origin: str
    ) -> str | None:
        """Store a message in the mailbox; the reason when a quota refuses it."""
        return (await self._offer(recipient, sender, data, origin))[1]


async def _true() -> bool:
    return True


def _push_error(outbox: Outbox, error: str, hint: str, ref: int = -1) -> None:
    outbox.push(wsproto.to_wire(wsproto.Error(error[:1024], hint[:1024], ref)))


def _error(status: int, error: str, hint: str) -> web.Response:
    return web.json_response({"error": error, "hint": hint}, status=status)


async def _ws_error(ws: web.WebSocketResponse, error: str, hint: str, ref: int = -1) -> None:
    if not ws.closed:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.send_bytes(wsproto.to_wire(wsproto.Error(error[:1024], hint[:1024], ref)))


def server_tls_context(cert_file: str | Path, key_file: str | Path) -> ssl.SSLContext:
    """TLS for ``registry run --tls-cert/--tls-key``: the certificate chain (PEM, leaf
    first) and its private key (PEM, unencrypted: the service starts unattended)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=cert_file, keyfile=key_file)
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError(
            f"cannot serve TLS with certificate {cert_file} and key {key_file} ({exc}): "
            "give a PEM certificate chain (leaf first) and its unencrypted PEM private key"
        ) from exc
    return context


def _shown(db: str | Path) -> str:
    """The database as printed: a PostgreSQL URL without its password."""
    text = str(db)
    if "://" in text and "@" in text:
        scheme, rest = text.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}"
    return text


async def run_forever(server: RegistryServer, host: str, port: int) -> None:
    url = await server.start(host, port)
    print(f"radmesh registry listening on {url} (database {_shown(server.db_path)})", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()


def open_store(db: str | Path) -> RegistryStore:
    """``postgresql://…`` (or ``postgres://…``) selects PostgreSQL; anything else is a
    SQLite file path."""
    if isinstance(db, str) and db.startswith(("postgresql://", "postgres://")):
        from registry.pgstore import PostgresStore  # asyncpg only when asked for

        return PostgresStore(db)
    return SqliteStore(db)
