"""Rate limiting with injected time (sans-IO): token buckets keyed by node or address."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


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
