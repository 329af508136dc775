"""What the registry server keeps, behind one interface with two implementations.

:class:`SqliteStore` (the default: one process, one file, a single-site or demo
setup) runs :class:`registry.store.RegistryDB` on one worker thread, so the event
loop never waits on the disk. ``registry.pgstore.PostgresStore`` (chosen by
``registry.server.open_store``) lets several registry instances behind one URL share
records, mailbox, rate-limit counters and TURN accounting, and carries relayed messages
between them (:attr:`shared`).

Each mailbox write checks the quotas and inserts in one step (one thread call, or
one transaction), so two concurrent writers cannot both pass a nearly full quota.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar, Unpack

from crypto.identity import NodeId
from registry.limits import MailboxQuota, RateLimiter
from registry.records import NodeRecord
from registry.store import RegistryDB, SearchFilters, Stored

T = TypeVar("T")

# A message stored for a node: (recipient, mailbox id, the message when it was small
# enough to come with the notification, else None: read it from the mailbox).
MailListener = Callable[[NodeId, int, Stored | None], None]
# Another instance took this node's socket: (node, instance id).
KickListener = Callable[[NodeId, str], None]


@functools.lru_cache(maxsize=65_536)
def node_key(node_id: NodeId) -> str:
    """``str(node_id)`` for the hot paths (its check characters cost a few µs each)."""
    return str(node_id)


@functools.lru_cache(maxsize=65_536)
def parse_node(text: str) -> NodeId:
    """:meth:`NodeId.parse` of text this registry wrote itself (cached)."""
    return NodeId.parse(text)


@dataclass(frozen=True)
class MailOffer:
    """One message for the mailbox and the rules it must pass."""

    recipient: NodeId
    sender: NodeId
    data: bytes
    now: int
    ttl: int
    origin: str
    quota: MailboxQuota
    known_since: int | None  # the recipient needs a record valid after this; None: no check


class RegistryStore(Protocol):
    """Records, search, mailbox, rate-limit counters and TURN accounting."""

    @property
    def shared(self) -> bool:
        """True when other registry instances use the same storage."""
        ...

    async def open(self) -> None: ...
    async def close(self) -> None: ...

    # records
    async def get_wire(self, node_id: NodeId, now: int) -> bytes | None: ...
    async def known_since(self, node_id: NodeId, since: int) -> bool: ...
    async def record_count(self) -> int: ...
    async def put(self, record: NodeRecord, now: int) -> None: ...
    async def search(self, now: int, **filters: Unpack[SearchFilters]) -> list[bytes]: ...
    async def count(self, now: int) -> int: ...

    # mailbox
    async def mailbox_offer(self, offer: MailOffer) -> tuple[int, str | None]:
        """Store the message: (its id, None), or (0, why a rule refuses it)."""
        ...

    async def mailbox_peek(
        self, recipient: NodeId, now: int, limit: int = 1000, after: int = 0
    ) -> list[Stored]: ...
    async def mailbox_waiting(self, recipients: list[str], now: int) -> list[tuple[str, int]]:
        """(recipient, id) of messages waiting for any of ``recipients``."""
        ...

    async def mailbox_delete(self, ids: list[int]) -> None: ...
    async def purge(self, now: int, record_grace: int = 0) -> int: ...

    # counters
    async def rate_allow(
        self, kind: str, key: str, rate: float, burst: float, now: float, cost: float = 1.0
    ) -> bool:
        """One token from ``kind``/``key``'s bucket (``rate`` per second up to ``burst``)."""
        ...

    async def turn_issued(self, node_id: NodeId, now: int) -> int:
        """Count one TURN credential issued to ``node_id``; the total so far."""
        ...

    # instances (meaningful when shared)
    async def socket_open(self, address: str, cap: int) -> bool:
        """Count an open socket from ``address`` unless all instances hold ``cap``."""
        ...

    async def socket_closed(self, address: str) -> None: ...
    async def connected(self, node_id: NodeId) -> None: ...
    async def disconnected(self, node_id: NodeId) -> None: ...
    async def online_elsewhere(self, node_id: NodeId) -> bool: ...
    def on_mail(self, listener: MailListener) -> None: ...
    def on_kick(self, listener: KickListener) -> None: ...


