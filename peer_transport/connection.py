"""Authenticated, encrypted node-to-node connections: :class:`Transport`, :class:`PeerConnection`.

See the package docstring (``peer_transport/__init__.py``) for the API tour. The
lifecycle rules (link and connection states, bulk credit) are the tables in
:mod:`peer_transport.session`; this module is their I/O: the transport (signaling,
glare, handshake), the connection (requests, channels, reconnects) and the per-link
session. Study transfers over a connection (``ChannelLink`` and the mux that routes
them by transfer id) live in :mod:`peer_transport.mux`.

Why one module: the transport, the connection and the per-link session each drive the
others' state (a link failing reconnects its connection; a connection closing ends its
link), and the tables in :mod:`peer_transport.session` are only kept if those three
steps stay in view together.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace

from crypto import handshake as hs
from crypto.channel import DatagramOpener, DatagramSealer, StreamOpener, StreamSealer
from crypto.envelope import ReplayGuard
from crypto.errors import CryptoError
from crypto.identity import Identity, NodeId
from node.core.supervise import supervise
from peer_transport import frames as fr
from peer_transport.errors import (
    ConnectionClosed,
    ConnectionLost,
    ConnectTimeout,
    FrameTooLarge,
    HandshakeFailed,
    LocalProtocolError,
    PeerNotReading,
    PeerRejected,
    RemoteError,
    RemoteProtocolError,
    RequestTimeout,
    SignalingError,
    TransportError,
)
from peer_transport.rtc import CHANNELS, IceServer, Link, LinkFactory, RtcLink, RtcOptions
from peer_transport.session import (
    CONNECTION,
    LINK,
    BulkCredit,
    ConnEvent,
    ConnState,
    LinkEvent,
    LinkState,
)
from peer_transport.signaling import Signaling, SignalMessage

log = logging.getLogger(__name__)

_ALLOWED_ON = {
    "control": (
        fr.Ready,
        fr.Request,
        fr.Response,
        fr.ErrorReply,
        fr.Ping,
        fr.Pong,
        fr.Message,
        fr.BulkAck,
        fr.Close,
    ),
    "bulk": (fr.Bulk,),
    "live": (fr.Live,),
    "presence": (fr.Presence,),
}


@dataclass(frozen=True)
class TransportOptions:
    rtc: RtcOptions = field(default_factory=RtcOptions)
    # What carries the four channels: WebRTC, or ``memory.MemoryNetwork()`` in tests.
    link: LinkFactory = RtcLink
    connect_timeout: float = 20.0
    handshake_timeout: float = 10.0
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 3.5  # plus one interval: a dead peer is noticed within 5 s
    request_timeout: float = 10.0
    bulk_window: int = 3  # bulk frames sent but not consumed by the peer (~192 KiB in SCTP)
    # ...and while presence flows on the connection (a live session shares it): SCTP has one
    # send queue, so each bulk frame queued ahead of a cursor delays it by ~8 ms at 8 MB/s.
    live_bulk_window: int = 1
    live_quiet: float = 3.0  # seconds without presence after which the full window returns
    stall_timeout: float = 15.0  # no bulk credit for this long: the peer stopped reading
    reconnect: bool = True
    backoff_initial: float = 0.5
    backoff_max: float = 8.0
    reconnect_attempts: int = 20
    event_queue: int = 1024
    max_pending_handshakes: int = 16
    max_incoming_requests: int = 64  # per connection; more get a "busy" error reply


# Events a PeerConnection reports, in order, on one stream.
@dataclass(frozen=True)
class Connected:
    peer: bytes


@dataclass(frozen=True)
class Received:
    peer: bytes
    channel: str  # "message" (control), "bulk", "live" or "presence"
    data: bytes


@dataclass(frozen=True)
class Disconnected:
    peer: bytes
    reason: str
    will_retry: bool


@dataclass(frozen=True)
class Reconnected:
    peer: bytes


@dataclass(frozen=True)
class Closed:
    peer: bytes
    reason: str


Event = Connected | Received | Disconnected | Reconnected | Closed
RequestHandler = Callable[["PeerConnection", bytes], Awaitable[bytes]]


GLARE = "glare: both nodes called each other at once"


class _Glare(PeerRejected):
    """Our call lost a simultaneous-call tie-break; the peer's call takes its place."""


