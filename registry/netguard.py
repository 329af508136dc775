"""The registry server's defences at the socket: per-address caps, timeouts, slow readers.

aiohttp parses a request before any middleware sees it, and keeps a connection
that never finishes its headers for as long as it likes. So the registry counts
sockets per address when the TCP connection is made (:class:`AddressGuard`,
sans-IO), closes those over the cap before a byte is parsed, and closes a
connection whose first request is not complete within the header timeout
(:class:`GuardedHandler`). Keep-alive idle time is aiohttp's ``keepalive_timeout``.

Every frame the registry writes to one signaling socket goes through that
socket's :class:`Outbox`: a bounded queue drained by one task with a timeout per
write. A peer that stops reading fills its own queue and is dropped; whoever
was relaying to it never waits on it. A socket another took the place of is
*retired*: its peer is told why in one last frame, then the socket closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from crypto.identity import NodeId
from registry.errors import RegistryError
from registry.limits import RateLimiter, address_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Relayed:
    """A relayed message inside a queued frame: kept for later if the frame is not sent."""

    sender: NodeId
    data: bytes
    stored_id: int = 0  # its mailbox row, when it came from the mailbox
    origin: str = ""  # the sender's address key, for the mailbox's per-address quota


@dataclass(frozen=True)
class SharedSockets:
    """Per-address socket counts and connect rates kept where every instance sees them.

    ``admit`` counts one socket (False: over the cap or the connect rate of all
    instances together, and nothing counted); ``release`` uncounts an admitted one."""

    admit: Callable[[str], Awaitable[bool]]
    release: Callable[[str], Awaitable[None]]


@dataclass
class AddressGuard:
    """Open sockets per address (capped) and new connections per address (rate-limited)."""

    max_sockets: int
    connect_rate: float
    connect_burst: float
    open: dict[str, int] = field(default_factory=dict)
    refused: int = 0
    # Trusted reverse proxies: every client comes through them, so they are not capped
    # here (the proxy caps its clients; the registry limits the forwarded address).
    exempt: frozenset[str] = frozenset()
    # Several instances: a socket admitted here is then checked against all of them.
    shared: SharedSockets | None = None

    def __post_init__(self) -> None:
        self._connects = RateLimiter(self.connect_rate, self.connect_burst)
        self.tasks: set[asyncio.Task[None]] = set()

    def spawn(self, call: Awaitable[None]) -> asyncio.Future[None]:
        task = asyncio.ensure_future(call)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def admit(self, address: str, now: float) -> bool:
        """Count a new socket from ``address``; False (and not counted) if over a limit."""
        if address in self.exempt:
            return True
        if self.open.get(address, 0) >= self.max_sockets or not self._connects.allow(address, now):
            self.refused += 1
            return False
        self.open[address] = self.open.get(address, 0) + 1
        return True

    def release(self, address: str) -> None:
        left = self.open.get(address, 0) - 1
        if left > 0:
            self.open[address] = left
        else:
            self.open.pop(address, None)


class GuardedHandler(RequestHandler):
    """aiohttp's connection handler, admitted by an :class:`AddressGuard` and closed when
    its first request's headers take longer than ``header_timeout``."""

    def __init__(
        self,
        manager: web.Server,
        *,
        guard: AddressGuard,
        clock: Callable[[], float],
        header_timeout: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, loop=asyncio.get_running_loop(), **kwargs)
        self._guard = guard
        self._clock = clock
        self._header_timeout = header_timeout
        self._address: str | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._counted = False  # counted in the shared socket table
        self._admission: asyncio.Future[None] | None = None
        self._refused = False  # over the shared caps: closing

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        address = address_key(str(peer[0])) if isinstance(peer, tuple) and peer else "?"
        if not self._guard.admit(address, self._clock()):
            log.debug("refused a connection from %s: too many sockets or connects", address)
            self.force_close()
            return
        self._address = address
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self._header_timeout, self._headers_too_slow)
        if self._guard.shared is not None and address not in self._guard.exempt:
            self._admission = self._guard.spawn(self._admit_shared(self._guard.shared, address))

    async def admitted(self) -> bool:
        """Wait for the shared caps' verdict on this socket (no request is served on a
        socket over them); True when admitted or there are none."""
        if self._admission is not None:
            await asyncio.shield(self._admission)
        return not self._refused and self._address is not None

    async def _admit_shared(self, shared: SharedSockets, address: str) -> None:
        """The caps of all instances together; a socket over them is closed."""
        try:
            admitted = await shared.admit(address)
        except (OSError, RegistryError) as exc:  # the local caps still hold
            log.warning("could not count a socket in the shared database: %s", exc)
            return
        if not admitted:
            self._refused = True
            self._guard.refused += 1
            log.debug("refused a connection from %s: too many sockets or connects", address)
            self.force_close()
            return
        if self._address is None:  # it closed meanwhile
            await _release_shared(shared, address)
            return
        self._counted = True

    def request_started(self) -> None:
        """Headers of a request arrived (the app saw it): the header timeout is met."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_too_slow(self) -> None:
        self._deadline = None
        log.debug("closed a connection from %s: no complete request in time", self._address)
        self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._address is not None:
            self._guard.release(self._address)
            if self._counted and self._guard.shared is not None:
                self._guard.spawn(_release_shared(self._guard.shared, self._address))
            self._counted = False
            self._address = None
        super().connection_lost(exc)


async def _release_shared(shared: SharedSockets, address: str) -> None:
    try:
        await shared.release(address)
    except (OSError, RegistryError) as exc:  # its row goes with this instance's heartbeat
        log.warning("could not uncount a socket in the shared database: %s", exc)


class GuardedSite(web.TCPSite):
    """A TCP site whose connections are :class:`GuardedHandler` s."""

    def __init__(
        self,
        runner: web.AppRunner,
        host: str,
        port: int,
        factory: Callable[[], RequestHandler],
        *,
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout: float = 10.0,
    ) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context)
        self._factory = factory
        self._handshake_timeout = handshake_timeout

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        loop = asyncio.get_running_loop()
        # A TLS handshake completes before the handler sees the connection: bound it as
        # the header timeout bounds a slow request.
        self._server = await loop.create_server(
            self._factory,
            self._host,
            self._port,
            backlog=self._backlog,
            ssl=self._ssl_context,
            ssl_handshake_timeout=self._handshake_timeout if self._ssl_context else None,
        )


def handler_factory(
    runner: web.AppRunner,
    guard: AddressGuard,
    clock: Callable[[], float],
    *,
    header_timeout: float,
    idle_timeout: float,
) -> Callable[[], RequestHandler]:
    """Connection handlers for a :class:`GuardedSite` of ``runner`` (after its setup)."""
    server = runner.server
    if server is None:
        raise RuntimeError("set the runner up before making its handlers")

    def make() -> RequestHandler:
        return GuardedHandler(
            server,
            guard=guard,
            clock=clock,
            header_timeout=header_timeout,
            keepalive_timeout=idle_timeout,
            access_log=None,
            max_headers=32,
            max_field_size=4096,
            max_line_size=4096,
        )

    return make


@web.middleware
async def headers_arrived(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Tell the connection its request is in (the header timeout is met)."""
    if isinstance(request.protocol, GuardedHandler):
        request.protocol.request_started()
        if not await request.protocol.admitted():
            return web.Response(status=429, text="too many connections from this address")
    return await handler(request)


