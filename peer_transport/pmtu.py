"""Packetization-layer path MTU search for one SCTP association (sans-IO).

RFC 8899 (DPLPMTUD), section 6.2.1 for SCTP: the packetization layer probes a larger
packet size with a HEARTBEAT padded by a PAD chunk (RFC 4820) and uses a size only
once the peer's HEARTBEAT-ACK confirms that a probe of that size got through; RFC 8261
section 5 asks SCTP over DTLS to do this. :class:`PmtuSearch` is the decision half:
which size to probe next, which size the data may use, when to give up on a size, when
to fall back to the base after a black hole and when to search again. The aiortc half
(:class:`peer_transport.sctp.PathMtu`) sends the probes and applies the size.

The search starts at ``base`` (aiortc's 1,189-byte packets, which fit any path) and
only once the peer said it reads records of any size (``peer_ready``: a radmesh node;
a stock aiortc peer never says so and is never probed, since its DTLS reads 1,500
bytes a record). It probes ``sizes`` upwards, each up to :data:`MAX_PROBES` times;
the first size that is not confirmed ends the search, and the search runs again after
:data:`RAISE_AFTER` seconds (a path can grow). A black hole (data at the confirmed
size keeps being lost, ``black_hole``) drops to ``base`` at once and searches again
after :data:`RAISE_AFTER`.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from crypto.statetable import TransitionTable
from peer_transport.errors import LocalProtocolError

# SCTP packet sizes probed, smallest first: fits a 1,500-byte Ethernet path under IPv6,
# UDP and the largest DTLS overhead (CBC: 65 bytes); fits 4,000-byte tunnels; fits a
# 9,000-byte jumbo-frame LAN the same way; a whole DTLS record (2^14, loopback).
PROBE_SIZES = (1384, 4000, 8876, 16384)
MAX_PROBES = 3  # RFC 8899 MAX_PROBES: unconfirmed probes of one size before giving up
PROBE_TIMEOUT = 1.0  # seconds a probe waits for its HEARTBEAT-ACK
RAISE_AFTER = 600.0  # seconds before searching again (RFC 8899 PMTU_RAISE_TIMER)


class PmtuError(LocalProtocolError):
    """A PMTU search event that is not allowed in the search's state (a bug in the caller)."""


class State(enum.Enum):
    DISABLED = "waiting for the peer to say it reads large records"
    SEARCHING = "probing a larger size"
    DONE = "search complete, waiting to search again"


class Event(enum.Enum):
    PEER_READY = "peer reads large records"
    CONFIRMED_MORE = "probe confirmed, a larger size remains"
    CONFIRMED_LAST = "probe confirmed, the largest size"
    LOST_RETRY = "probe lost, try the same size again"
    LOST_GIVE_UP = "probe lost too often"
    RAISE = "time to search again"
    BLACK_HOLE = "data keeps being lost at the confirmed size"


_TABLE: TransitionTable[State, Event] = TransitionTable(
    {
        (State.DISABLED, Event.PEER_READY): State.SEARCHING,
        (State.SEARCHING, Event.CONFIRMED_MORE): State.SEARCHING,
        (State.SEARCHING, Event.CONFIRMED_LAST): State.DONE,
        (State.SEARCHING, Event.LOST_RETRY): State.SEARCHING,
        (State.SEARCHING, Event.LOST_GIVE_UP): State.DONE,
        (State.SEARCHING, Event.BLACK_HOLE): State.DONE,
        (State.DONE, Event.RAISE): State.SEARCHING,
        (State.DONE, Event.BLACK_HOLE): State.DONE,
    },
    lambda state, event: PmtuError(f"PMTU search: {event.value!r} while {state.value!r}"),
)


@dataclass(frozen=True)
class Step:
    """What the caller does now: use ``size`` for data; send a probe of ``probe`` bytes
    (if not None); call :meth:`PmtuSearch.timer` after ``timer`` seconds (if not None)."""

    size: int
    probe: int | None = None
    timer: float | None = None


class PmtuSearch:
    """The search for one association and one direction (each node probes its own sends)."""

    def __init__(self, base: int, sizes: Sequence[int] = PROBE_SIZES) -> None:
        if list(sizes) != sorted(set(sizes)) or (sizes and sizes[0] <= base):
            raise ValueError("probe sizes must rise, each above the base size")
        self.base = base
        self.sizes = tuple(sizes)
        self.size = base  # confirmed: what data may use
        self.state = State.DISABLED
        self.probing: int | None = None  # the size being probed
        self.attempts = 0  # probes of that size sent
        self.confirmed = 0  # probes confirmed, ever
        self.black_holes = 0  # falls back to the base, ever

    def _fire(self, event: Event) -> None:
        self.state = _TABLE.fire(self.state, event)

    def _next_probe(self) -> Step:
        larger = [s for s in self.sizes if s > self.size]
        if not larger:
            self._fire(Event.CONFIRMED_LAST)
            return self._done()
        self.probing, self.attempts = larger[0], 1
        return Step(self.size, probe=self.probing, timer=PROBE_TIMEOUT)

    def _done(self) -> Step:
        self.probing, self.attempts = None, 0
        return Step(self.size, timer=RAISE_AFTER)

    def peer_ready(self) -> Step:
        """The peer said it reads records of any size: start searching."""
        if self.state is not State.DISABLED:
            return Step(self.size)  # said again (its announcement is repeated)
        self._fire(Event.PEER_READY)
        return self._next_probe()

    def acked(self, size: int) -> Step:
        """A HEARTBEAT-ACK for a probe of ``size`` bytes arrived."""
        if self.state is not State.SEARCHING or size != self.probing:
            return Step(self.size)  # late or stale: that probe was already given up
        self.confirmed += 1
        self.size = size
        if size == self.sizes[-1]:
            self._fire(Event.CONFIRMED_LAST)
            return self._done()
        self._fire(Event.CONFIRMED_MORE)
        return self._next_probe()

    def timer(self) -> Step:
        """The timer of the last :class:`Step` expired."""
        if self.state is State.SEARCHING and self.probing is not None:
            if self.attempts < MAX_PROBES:
                self._fire(Event.LOST_RETRY)
                self.attempts += 1
                return Step(self.size, probe=self.probing, timer=PROBE_TIMEOUT)
            self._fire(Event.LOST_GIVE_UP)
            return self._done()
        if self.state is State.DONE:
            self._fire(Event.RAISE)
            return self._next_probe()
        return Step(self.size)

    def black_hole(self) -> Step:
        """Data at the confirmed size keeps being lost: back to the base size."""
        if self.size == self.base:
            return Step(self.size)
        self.black_holes += 1
        self.size = self.base
        self._fire(Event.BLACK_HOLE)
        return self._done()


__all__ = [
    "MAX_PROBES",
    "PROBE_SIZES",
    "PROBE_TIMEOUT",
    "RAISE_AFTER",
    "PmtuError",
    "PmtuSearch",
    "State",
    "Step",
]