class RequestRefused(TransportError):
    """Raise from a request handler to send the peer a typed error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Session:
    """One link during and after the handshake: its state (``session.LINK``), crypto,
    heartbeat and incoming frames.

    It reports to its connection only through ``on_frame`` (a decoded frame allowed on
    its channel, from a peer still trusted: ``check_trust`` raises otherwise) and
    ``on_fail`` (the link failed, or the peer broke the protocol).
    """

    def __init__(
        self,
        peer: str,
        make_link: Callable[[_Session], Link],
        on_frame: Callable[[_Session, fr.Frame], None],
        on_fail: Callable[[_Session, BaseException], None],
        check_trust: Callable[[_Session], None],
    ) -> None:
        self.peer = peer  # short node id, for logs
        self._on_frame, self._on_fail, self._check_trust = on_frame, on_fail, check_trust
        self.state = LinkState.CONNECTING
        self.keys: hs.SessionKeys | None = None
        self.handshake_frames: asyncio.Queue[fr.Handshake] = asyncio.Queue(4)
        self.ready = asyncio.Event()
        self.sealers: dict[str, StreamSealer | DatagramSealer] = {}
        self.openers: dict[str, StreamOpener | DatagramOpener] = {}
        self.last_seen = asyncio.get_running_loop().time()
        self.link = make_link(self)
        self._ping_seq = itertools.count()
        self.heartbeat: asyncio.Task[None] | None = None

    @property
    def down(self) -> bool:
        return self.state is LinkState.DOWN

    @property
    def is_open(self) -> bool:
        """Keys are in place: every frame either way is sealed."""
        return self.state is LinkState.OPEN

    def fail(self) -> bool:
        """Mark the link down; False if it already was (whoever got here first acts)."""
        if self.down:
            return False
        self.state = LINK.fire(self.state, LinkEvent.FAIL)
        return True

    async def open_link(self, limit: float) -> None:
        await self.link.wait_open(limit)
        if self.down:
            raise ConnectionLost("the link went down while it was being set up")
        self.state = LINK.fire(self.state, LinkEvent.UP)

    # -- incoming ---------------------------------------------------------------
    def on_message(self, channel: str, data: bytes) -> None:
        if self.down:
            return
        try:
            self._receive(channel, data)
        except (TransportError, CryptoError) as exc:
            self._on_fail(self, exc)
        except Exception as exc:  # an application receiver failed: that message, not the link
            log.error(
                "a %s message from %s could not be handled and was dropped (%s)",
                channel,
                self.peer,
                type(exc).__name__,  # not its text: it may quote the peer's data
            )

    def _receive(self, channel: str, data: bytes) -> None:
        if len(data) > fr.MAX_MESSAGE:
            raise FrameTooLarge(f"message of {len(data)} bytes, limit is {fr.MAX_MESSAGE}")
        self.last_seen = asyncio.get_running_loop().time()
        if not self.is_open:
            frame = fr.decode(data)
            if channel != "control" or not isinstance(frame, fr.Handshake):
                raise RemoteProtocolError("the peer sent data before the handshake finished")
            try:
                self.handshake_frames.put_nowait(frame)
            except asyncio.QueueFull as exc:
                raise RemoteProtocolError("the peer flooded the handshake") from exc
            return
        frame = fr.decode(self.openers[channel].open(data))
        if not isinstance(frame, _ALLOWED_ON[channel]):
            raise RemoteProtocolError(
                f"{type(frame).__name__} frame is not allowed on the {channel} channel here"
            )
        self._check_trust(self)  # every frame: a revocation applies to the next one
        self._on_frame(self, frame)

    def on_down(self, reason: str) -> None:
        if not self.down:
            self._on_fail(self, ConnectionLost(reason))

    # -- outgoing ---------------------------------------------------------------
    def start_crypto(self, keys: hs.SessionKeys) -> None:
        if self.down:
            raise ConnectionLost("the link went down during the handshake")
        self.state = LINK.fire(self.state, LinkEvent.KEYED)
        for name in CHANNELS:
            send, receive = keys.channel_keys(name)
            if name == "presence":
                self.sealers[name], self.openers[name] = (
                    DatagramSealer(send),
                    DatagramOpener(receive),
                )
            else:
                self.sealers[name], self.openers[name] = StreamSealer(send), StreamOpener(receive)
        self.keys = keys

    def send(self, channel: str, frame: fr.Frame) -> None:
        if self.down:
            raise ConnectionLost("the connection is down")
        wire = frame.to_wire()
        self.link.send(channel, self.sealers[channel].seal(wire) if self.is_open else wire)

    async def run_heartbeat(self, options: TransportOptions) -> None:
        loop = asyncio.get_running_loop()
        while not self.down:
            await asyncio.sleep(options.heartbeat_interval)
            if loop.time() - self.last_seen > options.heartbeat_timeout:
                self._on_fail(
                    self, ConnectionLost(f"no heartbeat for {options.heartbeat_timeout:.1f} s")
                )
                return
            with contextlib.suppress(TransportError):
                self.send("control", fr.Ping(next(self._ping_seq)))

    async def close(self) -> None:
        self.fail()
        if self.heartbeat is not None and self.heartbeat is not asyncio.current_task():
            self.heartbeat.cancel()
        await self.link.close()


class PeerConnection:
    """A connection to one peer that survives reconnects. Obtain from :class:`Transport`."""

    def __init__(self, transport: Transport, peer: bytes, initiator: bool) -> None:
        self.transport = transport
        self.peer = peer
        self.initiator = initiator
        self.error: BaseException | None = None  # why it closed, if it did
        self._session: _Session | None = None
        self._state = ConnState.CONNECTING  # moved only by _move, through session.CONNECTION
        self._events: asyncio.Queue[Event] = asyncio.Queue(transport.options.event_queue)
        self._handlers: dict[str, RequestHandler] = {}
        self._receivers: dict[str, Callable[[bytes], None]] = {}
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._ids = itertools.count(1)
        options = transport.options
        self._bulk = BulkCredit(options.bulk_window, options.live_bulk_window, options.live_quiet)
        self._credit = asyncio.Event()  # set when credit may have come back
        self._settled = asyncio.Event()  # set while OPEN or CLOSED: waiters can go on
        self._tasks: set[asyncio.Task[None]] = set()
        self._serving = 0

    @property
    def peer_id(self) -> NodeId:
        return NodeId.from_public_key(self.peer)

    @property
    def state(self) -> ConnState:
        return self._state

    @property
    def is_connected(self) -> bool:
        return self._state is ConnState.OPEN

    @property
    def closed(self) -> bool:
        return self._state is ConnState.CLOSED

    def _move(self, event: ConnEvent) -> None:
        self._state = CONNECTION.fire(self._state, event)
        if self._state in (ConnState.OPEN, ConnState.CLOSED):
            self._settled.set()
        else:
            self._settled.clear()

    async def _wait_settled(self, within: float) -> bool:
        """Wait until the connection is open or closed; True if it is open."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._settled.wait()
        return self.is_connected

    def __repr__(self) -> str:
        return f"PeerConnection({self.peer_id.short()}, connected={self.is_connected})"

    # -- application API ----------------------------------------------------------
    def on_request(self, kind: str, handler: RequestHandler) -> None:
        """Answer requests of ``kind`` on this connection (overrides the transport's)."""
        self._handlers[kind] = handler

    def set_receiver(self, channel: str, callback: Callable[[bytes], None] | None) -> None:
        """Deliver ``channel`` ("message", "bulk", "live", "presence") to ``callback``
        instead of the event stream. Bulk is acknowledged when the callback returns."""
        if callback is None:
            self._receivers.pop(channel, None)
        else:
            self._receivers[channel] = callback

    async def events(self) -> AsyncIterator[Event]:
        """One stream of Connected / Received / Disconnected / Reconnected / Closed."""
        while True:
            event = await self._events.get()
            if isinstance(event, Received) and event.channel == "bulk":
                self._consumed_bulk()
            yield event
            if isinstance(event, Closed):
                return

    async def next_event(self, within: float | None = None) -> Event:
        async with asyncio.timeout(within):  # not wait_for: 3.11's can drop a cancel
            event = await self._events.get()
        if isinstance(event, Received) and event.channel == "bulk":
            self._consumed_bulk()
        return event

    async def request(
        self,
        kind: str,
        body: bytes,
        timeout: float | None = None,  # noqa: ASYNC109 - a per-request deadline is the API
    ) -> bytes:
        """Send a request on the control channel; return the peer's response body.

        Raises RemoteError (the peer's handler refused), RequestTimeout,
        ConnectionLost / ConnectionClosed.
        """
        session = await self._live_session()
        request_id = next(self._ids)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            session.send("control", fr.Request(request_id, kind, body))
            wait = timeout if timeout is not None else self.transport.options.request_timeout
            async with asyncio.timeout(wait):
                return await future
        except TimeoutError as exc:
            raise RequestTimeout(f"no response to {kind!r} within the timeout") from exc
        finally:
            self._pending.pop(request_id, None)

    async def send_message(self, data: bytes) -> None:
        """A one-way message on the control channel (ordered with requests)."""
        (await self._live_session()).send("control", fr.Message(data))

    async def send_live(self, data: bytes) -> None:
        (await self._live_session()).send("live", fr.Live(data))

    def send_presence(self, data: bytes) -> bool:
        """Fire and forget (unordered, no retransmits); False if not connected right now."""
        session = self._session
        if session is None or not session.is_open or self.closed:
            return False
        with contextlib.suppress(TransportError):
            self._require_trust(session)
            session.send("presence", fr.Presence(data))
            self._bulk.presence(asyncio.get_running_loop().time())
            return True
        return False

    async def send_bulk(self, data: bytes) -> None:
        """Send one bulk chunk (<= frames.MAX_BULK_PAYLOAD bytes), waiting for credit.

        At most ``bulk_window`` chunks are in flight (``live_bulk_window`` while
        presence flows on this connection): the peer acknowledges each chunk once
        its application consumed it, so SCTP never holds more than a few chunks of
        bulk ahead of presence and live messages. Raises PeerNotReading if no
        credit comes back within ``stall_timeout``.
        """
        if len(data) > fr.MAX_BULK_PAYLOAD:
            raise LocalProtocolError(f"bulk chunks are at most {fr.MAX_BULK_PAYLOAD} bytes")
        options = self.transport.options
        loop = asyncio.get_running_loop()
        deadline = loop.time() + options.stall_timeout
        while True:
            session = await self._live_session()
            if self._bulk.may_send(loop.time()):
                break
            self._credit.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                error = PeerNotReading(
                    f"the peer consumed no bulk data for {options.stall_timeout:.0f} s; "
                    "it was disconnected"
                )
                self._session_failed(session, error)
                raise error
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, 0.5)):
                    await self._credit.wait()
        session.send("bulk", fr.Bulk(self._bulk.sent, data))
        self._bulk.sent_one()

    async def close(self, reason: str = "closed by this node") -> None:
        await self._close(reason, None, notify=True)

    def new_session(self, make_link: Callable[[_Session], Link]) -> _Session:
        """A session on a new link, reporting to this connection (the transport attaches
        it once its handshake is done)."""
        return _Session(
            self.peer_id.short(),
            make_link,
            on_frame=self._dispatch,
            on_fail=self._session_failed,
            check_trust=self._require_trust,
        )

    def drop(self, error: RemoteProtocolError) -> None:
        """The peer misbehaved above the frames (in a study transfer, say): disconnect it,
        as for a malformed frame."""
        session = self._session
        if session is not None:
            self._session_failed(session, error)

    # -- internals ------------------------------------------------------------------
    async def _live_session(self) -> _Session:
        if not self.closed and not self.is_connected:
            await self._wait_settled(self.transport.options.connect_timeout)
            if not self.closed and not self.is_connected:
                raise ConnectionLost("the peer is not connected and did not come back")
        if self.closed:
            raise ConnectionClosed(f"connection is closed: {self.error or 'closed'}")
        session = self._session
        assert session is not None  # noqa: S101 - set whenever the connection is OPEN
        self._require_trust(session)  # nothing more leaves for a peer no longer trusted
        return session

    def _require_trust(self, session: _Session) -> None:
        """Drop the connection (raising PeerRejected) if the peer is no longer trusted.

        Checked for every frame in and out, not only when the connection opens: a
        revocation (or an expired or revoked certificate) applies to the next message.
        """
        if not session.is_open or self.transport.is_trusted(self.peer):
            return
        error = PeerRejected(f"node {self.peer_id.short()} is no longer trusted by this node")
        self._session_failed(session, error)
        # Soon, not now: the caller may be iterating the application's state (a live
        # session sending to each of its peers) that the hook changes.
        asyncio.get_running_loop().call_soon(self.transport.on_untrusted, self.peer)
        raise error

    def _emit(self, event: Event) -> None:
        try:
            self._events.put_nowait(event)
        except asyncio.QueueFull:
            if isinstance(event, Received) and event.channel == "presence":
                return  # presence is lossy by design
            self._spawn(self._close("this node's application is not reading events", None))

    def _consumed_bulk(self) -> None:
        consumed = self._bulk.consume()
        session = self._session
        if session is not None and session.is_open:
            with contextlib.suppress(TransportError):
                session.send("control", fr.BulkAck(consumed))

    def _deliver(self, channel: str, data: bytes) -> None:
        receiver = self._receivers.get(channel)
        if receiver is None:
            self._emit(Received(self.peer, channel, data))
            return
        receiver(data)
        if channel == "bulk":
            self._consumed_bulk()

    def _dispatch(self, session: _Session, frame: fr.Frame) -> None:
        match frame:
            case fr.Ping(seq):
                session.send("control", fr.Pong(seq))
            case fr.Pong():
                pass
            case fr.Ready():
                session.ready.set()
            case fr.Request(request_id, kind, body):
                if self._serving >= self.transport.options.max_incoming_requests:
                    busy = fr.ErrorReply(request_id, "busy", "too many requests in progress")
                    session.send("control", busy)
                else:
                    self._serving += 1
                    self._spawn(self._answer(session, request_id, kind, body))
            case fr.Response(request_id, body):
                future = self._pending.get(request_id)
                if future is not None and not future.done():
                    future.set_result(body)
            case fr.ErrorReply(request_id, code, message):
                future = self._pending.get(request_id)
                if future is not None and not future.done():
                    future.set_exception(RemoteError(code, message))
            case fr.Message(data):
                self._deliver("message", data)
            case fr.Bulk(seq, data):
                self._deliver("bulk", data)
            case fr.BulkAck(seq):
                self._bulk.acknowledge(seq)
                self._credit.set()
            case fr.Live(data):
                self._deliver("live", data)
            case fr.Presence(data):
                self._bulk.presence(asyncio.get_running_loop().time())
                self._deliver("presence", data)
            case fr.Close(code, reason):
                self._session_failed(session, ConnectionClosed(f"peer closed ({code}): {reason}"))

    async def _answer(self, session: _Session, request_id: int, kind: str, body: bytes) -> None:
        try:
            reply = await self._reply(session, request_id, kind, body)
        finally:
            self._serving -= 1
        with contextlib.suppress(TransportError):
            self._require_trust(session)  # revoked while its request was being answered
            session.send("control", reply)

    async def _reply(self, session: _Session, request_id: int, kind: str, body: bytes) -> fr.Frame:
        handler = self._handlers.get(kind) or self.transport.handlers.get(kind)
        if handler is None:
            return fr.ErrorReply(request_id, "unknown-kind", f"no handler for {kind!r}")
        return await self._call(request_id, lambda: handler(self, body))

    async def _call(self, request_id: int, call: Callable[[], Awaitable[bytes]]) -> fr.Frame:
        try:
            return fr.Response(request_id, await call())
        except RequestRefused as exc:
            return fr.ErrorReply(request_id, exc.code, str(exc))
        except Exception:
            log.exception("request handler failed for peer %s", self.peer_id.short())
            return fr.ErrorReply(request_id, "internal", "the peer's handler failed")

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _attach(self, session: _Session) -> None:
        """A new link finished its handshake; make it current (ConnectionClosed if this
        connection was closed meanwhile: the caller closes the link)."""
        if self.closed:
            raise ConnectionClosed(f"connection is closed: {self.error or 'closed'}")
        reconnect = self._session is not None
        self._session = session
        self._bulk.new_link()
        self._credit.set()
        session.heartbeat = asyncio.ensure_future(session.run_heartbeat(self.transport.options))
        self._move(ConnEvent.ATTACH)
        self._emit(Reconnected(self.peer) if reconnect else Connected(self.peer))

    def _session_failed(self, session: _Session, error: BaseException) -> None:
        if not session.fail():
            return
        self.transport._close_soon(session)
        if session is not self._session or self.closed:
            return
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionLost(f"connection lost: {error}"))
        self._credit.set()
        liveness = type(error) is ConnectionLost
        if session.keys is not None and not liveness:
            # Tell the peer why (best effort), bypassing session.send: the session is down.
            with contextlib.suppress(TransportError, CryptoError):
                close = fr.Close(type(error).__name__, str(error)[:200]).to_wire()
                session.link.send("control", session.sealers["control"].seal(close))
        log.log(
            logging.INFO if isinstance(error, ConnectionClosed) else logging.WARNING,
            "connection to %s %s: %s (%s)",
            self.peer_id.short(),
            "lost" if liveness else "dropped",
            error,
            type(error).__name__,
        )
        options = self.transport.options
        if liveness and options.reconnect and not self.transport.closing:
            self._move(ConnEvent.LOST)
            self._emit(Disconnected(self.peer, str(error), will_retry=True))
            self._spawn(self._reconnect() if self.initiator else self._await_return())
        else:
            self._shut(str(error), error)
            self._spawn(self._release(str(error), notify=False))

    async def _reconnect(self) -> None:
        options = self.transport.options
        delay = options.backoff_initial
        for attempt in range(1, options.reconnect_attempts + 1):
            await asyncio.sleep(delay)
            if self.state is not ConnState.RECONNECTING:
                return  # closed, or the peer called back first
            try:
                await self.transport._establish(self)
                return
            except (TransportError, CryptoError) as exc:
                log.info("reconnect %d to %s failed: %s", attempt, self.peer_id.short(), exc)
                if isinstance(exc, PeerRejected):
                    break
            delay = min(delay * 2, options.backoff_max)
        if self.state is ConnState.RECONNECTING:
            await self._close("the peer did not come back", ConnectionLost("gave up reconnecting"))

    async def _await_return(self) -> None:
        options = self.transport.options
        if not await self._wait_settled(options.backoff_max * 2 + options.connect_timeout):
            await self._close("the peer did not come back", ConnectionLost("peer did not return"))

    async def _close(self, reason: str, error: BaseException | None, notify: bool = True) -> None:
        if self.closed:
            return
        self._shut(reason, error)
        await self._release(reason, notify)

    def _shut(self, reason: str, error: BaseException | None) -> None:
        """CLOSED now: no more sends, waiters wake, pending requests fail."""
        self._move(ConnEvent.CLOSE)
        self.error = error or self.error
        self._credit.set()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionClosed(reason))

    async def _release(self, reason: str, notify: bool) -> None:
        """After :meth:`_shut`: say goodbye on the link, close it, end the event stream."""
        session = self._session
        if session is not None and not session.down:
            if notify and session.is_open:
                with contextlib.suppress(TransportError, LocalProtocolError):
                    session.send("control", fr.Close("closed", reason[:200]))
                await asyncio.sleep(0.05)  # let the Close frame leave
            await session.close()
        self.transport._forget(self)
        self._emit_final(Closed(self.peer, reason))
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()

    def _emit_final(self, event: Closed) -> None:
        while True:
            try:
                self._events.put_nowait(event)
                return
            except asyncio.QueueFull:
                self._events.get_nowait()


