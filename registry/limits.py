"""Rate limiting with injected time (sans-IO): token buckets keyed by node or address."""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass


def address_key(address: str | None) -> str:
    """Whom a per-address limit counts: the IPv4 address, or the IPv6 /64 (one host
    usually holds a whole /64, so single IPv6 addresses would be free to vary)."""
    if not address:
        return "?"
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """One token bucket per key; ``rate`` tokens per second up to ``burst``.

    Bounded: at most ``max_keys`` buckets are kept, least recently used dropped
    first (a dropped key starts again with a full bucket, which only ever errs
    towards letting a request through).
    """

    def __init__(self, rate: float, burst: float, max_keys: int = 100_000) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def allow(self, key: str, now: float, cost: float = 1.0) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(self.burst, now)
            self._buckets[key] = bucket
            if len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(self.burst, bucket.tokens + elapsed * self.rate)
            bucket.updated = now
        if bucket.tokens >= cost:
            bucket.tokens -= cost
            return True
        return False

    def retry_after(self, key: str) -> float:
        bucket = self._buckets.get(key)
        if bucket is None or bucket.tokens >= 1:
            return 0.0
        return (1 - bucket.tokens) / self.rate

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass(frozen=True)
class MailboxUsage:
    """What one more message would add to: unexpired counts and bytes."""

    recipient_messages: int
    recipient_bytes: int
    pair_messages: int  # this sender's share of this recipient's mailbox
    pair_bytes: int
    sender_messages: int  # this sender's mail waiting for anyone
    sender_bytes: int
    total_bytes: int  # the whole mailbox, until the next purge
    origin_bytes: int = 0  # mail waiting that came from the sender's address


@dataclass(frozen=True)
class MailboxQuota:
    """How much store-and-forward mail a registry keeps, and for whom (sans-IO).

    Each recipient's mailbox has a message and a byte cap, and one sender may fill
    only ``1/share`` of it, so a flood from one identity cannot crowd out the
    others' mail. Each sender has a cap over all recipients, and the whole mailbox
    a byte cap, so no identity grows the database without bound.
    """

    recipient_messages: int = 256
    recipient_bytes: int = 8 * 1024 * 1024
    share: int = 8
    sender_messages: int = 1024
    sender_bytes: int = 16 * 1024 * 1024
    origin_bytes: int = 64 * 1024 * 1024  # per address: identities are free, addresses less
    total_bytes: int = 1024 * 1024 * 1024

    def refusal(self, usage: MailboxUsage, size: int) -> str | None:
        """Why one more message of ``size`` bytes may not be stored, or None."""
        if usage.recipient_messages + 1 > self.recipient_messages or (
            usage.recipient_bytes + size > self.recipient_bytes
        ):
            return "recipient's mailbox is full"
        if usage.pair_messages + 1 > max(1, self.recipient_messages // self.share) or (
            usage.pair_bytes + size > self.recipient_bytes // self.share
        ):
            return "your share of the recipient's mailbox is full"
        if usage.sender_messages + 1 > self.sender_messages or (
            usage.sender_bytes + size > self.sender_bytes
        ):
            return "you have too much mail waiting in this registry"
        if usage.origin_bytes + size > self.origin_bytes:
            return "your address has too much mail waiting in this registry"
        if usage.total_bytes + size > self.total_bytes:
            return "this registry's mailbox storage is full"
        return None


STRANGER_RATE = 0.2  # messages per second from one key this node does not trust...
STRANGER_BURST = 5.0  # ...after a burst of this many
STRANGERS_RATE = 5.0  # messages per second from all such keys together...
STRANGERS_BURST = 50.0  # ...after a burst of this many
STRANGER_KEYS = 10_000  # per-key buckets kept (least recently used dropped first)


class StrangerGate:
    """Admission of messages signed by keys this node does not trust.

    A throwaway key costs nothing, so each one gets a small budget and all of
    them together one shared budget; what is over is dropped without an answer
    and counted in :attr:`dropped`. Trusted keys never pass through here, so no
    number of strangers can use up their share.
    """

    def __init__(
        self,
        *,
        rate: float = STRANGER_RATE,
        burst: float = STRANGER_BURST,
        total_rate: float = STRANGERS_RATE,
        total_burst: float = STRANGERS_BURST,
        max_keys: int = STRANGER_KEYS,
    ) -> None:
        self._per_key = RateLimiter(rate, burst, max_keys)
        self._total = RateLimiter(total_rate, total_burst, 1)
        self.dropped = 0

    def allow(self, public_key: bytes, now: float) -> bool:
        if self._per_key.allow(public_key.hex(), now) and self._total.allow("all", now):
            return True
        self.dropped += 1
        return False
