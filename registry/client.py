"""Talking to registries: publish, look up, search, the signaling socket, federation.

The client trusts no registry: every record is verified against its own
signature and the node id asked for, and relayed messages are opaque sealed
envelopes whose sender is proven only by :func:`crypto.envelope.open_sealed`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import aiohttp

from crypto.identity import Identity, NodeId
from registry import wsproto
from registry.errors import (
    KeyInUse,
    RecordError,
    RegistryError,
    RegistryUnavailable,
    RemoteRecordError,
    RemoteRegistryError,
    StaleRecord,
)
from registry.httpclient import client_session, untrusted_certificate
from registry.records import MAX_RECORD_SIZE, NodeRecord, parse_verified

log = logging.getLogger(__name__)

MAX_SEARCH_RESPONSE = 4 * 1024 * 1024
MAX_ERROR_RESPONSE = 8 * 1024
REQUEST_TIMEOUT = 10.0
INBOX_SIZE = 1024


def _now() -> int:
    return int(time.time())


@dataclass(frozen=True)
class SearchQuery:
    """``online`` asks for nodes online now, ``on_call`` for those on call; both for
    either; neither for any availability."""

    subspecialty: str = ""
    jurisdiction: str = ""
    language: str = ""
    online: bool = False
    on_call: bool = False

    def availability(self) -> tuple[str, ...]:
        """The availability values this query accepts; () for any."""
        return tuple(
            value
            for value, wanted in (("online", self.online), ("on_call", self.on_call))
            if wanted
        )

    def params(self) -> dict[str, str]:
        params = {
            "subspecialty": self.subspecialty,
            "jurisdiction": self.jurisdiction,
            "language": self.language,
        }
        result = {k: v for k, v in params.items() if v}
        if self.online:
            result["online"] = "1"
        if self.on_call:
            result["on_call"] = "1"
        return result


class RegistryClient:
    """One registry. Use as ``async with RegistryClient(url, identity) as client``."""

    def __init__(self, url: str, identity: Identity | None = None, *, ca_file: str = "") -> None:
        """``ca_file``: a CA (PEM) to trust for this registry's TLS besides the system's."""
        self.url = url.rstrip("/")
        self.identity = identity
        self.ca_file = ca_file
        self._session: aiohttp.ClientSession | None = None
        self.rejected = 0  # records from this registry that failed verification

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = client_session(
                REQUEST_TIMEOUT, ca_files=(self.ca_file,) if self.ca_file else ()
            )
        return self._session

    async def _request(
        self, method: str, path: str, *, limit: int, **kwargs: Any
    ) -> tuple[int, bytes]:
        try:
            async with self.session().request(
                method, self.url + path, allow_redirects=False, **kwargs
            ) as response:
                body = await response.content.read(limit + 1)
                if len(body) > limit:
                    raise RemoteRegistryError(self.url, response.status, "response too large")
                return response.status, body
        except aiohttp.ClientConnectorCertificateError as exc:
            raise RegistryUnavailable(self.url, untrusted_certificate(exc)) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RegistryUnavailable(self.url, type(exc).__name__) from exc

    def _raise_for(self, status: int, body: bytes) -> None:
        payload: Any = None
        try:
            payload = json.loads(body)  # bounded by the read limit
            error, hint = str(payload.get("error", ""))[:300], str(payload.get("hint", ""))[:300]
        except (ValueError, AttributeError):
            error, hint = "unreadable error response", ""
        if status == 409:
            exc = StaleRecord(f"registry {self.url}: {error}")
            held = payload.get("held_record") if isinstance(payload, dict) else None
            exc.held_wire = _b64(held) if isinstance(held, str) else b""
            raise exc
        raise RemoteRegistryError(self.url, status, error, hint)

    async def health(self) -> dict[str, Any]:
        status, body = await self._request("GET", "/v1/health", limit=MAX_ERROR_RESPONSE)
        if status != 200:
            self._raise_for(status, body)
        result: dict[str, Any] = json.loads(body)
        return result

    async def publish(self, record: NodeRecord) -> None:
        """Publish; a :class:`StaleRecord` refusal carries in ``held`` the sequence the
        registry holds, when it proved it with a record signed by the same key."""
        status, body = await self._request(
            "POST",
            "/v1/records",
            limit=MAX_ERROR_RESPONSE + MAX_RECORD_SIZE * 2,
            data=record.to_wire(),
            headers={"Content-Type": "application/octet-stream"},
        )
        if status != 200:
            try:
                self._raise_for(status, body)
            except StaleRecord as exc:
                exc.held = _held_sequence(exc.held_wire, record)
                raise

    async def lookup(self, node_id: NodeId, now: int | None = None) -> NodeRecord | None:
        """The node's current record, verified; None if the registry has none."""
        status, body = await self._request("GET", f"/v1/records/{node_id}", limit=MAX_RECORD_SIZE)
        if status == 404:
            return None
        if status != 200:
            self._raise_for(status, body)
        try:
            return parse_verified(body, _now() if now is None else now, node_id)
        except RecordError as exc:
            self.rejected += 1
            raise RemoteRecordError(
                f"registry {self.url} returned a bad record for {node_id.short()}: {exc}"
            ) from exc

    async def search_page(
        self, query: SearchQuery, *, after: str = "", limit: int = 50, now: int | None = None
    ) -> tuple[list[NodeRecord], str]:
        """One page of verified results and the cursor for the next ("" at the end)."""
        params = query.params() | {"limit": str(limit)}
        if after:
            params["after"] = after
        status, body = await self._request(
            "GET", "/v1/search", limit=MAX_SEARCH_RESPONSE, params=params
        )
        if status != 200:
            self._raise_for(status, body)
        try:
            items = json.loads(body)["records"]
        except (ValueError, KeyError, TypeError) as exc:
            raise RemoteRegistryError(self.url, status, "malformed search response") from exc
        if not isinstance(items, list):
            raise RemoteRegistryError(self.url, status, "malformed search response")
        when = _now() if now is None else now
        records: list[NodeRecord] = []
        last = ""
        for item in items[:limit]:
            try:
                record = parse_verified(base64.b64decode(item, validate=True), when)
            except (RecordError, ValueError, TypeError):
                self.rejected += 1
                continue
            records.append(record)
            last = max(last, str(record.node_id))
        cursor = last if len(items) >= limit else ""
        return records, cursor

    async def search(
        self, query: SearchQuery = SearchQuery(), *, max_results: int = 200, now: int | None = None
    ) -> list[NodeRecord]:
        results: list[NodeRecord] = []
        after = ""
        for _ in range(max(1, max_results // 50 + 1)):
            page, after = await self.search_page(query, after=after, now=now)
            results.extend(page)
            if not after or len(results) >= max_results:
                break
        return results[:max_results]

    def connect(
        self, *, max_backoff: float = 10.0, connect_timeout: float = 10.0
    ) -> RegistryConnection:
        """The signaling socket; ``connect_timeout`` also bounds waits in ``send``."""
        if self.identity is None:
            raise RegistryError("connecting to a registry needs the node identity")
        return RegistryConnection(
            self, self.identity, max_backoff=max_backoff, connect_timeout=connect_timeout
        )

    async def turn_credentials(self) -> wsproto.TurnCredentials:
        async with self.connect() as conn:
            return await conn.turn_credentials()


@dataclass
class RegistryConnection:
    """The authenticated signaling socket, reconnecting with backoff until closed.

    ``async for msg in conn`` yields :class:`wsproto.Deliver` frames; ``msg.sender``
    is only the registry's claim. Open ``msg.data`` with ``open_sealed``.

    It stops for good (``stopped``: why; iteration ends; calls raise :class:`KeyInUse`)
    when its registry, after this node's ``Auth``, says another socket with this key took
    its place (:class:`wsproto.Replaced`): reconnecting would take it back, forever.
    """

    client: RegistryClient
    identity: Identity
    max_backoff: float = 10.0
    connect_timeout: float = 10.0
    _inbox: asyncio.Queue[wsproto.Deliver | None] = field(
        default_factory=lambda: asyncio.Queue(INBOX_SIZE)
    )
    _ws: aiohttp.ClientWebSocketResponse | None = None
    _ready: asyncio.Event = field(default_factory=asyncio.Event)
    _closed: bool = False
    _task: asyncio.Task[None] | None = None
    _refs: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _pending: dict[int, asyncio.Future[str]] = field(default_factory=dict)
    _turn: asyncio.Future[wsproto.TurnCredentials] | None = None
    last_error: str = ""
    connects: int = 0
    stopped: str = ""  # why it stopped reconnecting for good ("" while it keeps trying)

    async def __aenter__(self) -> RegistryConnection:
        self.start()
        await self.wait_ready()
        return self

    def start(self) -> None:
        """Start connecting (and reconnecting) in the background; once only."""
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        if self._ws is not None:
            await self._ws.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._fail_pending("connection closed")

    @property
    def ready(self) -> bool:
        """True while the socket is open and authenticated."""
        return self._ready.is_set() and not self.stopped

    async def wait_ready(self) -> None:
        try:  # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel
            async with asyncio.timeout(self.connect_timeout):
                await self._ready.wait()  # set on stopping too, to wake the waiters
        except TimeoutError as exc:
            raise RegistryUnavailable(self.client.url, self.last_error or "timeout") from exc
        if self.stopped:
            raise KeyInUse(self.client.url)

    def _fail_pending(self, reason: str) -> None:
        url = self.client.url
        for future in [*self._pending.values(), self._turn]:
            if future is not None and not future.done():
                future.set_exception(
                    KeyInUse(url) if self.stopped else RegistryUnavailable(url, reason)
                )
        self._pending.clear()

    def _stop(self, exc: KeyInUse) -> None:
        """Give up for good: wake every waiter with ``exc`` and end the iteration."""
        self.stopped = self.last_error = str(exc)
        log.warning("%s", exc)
        self._fail_pending(self.stopped)
        self._ready.set()  # wait_ready sees ``stopped``
        with contextlib.suppress(asyncio.QueueFull):  # full: receive sees it once empty
            self._inbox.put_nowait(None)

    async def _run(self) -> None:
        backoff = 0.1
        while not self._closed:
            try:
                await self._session_once()
                backoff = 0.1
            except KeyInUse as exc:
                self._stop(exc)
                return
            except (aiohttp.ClientError, TimeoutError, RegistryError, ConnectionError) as exc:
                self.last_error = str(exc) or type(exc).__name__
                log.debug("registry %s connection failed: %s", self.client.url, self.last_error)
            except Exception as exc:  # one bad frame must not end the socket for good
                self.last_error = str(exc) or type(exc).__name__
                log.exception("registry %s connection broke; reconnecting", self.client.url)
            self._ready.clear()
            self._ws = None
            self._fail_pending("disconnected")
            if self._closed:
                return
            await asyncio.sleep(backoff * (0.5 + random.random()))  # noqa: S311 - jitter
            backoff = min(self.max_backoff, backoff * 2)

    async def _session_once(self) -> None:
        ws_url = self.client.url.replace("http", "ws", 1) + "/v1/ws"
        async with self.client.session().ws_connect(
            ws_url, max_msg_size=wsproto.MAX_FRAME, heartbeat=30.0
        ) as ws:
            first = await ws.receive(timeout=self.connect_timeout)
            challenge = _frame(first)
            if not isinstance(challenge, wsproto.Challenge):
                raise RegistryError("registry did not send a challenge")
            # Sign for the URL we dialled, never the one the registry claims.
            auth = wsproto.sign_challenge(self.identity, challenge.challenge, self.client.url)
            await ws.send_bytes(wsproto.to_wire(auth))
            ready = _frame(await ws.receive(timeout=self.connect_timeout))
            if isinstance(ready, wsproto.Replaced):  # another socket came in while we signed
                raise KeyInUse(self.client.url)
            if isinstance(ready, wsproto.Error):
                raise RegistryError(f"registry refused authentication: {ready.error}")
            if not isinstance(ready, wsproto.Ready) or ready.node_id != self.identity.node_id:
                raise RegistryError("registry answered authentication wrongly")
            self._ws = ws
            self.connects += 1
            self._ready.set()
            async for message in ws:
                self._dispatch(_frame(message))

    def _dispatch(self, frame: wsproto.Frame) -> None:
        if isinstance(frame, wsproto.Deliver):
            if frame.to != self.identity.node_id:
                return  # misrouted: harmless, but not ours
            try:
                self._inbox.put_nowait(frame)
            except asyncio.QueueFull:
                log.warning("signaling inbox full; dropping a relayed message")
        elif isinstance(frame, wsproto.Ack | wsproto.Error):
            future = self._pending.pop(frame.ref, None)
            if future is not None and not future.done():
                if isinstance(frame, wsproto.Ack):
                    future.set_result(frame.status)
                else:
                    future.set_exception(
                        RemoteRegistryError(self.client.url, 0, frame.error, frame.hint)
                    )
            elif isinstance(frame, wsproto.Error) and self._turn and not self._turn.done():
                self._turn.set_exception(RemoteRegistryError(self.client.url, 0, frame.error))
        elif isinstance(frame, wsproto.TurnCredentials) and self._turn and not self._turn.done():
            self._turn.set_result(frame)
        elif isinstance(frame, wsproto.Replaced):
            raise KeyInUse(self.client.url)

    async def send(self, to: NodeId, sealed: bytes) -> str:
        """Relay a sealed envelope; returns "delivered" or "stored" (in the mailbox)."""
        if len(sealed) > wsproto.MAX_SEALED:
            raise RegistryError(f"sealed message over {wsproto.MAX_SEALED} bytes")
        await self.wait_ready()
        assert self._ws is not None  # noqa: S101 - ready implies a socket
        ref = next(self._refs)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending[ref] = future
        await self._ws.send_bytes(wsproto.to_wire(wsproto.Send(to, sealed, ref)))
        async with asyncio.timeout(self.connect_timeout):  # not wait_for: see wait_ready
            return await future

    async def turn_credentials(self) -> wsproto.TurnCredentials:
        await self.wait_ready()
        assert self._ws is not None  # noqa: S101 - ready implies a socket
        self._turn = asyncio.get_running_loop().create_future()
        await self._ws.send_bytes(wsproto.to_wire(wsproto.TurnRequest()))
        async with asyncio.timeout(self.connect_timeout):  # not wait_for: see wait_ready
            return await self._turn

    async def receive(self) -> wsproto.Deliver:
        """The next relayed message; wrap in ``asyncio.timeout`` to bound the wait."""
        if not (self.stopped and self._inbox.empty()):
            message = await self._inbox.get()
            if message is not None:
                return message
            self._inbox.put_nowait(None)  # for any other reader (there is room: just taken)
        raise KeyInUse(self.client.url)

    def __aiter__(self) -> AsyncIterator[wsproto.Deliver]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[wsproto.Deliver]:
        while not self._closed:  # or stopped for good
            try:
                yield await self.receive()
            except KeyInUse:
                return


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text[: MAX_RECORD_SIZE * 2], validate=True)
    except ValueError:
        return b""


def _held_sequence(wire: bytes, ours: NodeRecord) -> int | None:
    """The sequence of ``wire`` if it is a record signed by the key of ``ours`` (expired or
    not: it only proves which sequence we signed before), else None."""
    if not wire:
        return None
    try:
        return NodeRecord.from_wire(wire).expected_id(ours.node_id).sequence
    except RecordError:
        return None


def _frame(message: aiohttp.WSMessage) -> wsproto.Frame:
    if message.type != aiohttp.WSMsgType.BINARY:
        raise RegistryError(f"registry socket closed or sent {message.type.name}")
    return wsproto.from_wire(message.data)


class MultiRegistry:
    """Several registries at once, so no single one is a point of failure."""

    def __init__(self, clients: Sequence[RegistryClient]) -> None:
        self.clients = list(clients)

    async def close(self) -> None:
        for client in self.clients:
            await client.close()

    async def publish(self, record: NodeRecord) -> dict[str, RegistryError | None]:
        """Publish everywhere; returns each registry's error (None = accepted)."""

        async def one(client: RegistryClient) -> RegistryError | None:
            try:
                await client.publish(record)
            except RegistryError as exc:
                return exc
            return None

        results = await asyncio.gather(*(one(c) for c in self.clients))
        return {c.url: r for c, r in zip(self.clients, results, strict=True)}

    async def lookup(self, node_id: NodeId, now: int | None = None) -> NodeRecord | None:
        """The highest-sequence verified record any registry holds."""

        async def one(client: RegistryClient) -> NodeRecord | None:
            try:
                return await client.lookup(node_id, now)
            except RegistryError as exc:
                log.debug("lookup at %s failed: %s", client.url, exc)
                return None

        found = [r for r in await asyncio.gather(*(one(c) for c in self.clients)) if r]
        return max(found, key=lambda r: r.sequence, default=None)

    async def search(
        self, query: SearchQuery = SearchQuery(), *, now: int | None = None
    ) -> list[NodeRecord]:
        async def one(client: RegistryClient) -> list[NodeRecord]:
            try:
                return await client.search(query, now=now)
            except RegistryError as exc:
                log.debug("search at %s failed: %s", client.url, exc)
                return []

        best: dict[NodeId, NodeRecord] = {}
        for page in await asyncio.gather(*(one(c) for c in self.clients)):
            for record in page:
                held = best.get(record.node_id)
                if held is None or record.sequence > held.sequence:
                    best[record.node_id] = record
        return sorted(best.values(), key=lambda r: str(r.node_id))


async def publish_catching_up(
    client: RegistryClient, record: NodeRecord, after: Callable[[int], NodeRecord]
) -> NodeRecord:
    """Publish ``record``; if the registry holds a newer one of this node (signed by
    another program on the same home, or before the clock went back), sign again with
    ``after(held sequence)`` and publish that. Returns the record the registry took.

    The held sequence is believed only when proved by a record signed with the node's
    own key, so a registry cannot push the node's sequence anywhere it likes.
    """
    try:
        await client.publish(record)
        return record
    except StaleRecord as exc:
        if exc.held_wire == record.to_wire():
            return record  # it holds this very record already (a republish, a retry)
        held = exc.held
        if held is None:
            found = await client.lookup(record.node_id)
            held = found.sequence if found is not None else None
        if held is None:
            log.warning(
                "registry %s refused this node's record as stale (sequence %d) and shows no "
                "newer one: check that no other node runs with this identity, then restart",
                client.url,
                record.sequence,
            )
            raise
        newer = after(held)
        log.warning(
            "registry %s holds a record of this node with sequence %d, newer than ours (%d): "
            "another program published for this home, or the clock went back. Republishing "
            "with sequence %d",
            client.url,
            held,
            record.sequence,
            newer.sequence,
        )
        try:
            await client.publish(newer)
        except StaleRecord:
            log.warning(
                "registry %s refused this node's record again as stale (sequence %d): check "
                "that no other node runs with this identity, then restart this one",
                client.url,
                newer.sequence,
            )
            raise
        return newer


@dataclass
class MirrorResult:
    copied: int = 0
    already_current: int = 0
    refused: int = 0


async def mirror(
    source: RegistryClient,
    target: RegistryClient,
    *,
    max_records: int = 100_000,
    now: int | None = None,
) -> MirrorResult:
    """Copy every current record from ``source`` to ``target``; the target re-verifies each."""
    result = MirrorResult()
    after = ""
    for _ in range(max_records // 100 + 1):
        page, after = await source.search_page(SearchQuery(), after=after, limit=100, now=now)
        for record in page:
            try:
                await target.publish(record)
                result.copied += 1
            except StaleRecord:
                result.already_current += 1
            except RemoteRegistryError:
                result.refused += 1
        if not after:
            break
    return result