class SqliteStore:
    """The embedded default: :class:`RegistryDB` on one worker thread (calls in order)."""

    shared = False

    def __init__(self, path: str | Path) -> None:
        self.db = RegistryDB(path)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="registry-sqlite")
        self._buckets: dict[str, RateLimiter] = {}
        self._turn: dict[str, int] = {}

    async def _run(self, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, call)

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        await self._run(self.db.close)
        self._thread.shutdown(wait=True)

    async def get_wire(self, node_id: NodeId, now: int) -> bytes | None:
        return await self._run(lambda: self.db.get_wire(node_id, now))

    async def known_since(self, node_id: NodeId, since: int) -> bool:
        return await self._run(lambda: self.db.known_since(node_id, since))

    async def record_count(self) -> int:
        return await self._run(self.db.record_count)

    async def put(self, record: NodeRecord, now: int) -> None:
        await self._run(lambda: self.db.put(record, now))

    async def search(self, now: int, **filters: Unpack[SearchFilters]) -> list[bytes]:
        return await self._run(lambda: self.db.search(now, **filters))

    async def count(self, now: int) -> int:
        return await self._run(lambda: self.db.count(now))

    def _offer(self, offer: MailOffer) -> tuple[int, str | None]:
        if offer.known_since is not None and not self.db.known_since(
            offer.recipient, offer.known_since
        ):
            return 0, (
                "this registry keeps mail only for nodes with a current record here, "
                "and the recipient has none"
            )
        usage = self.db.mailbox_usage(offer.recipient, offer.sender, offer.now, offer.origin)
        refused = offer.quota.refusal(usage, len(offer.data))
        if refused is not None:
            return 0, refused
        self.db.mailbox_put(
            offer.recipient,
            offer.sender,
            offer.data,
            now=offer.now,
            ttl=offer.ttl,
            origin=offer.origin,
        )
        return self.db.last_id, None

    async def mailbox_offer(self, offer: MailOffer) -> tuple[int, str | None]:
        return await self._run(lambda: self._offer(offer))

    async def mailbox_peek(
        self, recipient: NodeId, now: int, limit: int = 1000, after: int = 0
    ) -> list[Stored]:
        return await self._run(lambda: self.db.mailbox_peek(recipient, now, limit, after))

    async def mailbox_waiting(self, recipients: list[str], now: int) -> list[tuple[str, int]]:
        return []  # one instance: mail for its connected nodes never arrives elsewhere

    async def mailbox_delete(self, ids: list[int]) -> None:
        await self._run(lambda: self.db.mailbox_delete(ids))

    async def purge(self, now: int, record_grace: int = 0) -> int:
        return await self._run(lambda: self.db.purge(now, record_grace))

    async def rate_allow(
        self, kind: str, key: str, rate: float, burst: float, now: float, cost: float = 1.0
    ) -> bool:
        bucket = self._buckets.get(kind)
        if bucket is None:
            bucket = self._buckets[kind] = RateLimiter(rate, burst)
        return bucket.allow(key, now, cost)

    async def turn_issued(self, node_id: NodeId, now: int) -> int:
        key = str(node_id)
        self._turn[key] = self._turn.pop(key, 0) + 1
        while len(self._turn) > 100_000:  # bounded, oldest first
            del self._turn[next(iter(self._turn))]
        return self._turn[key]

    async def socket_open(self, address: str, cap: int) -> bool:
        return True  # one instance: its AddressGuard counts them in memory

    async def socket_closed(self, address: str) -> None:
        return None

    async def connected(self, node_id: NodeId) -> None:
        return None

    async def disconnected(self, node_id: NodeId) -> None:
        return None

    async def online_elsewhere(self, node_id: NodeId) -> bool:
        return False

    def on_mail(self, listener: MailListener) -> None:
        return None

    def on_kick(self, listener: KickListener) -> None:
        return None