class Transport:
    """This node's end of the peer transport: makes and accepts PeerConnections.

    ``is_trusted(public_key)`` decides who may get past the handshake (the trust
    store provides it); anyone else is refused before any WebRTC work. A first
    contact from an unknown node arrives as a sealed node message instead (the
    node's inbox, ``node.app.runtime``), never over a connection.
    """

    def __init__(
        self,
        identity: Identity,
        signaling: Signaling,
        *,
        is_trusted: Callable[[bytes], bool],
        options: TransportOptions | None = None,
        clock: Callable[[], float] = time.time,
        replay_guard: ReplayGuard | None = None,
    ) -> None:
        """``replay_guard``: a node passes its guard kept on disk, so a restart does not
        accept signals it already saw."""
        self.identity = identity
        self.signaling = signaling
        self.is_trusted = is_trusted
        self.options = options or TransportOptions()
        self.clock = clock
        # TURN servers with short-lived credentials (a registry mints them); each new
        # WebRTC session tries them first, then ``options.rtc.ice_servers``.
        self.turn_servers: tuple[IceServer, ...] = ()
        self.handlers: dict[str, RequestHandler] = {}
        # Called with a peer's key when a message shows it is no longer trusted, so the
        # application drops it everywhere else too (live sessions) at once.
        self.on_untrusted: Callable[[bytes], None] = lambda _peer: None
        self.closing = False
        self._guard = replay_guard if replay_guard is not None else ReplayGuard()
        self._handshake_replays = hs.ReplayCache()
        self._answers: dict[bytes, tuple[bytes, asyncio.Future[SignalMessage]]] = {}
        self._connections: dict[bytes, PeerConnection] = {}
        self._closers: set[asyncio.Task[None]] = set()
        self._accepted: asyncio.Queue[PeerConnection] = asyncio.Queue(64)
        self._pending_handshakes = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._reader: asyncio.Task[None] | None = None

    # -- public API ---------------------------------------------------------------
    def handle(self, kind: str, handler: RequestHandler) -> None:
        """Answer requests of ``kind`` on every connection."""
        self.handlers[kind] = handler

    async def start(self) -> None:
        self._reader = asyncio.ensure_future(supervise("signal reader", self._read_signals))

    async def __aenter__(self) -> Transport:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self, peer: bytes) -> PeerConnection:
        """Connect to the node with Ed25519 public key ``peer`` (reuses a live connection)."""
        existing = self._connections.get(peer)
        if not self.is_trusted(peer):
            if existing is not None:
                await existing.close("this node no longer trusts the peer")
            raise PeerRejected(
                f"node {NodeId.from_public_key(peer).short()} is not trusted: verify its "
                "safety number or its organisation certificate first"
            )
        if existing is not None and not existing.closed:
            return existing
        conn = PeerConnection(self, peer, initiator=True)
        self._connections[peer] = conn
        try:
            await self._establish(conn)
        except _Glare:
            # Both nodes called at once and the peer's call won: it arrives as an offer
            # that _respond attaches to this same PeerConnection.
            if await conn._wait_settled(self.options.connect_timeout):
                return conn
            error = ConnectTimeout("both nodes called each other and neither call completed")
            await conn._close(str(error), error, notify=False)
            raise error from None
        except BaseException as exc:
            if conn.is_connected:  # the peer's simultaneous call won meanwhile
                return conn
            conn.error = exc
            await conn._close(str(exc), exc, notify=False)
            raise
        return conn

    async def accept(self, within: float | None = None) -> PeerConnection:
        """The next trusted peer that connected to us."""
        async with asyncio.timeout(within):
            return await self._accepted.get()

    def connection(self, peer: bytes) -> PeerConnection | None:
        return self._connections.get(peer)

    def peers(self) -> list[bytes]:
        """The trusted peers this node has a connection to (or is calling, or awaits)."""
        return [peer for peer, conn in self._connections.items() if not conn.closed]

    async def drop_peer(self, peer: bytes, reason: str) -> None:
        """Close every connection to ``peer`` now (its trust was revoked)."""
        conn = self._connections.get(peer)
        if conn is not None:
            await conn.close(reason)

    async def close(self) -> None:
        self.closing = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        for conn in list(self._connections.values()):
            await conn.close("this node is shutting down")
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*self._closers, return_exceptions=True)

    # -- seams a test may override to play a misbehaving node -------------------------
    def _handshake_identity(self) -> Identity:
        return self.identity

    def _fingerprints(self, link: Link) -> tuple[str, str]:
        """(local, remote) DTLS fingerprints as this node read them from the SDPs."""
        return link.local_fingerprint, link.remote_fingerprint

    # -- initiator ------------------------------------------------------------------
    def _new_session(self, conn: PeerConnection) -> _Session:
        rtc = self.options.rtc
        if self.turn_servers:  # aiortc uses only the first TURN server it is given
            rtc = replace(rtc, ice_servers=self.turn_servers + rtc.ice_servers)
        make = self.options.link
        return conn.new_session(lambda s: make(rtc, s.on_message, s.on_down))

    async def _establish(self, conn: PeerConnection) -> None:
        if not self.is_trusted(conn.peer):  # a reconnect re-checks: revoked meanwhile?
            raise PeerRejected(f"node {conn.peer_id.short()} is no longer trusted by this node")
        session = self._new_session(conn)
        try:
            async with asyncio.timeout(self.options.connect_timeout):
                await self._initiate(conn, session)
        except TimeoutError as exc:
            await session.close()
            raise ConnectTimeout(
                f"could not connect to {conn.peer_id.short()} within "
                f"{self.options.connect_timeout:.0f} s: it may be offline"
            ) from exc
        except BaseException:
            await session.close()
            raise
        try:
            conn._attach(session)
        except ConnectionClosed:
            await session.close()
            raise

    async def _initiate(self, conn: PeerConnection, session: _Session) -> None:
        sid = os.urandom(16)
        offer = await session.link.create_offer()
        future: asyncio.Future[SignalMessage] = asyncio.get_running_loop().create_future()
        self._answers[sid] = (conn.peer, future)
        try:
            message = SignalMessage("offer", sid, offer)
            await self.signaling.send(
                conn.peer, message.seal(self.identity, conn.peer, self._now())
            )
            answer = await future
        finally:
            self._answers.pop(sid, None)
        if answer.kind == "reject":
            if answer.reason == GLARE:
                raise _Glare(GLARE)
            raise PeerRejected(f"the peer refused the connection: {answer.reason}")
        await session.link.accept_answer(answer.sdp)
        await session.open_link(self.options.connect_timeout)
        local, remote = self._fingerprints(session.link)
        initiator = hs.Initiator(self._handshake_identity(), conn.peer, local, remote)
        try:
            session.send("control", fr.Handshake(1, initiator.start()))
            resp = await self._handshake_frame(session, 2)
            fin, keys = initiator.receive_resp(resp)
        except CryptoError as exc:
            raise HandshakeFailed(f"handshake with {conn.peer_id.short()} failed: {exc}") from exc
        session.send("control", fr.Handshake(3, fin))
        session.start_crypto(keys)
        await self._wait_ready(session)

    async def _wait_ready(self, session: _Session) -> None:
        """The responder's Ready, or an early failure if it dropped us (e.g. refused our key)."""
        deadline = asyncio.get_running_loop().time() + self.options.handshake_timeout
        while not session.ready.is_set():
            if session.down or session.link.is_down:
                raise HandshakeFailed("the peer dropped the connection during the handshake")
            if asyncio.get_running_loop().time() > deadline:
                raise HandshakeFailed("the peer did not confirm the session in time")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    await session.ready.wait()

    async def _handshake_frame(self, session: _Session, step: int) -> bytes:
        try:
            async with asyncio.timeout(self.options.handshake_timeout):
                frame = await session.handshake_frames.get()
        except TimeoutError as exc:
            raise HandshakeFailed("the peer did not continue the handshake") from exc
        if frame.step != step:
            raise HandshakeFailed(f"expected handshake step {step}, got {frame.step}")
        return frame.data

    # -- responder ------------------------------------------------------------------
    def _now(self) -> int:
        return int(self.clock())

    async def _read_signals(self) -> None:
        while True:
            data = await self.signaling.receive()
            try:
                sender, message = SignalMessage.open(self.identity, data, self._now(), self._guard)
            except SignalingError as exc:
                log.warning("signal refused: %s", exc)
                continue
            except Exception:  # e.g. the replay guard's disk: one signal never ends the reader
                log.exception("a signal could not be opened; dropped it")
                continue
            if message.kind == "offer":
                self._spawn(self._respond(sender, message))
                continue
            pending = self._answers.get(message.session)
            if pending is None or pending[0] != sender:
                log.warning(
                    "signal answer from %s matches no call we made; ignored",
                    NodeId.from_public_key(sender).short(),
                )
                continue
            if not pending[1].done():
                pending[1].set_result(message)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _close_soon(self, session: _Session) -> None:
        """Close a dead session's WebRTC link in the background; close() waits for these."""
        task = asyncio.ensure_future(session.close())
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)

    async def _reject(self, sender: bytes, sid: bytes, reason: str) -> None:
        with contextlib.suppress(TransportError):
            reject = SignalMessage("reject", sid, "", reason)
            await self.signaling.send(sender, reject.seal(self.identity, sender, self._now()))

    async def _respond(self, sender: bytes, offer: SignalMessage) -> None:
        short = NodeId.from_public_key(sender).short()
        if not self.is_trusted(sender):
            log.warning("connection from untrusted node %s refused", short)
            await self._reject(sender, offer.session, "this node does not know you")
            return
        if self._pending_handshakes >= self.options.max_pending_handshakes:
            await self._reject(sender, offer.session, "busy, try again later")
            return
        self._pending_handshakes += 1
        conn = self._connections.get(sender)
        if conn is not None and not conn.closed:
            if conn.initiator and not conn.is_connected and self.identity.public_key > sender:
                # Glare: we are calling them too. The larger key's call wins.
                self._pending_handshakes -= 1
                await self._reject(sender, offer.session, GLARE)
                return
            # Their call replaces ours (glare we lost, a restart, or a reconnect).
            conn.initiator = False
            fresh = False
        else:
            conn = PeerConnection(self, sender, initiator=False)
            fresh = True
        session = self._new_session(conn)
        try:
            async with asyncio.timeout(self.options.connect_timeout):
                await self._respond_handshake(sender, offer, session)
        except (TransportError, CryptoError, TimeoutError) as exc:
            log.warning(
                "incoming connection from %s dropped: %s (%s)", short, exc, type(exc).__name__
            )
            await session.close()
            return
        finally:
            self._pending_handshakes -= 1
        if fresh:
            self._connections[sender] = conn
            conn._attach(session)
            self._offer_accepted(conn)
        else:
            old = conn._session
            if old is not None:
                await old.close()
            try:
                conn._attach(session)
            except ConnectionClosed:  # closed while the handshake ran
                await session.close()

    def _offer_accepted(self, conn: PeerConnection) -> None:
        """Queue ``conn`` for :meth:`accept`. A node that never calls accept() (its
        handlers serve every connection) must still take trusted peers: when the queue
        is full the oldest entry leaves it (that connection stays up), never the new one."""
        while True:
            try:
                self._accepted.put_nowait(conn)
                return
            except asyncio.QueueFull:
                self._accepted.get_nowait()

    async def _respond_handshake(
        self, sender: bytes, offer: SignalMessage, session: _Session
    ) -> None:
        answer = await session.link.accept_offer(offer.sdp)
        reply = SignalMessage("answer", offer.session, answer)
        await self.signaling.send(sender, reply.seal(self.identity, sender, self._now()))
        await session.open_link(self.options.connect_timeout)
        local, remote = self._fingerprints(session.link)
        responder = hs.Responder(
            self._handshake_identity(), sender, local, remote, self._handshake_replays
        )
        try:
            session.send(
                "control",
                fr.Handshake(2, responder.receive_init(await self._handshake_frame(session, 1))),
            )
            keys = responder.receive_fin(await self._handshake_frame(session, 3))
        except CryptoError as exc:
            raise HandshakeFailed(f"handshake failed: {exc}") from exc
        session.start_crypto(keys)
        session.send("control", fr.Ready())

    def _forget(self, conn: PeerConnection) -> None:
        if self._connections.get(conn.peer) is conn:
            del self._connections[conn.peer]


def install_event_loop_policy() -> bool:
    """Use uvloop when it is installed (about 1.6x faster data channels). True if it is."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


__all__ = [
    "Closed",
    "Connected",
    "Disconnected",
    "Event",
    "PeerConnection",
    "Received",
    "Reconnected",
    "RequestRefused",
    "Transport",
    "TransportOptions",
    "install_event_loop_policy",
]