class Outbox:
    """The frames waiting to be written to one signaling socket.

    ``push`` never waits: it queues, or, when the queue is full, drops the socket
    (its reader is too slow). The writer task gives each write ``timeout``
    seconds; a write that takes longer drops the socket too. A dropped socket's
    unsent frames go to ``on_drop`` (the registry keeps relayed ones for later).
    ``retire`` closes it like ``drop`` but writes one last frame first.
    """

    def __init__(
        self,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport | None,
        *,
        size: int,
        timeout: float,
        on_drop: Callable[[list[Relayed]], None],
        on_sent: Callable[[Relayed], None],
        address: str = "?",
    ) -> None:
        self.ws = ws
        self._transport = transport
        self._timeout = timeout
        # (frame, the message it relays, last: close the socket once it is written)
        self._queue: asyncio.Queue[tuple[bytes, Relayed | None, bool]] = asyncio.Queue(size)
        self._retiring = False
        self._close_code = 1000
        self._writing: Relayed | None = None
        self._on_drop = on_drop
        self._on_sent = on_sent
        self.address = address  # the peer's address key, for per-address limits
        self.dropped = ""
        self._task = asyncio.get_running_loop().create_task(self._run())

    def push(self, frame: bytes, relayed: Relayed | None = None) -> bool:
        """Queue ``frame``; ``relayed`` is the message it carries, kept if it is not sent."""
        if self.dropped or self.ws.closed:
            return False
        try:
            self._queue.put_nowait((frame, relayed, False))
        except asyncio.QueueFull:
            self.drop("its reader is too slow: its send queue is full")
            return False
        return True

    async def put(self, frame: bytes, relayed: Relayed | None = None) -> bool:
        """Queue ``frame``, waiting up to the write timeout for room (mailbox flushes)."""
        if self.dropped or self.ws.closed:
            return False
        try:
            async with asyncio.timeout(self._timeout):
                await self._queue.put((frame, relayed, False))
        except TimeoutError:
            self.drop("its reader is too slow: its send queue stayed full")
            return False
        return True

    async def _run(self) -> None:
        while True:
            frame, relayed, last = await self._queue.get()
            self._writing = relayed
            try:
                async with asyncio.timeout(self._timeout):
                    await self.ws.send_bytes(frame)
            except TimeoutError:
                self.drop(f"its reader is too slow: a write took over {self._timeout:g} s")
                self._abort()  # a retiring socket is dropped already: abort it all the same
                return
            except (ConnectionError, RuntimeError):
                self.drop("the connection broke")
                self._abort()
                return
            self._writing = None
            self._queue.task_done()
            if relayed is not None:
                self._on_sent(relayed)
            if last:
                await self._close_after_last()
                return

    async def _close_after_last(self) -> None:
        """The closing handshake after the last frame, so it is read before the close (an
        abort would discard it from the send buffer); a peer that does not answer in time
        is aborted."""
        try:
            async with asyncio.timeout(self._timeout):
                await self.ws.close(code=self._close_code, message=b"replaced")
        except (TimeoutError, ConnectionError, RuntimeError):
            self._abort()

    async def drain(self) -> None:
        """Wait until every queued frame is written."""
        await self._queue.join()

    def _unsent(self) -> list[Relayed]:
        # The frame being written when it stopped counts as unsent: a duplicate is
        # harmless (recipients drop replays), a loss is not.
        unsent = [self._writing] if self._writing is not None else []
        self._writing = None
        while not self._queue.empty():
            item = self._queue.get_nowait()[1]
            if item is not None:
                unsent.append(item)
        return unsent

    def drop(self, reason: str) -> None:
        """Close the socket at once (no closing handshake: its peer may not read)."""
        if self.dropped:
            return
        self.dropped = reason
        log.info("dropped a signaling socket: %s", reason)
        unsent = self._unsent()
        self._abort()
        if asyncio.current_task() is not self._task:
            self._task.cancel()
        self._on_drop(unsent)

    def _abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def retire(self, last: bytes, reason: str, code: int) -> None:
        """Close the socket because another took its place, telling its peer why: ``last``
        is written after the frame being written now, then the socket closes with
        ``code``. Frames still queued are not sent: they go to ``on_drop`` like a dropped
        socket's (the registry keeps them for the socket that took this one's place)."""
        if self.dropped:
            return
        self.dropped = reason
        self._retiring = True
        self._close_code = code
        log.info("closing a signaling socket: %s", reason)
        unsent = self._unsent()
        self._queue.put_nowait((last, None, True))  # emptied just now: there is room
        self._on_drop(unsent)

    async def close(self) -> None:
        """Stop the writer (the socket is closing for another reason); what was not
        written goes to ``on_drop`` like a dropped socket's."""
        already = bool(self.dropped)
        self.dropped = self.dropped or "closed"
        if self._retiring:  # its last frame and close, each bounded by the write timeout
            await asyncio.wait([self._task])
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if not already:
            self._on_drop(self._unsent())
