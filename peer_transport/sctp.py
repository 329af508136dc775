"""Cheaper receiving for aiortc's pure-Python SCTP, on radmesh's own connections only.

aiortc's SCTP (``aiortc.rtcsctptransport``) acknowledges every packet it receives: one
SACK chunk per ~1.2 KB DATA packet, each serialised, DTLS-encrypted and sent by the
receiver, then parsed, decrypted and processed by the sender. In the loopback study
bench that was about a third of the receiver's CPU. RFC 9260 section 6.2 (RFC 4960
6.2 before it) asks for less: a SACK for at least every second packet and within
200 ms of an unacknowledged DATA chunk, and at once when a packet shows a gap or a
duplicate. :func:`delay_acks` makes one RTCSctpTransport do exactly that (every
second packet, a :data:`ACK_DELAY` timer for an odd last one, at once on a gap, a
duplicate or a FORWARD TSN); :class:`peer_transport.rtc.RtcLink` uses it.
:func:`quick_receive` takes two per-chunk costs out of the receive path (a reassembly
that rescanned a message for each of its fragments, and a sort of the gap set for
every in-order chunk); it measured no faster end to end, so links do not use it: it
stays as a lever of the bench (``BENCH_LEVERS=acks,quick``).

This relies on aiortc's private attributes, so every one of them is checked when this
module is imported (:func:`_check_aiortc`); a version of aiortc that renamed or
restructured them makes the import fail with :class:`AiortcChanged`, naming what moved,
rather than silently sending fewer acknowledgements or none. pyproject.toml pins aiortc
to the range this was tested with (tests/peer_transport/test_sctp.py runs transfers,
including a resume, over real aiortc with it). The raw aiortc baseline of
``python -m bench transfer`` stays stock.

Measured (``python -m bench.bench_transfer --ratio 200 7 stock/acks``, 200 x 512x512
CT, two processes on loopback, stock and delayed acks in the same rounds): 1.36x the
stock rate (median of 7 rounds), CPU per wire MB sender 0.079 -> 0.053 s, receiver
0.151 -> 0.129 s; README.md, Benchmarks, has the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import aiortc
from aiortc import rtcsctptransport as _sctp

log = logging.getLogger(__name__)

ACK_DELAY = 0.01  # seconds an odd last packet waits for its SACK (RFC 9260: at most 0.2)
ACK_EVERY = 2  # packets per SACK (RFC 9260 6.2: at least every second packet)
TESTED = ((1, 16), (1, 17))  # aiortc versions [low, high) this adapter was tested with


class AiortcChanged(ImportError):
    """The installed aiortc no longer has what :func:`delay_acks` relies on."""


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


def _check_aiortc() -> None:
    """Fail loudly if aiortc's SCTP is not the one this adapter was written against.

    Checked: the version range; ``_handle_data`` still sends through ``_send_sack``
    when ``_sack_needed`` (so one call per received packet is what we intercept);
    ``_send_sack`` is the one place a SACK is built and it clears ``_sack_needed``;
    ``__init__`` creates ``_sack_needed``, ``_sack_misordered`` (gaps) and
    ``_sack_duplicates``; ``_receive_forward_tsn_chunk`` and ``_association_state``
    with ``State.ESTABLISHED`` exist.
    """
    version = getattr(aiortc, "__version__", "0.0")
    low, high = TESTED
    if not low <= _version(version) < high:
        raise AiortcChanged(
            f"peer_transport.sctp was tested with aiortc {low[0]}.{low[1]}.x only and "
            f"aiortc {version} is installed: install a tested version "
            f"(pyproject.toml) or re-check peer_transport/sctp.py against it"
        )
    cls = _sctp.RTCSctpTransport
    needs: list[tuple[str, str, tuple[str, ...]]] = [
        ("_handle_data", "coroutine", ("_sack_needed", "_send_sack")),
        ("_send_sack", "coroutine", ("_sack_misordered", "_sack_duplicates", "_sack_needed")),
        ("_receive_forward_tsn_chunk", "coroutine", ("_sack_needed",)),
        ("__init__", "function", ("_sack_needed", "_sack_misordered", "_sack_duplicates")),
        ("__init__", "function", ("_association_state",)),
    ]
    for name, kind, names in needs:
        member = getattr(cls, name, None)
        code = getattr(member, "__code__", None)
        if code is None or (kind == "coroutine" and not inspect.iscoroutinefunction(member)):
            raise AiortcChanged(
                f"aiortc {version}: RTCSctpTransport.{name} is missing or no longer a "
                f"{kind}; peer_transport/sctp.py needs re-checking"
            )
        missing = [n for n in names if n not in code.co_names]
        if missing:
            raise AiortcChanged(
                f"aiortc {version}: RTCSctpTransport.{name} no longer uses {missing}; "
                "peer_transport/sctp.py needs re-checking"
            )
    if getattr(getattr(cls, "State", None), "ESTABLISHED", None) is None:
        raise AiortcChanged(f"aiortc {version}: RTCSctpTransport.State.ESTABLISHED is gone")
    receive = getattr(cls, "_receive_data_chunk", None)
    stream = getattr(_sctp, "InboundStream", None)
    used = set(getattr(getattr(receive, "__code__", None), "co_names", ()))
    mark = getattr(cls, "_mark_received", None)
    marks = set(getattr(getattr(mark, "__code__", None), "co_names", ()))
    if (
        not {"_get_inbound_stream", "add_chunk", "pop_messages", "_mark_received"} <= used
        or not {"_last_received_tsn", "_sack_misordered", "_sack_duplicates"} <= marks
        or "_inbound_streams" not in cls._get_inbound_stream.__code__.co_names
        or stream is None
        or "reassembly" not in stream.__init__.__code__.co_names
        or not all(
            hasattr(_sctp, flag)
            for flag in ("SCTP_DATA_FIRST_FRAG", "SCTP_DATA_LAST_FRAG", "tsn_plus_one")
        )
    ):
        raise AiortcChanged(
            f"aiortc {version}: RTCSctpTransport._receive_data_chunk no longer marks "
            "through _mark_received (over _last_received_tsn, _sack_misordered, "
            "_sack_duplicates) and reassembles through InboundStream.add_chunk/"
            "pop_messages; peer_transport/sctp.py needs re-checking"
        )


_check_aiortc()


class _DelayedAcks:
    """The per-transport state; installed as instance attributes over the class's methods."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.send_now: Callable[[], Coroutine[Any, Any, None]] = transport._send_sack
        self.forward_tsn = transport._receive_forward_tsn_chunk
        self.unacked = 0
        self.urgent = False
        self.timer: asyncio.TimerHandle | None = None
        self.late: asyncio.Task[None] | None = None
        self.packets = 0  # packets that needed acknowledging
        self.sent = 0  # SACKs sent (tests read these counters)
        self.delayed = 0  # packets whose SACK was left to the next packet or the timer

    async def send_sack(self) -> None:
        """Called by ``_handle_data`` after each packet that needs acknowledging."""
        transport = self.transport
        self.packets += 1
        self.unacked += 1
        if (
            self.unacked >= ACK_EVERY
            or self.urgent
            or transport._sack_misordered
            or transport._sack_duplicates
        ):
            await self._flush()
            return
        self.delayed += 1
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(ACK_DELAY, self._timed_out)

    async def receive_forward_tsn(self, chunk: Any) -> None:
        self.urgent = True  # RFC 3758 3.6: the new cumulative TSN is acknowledged at once
        await self.forward_tsn(chunk)

    async def _flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.unacked = 0
        self.urgent = False
        self.sent += 1
        await self.send_now()

    def _timed_out(self) -> None:
        self.timer = None
        transport = self.transport
        if transport._sack_needed and transport._association_state in (
            transport.State.ESTABLISHED,
            getattr(transport.State, "SHUTDOWN_PENDING", None),
            getattr(transport.State, "SHUTDOWN_RECEIVED", None),
        ):
            self.late = asyncio.ensure_future(self._late_flush())

    async def _late_flush(self) -> None:
        with contextlib.suppress(ConnectionError):  # the DTLS transport closed meanwhile
            await self._flush()


_FRAGMENT_FLAGS = _sctp.SCTP_DATA_FIRST_FRAG | _sctp.SCTP_DATA_LAST_FRAG


class _TailStream(_sctp.InboundStream):
    """aiortc's InboundStream, without rescanning a message that cannot be complete yet.

    ``InboundStream.pop_messages`` walks the whole reassembly list after every DATA
    chunk, so a message of n fragments costs n*n/2 steps (a 64 KiB message is ~55
    fragments). When the chunk just added is the next TSN after the list's last
    chunk, that last chunk is a middle fragment and the new one is a middle fragment
    too, the chunk continues an unfinished message and completes nothing: the walk
    would yield nothing, and is skipped. Every other chunk (first or last fragments,
    anything out of order) takes aiortc's own path.
    """

    _quiet = False

    def add_chunk(self, chunk: Any) -> None:
        tail = self.reassembly[-1] if self.reassembly else None
        self._quiet = (
            tail is not None
            and chunk.tsn == _sctp.tsn_plus_one(tail.tsn)
            and not (tail.flags & _sctp.SCTP_DATA_LAST_FRAG)
            and not (chunk.flags & _FRAGMENT_FLAGS)
            and chunk.flags == tail.flags & ~_sctp.SCTP_DATA_FIRST_FRAG
            and chunk.stream_seq == tail.stream_seq
        )
        super().add_chunk(chunk)

    def pop_messages(self) -> Any:
        if self._quiet:
            return iter(())
        return super().pop_messages()


def _quick_mark(target: Any) -> Callable[[int], bool]:
    """``target._mark_received``, with the in-order case short-cut (see :func:`quick_receive`)."""
    slow = _sctp.RTCSctpTransport._mark_received
    next_tsn = _sctp.tsn_plus_one

    def mark_received(tsn: int) -> bool:
        if (
            not target._sack_misordered
            and not target._sack_duplicates
            and tsn == next_tsn(target._last_received_tsn)
        ):
            target._last_received_tsn = tsn
            return False
        duplicate: bool = slow(target, tsn)
        return duplicate

    return mark_received


def quick_receive(transport: Any) -> None:
    """Cheaper bookkeeping per received DATA chunk on this transport (``pc.sctp``).

    Reassembly through :class:`_TailStream`; and ``_mark_received`` without its
    per-packet sort and two list rebuilds when the chunk is simply the next TSN and
    nothing is missing or duplicated (``_last_received_tsn`` advances by one, which is
    what aiortc's own path ends with then). Anything else takes aiortc's path.
    """
    if not isinstance(transport, _sctp.RTCSctpTransport):
        raise TypeError(f"expected an aiortc RTCSctpTransport, got {type(transport).__name__}")
    target: Any = transport  # instance attributes over aiortc's methods
    streams = target._inbound_streams

    def get_inbound_stream(stream_id: int) -> Any:
        stream = streams.get(stream_id)
        if stream is None:
            stream = streams[stream_id] = _TailStream()
        elif type(stream) is _sctp.InboundStream:
            stream.__class__ = _TailStream  # created before this was installed
        return stream

    target._get_inbound_stream = get_inbound_stream
    target._mark_received = _quick_mark(target)


def delay_acks(transport: Any) -> _DelayedAcks:
    """Acknowledge every second packet on this RTCSctpTransport (``pc.sctp``), not every one.

    Only this transport changes (instance attributes shadow two methods); other
    connections in the process, such as a bench's stock baseline, keep aiortc's
    behaviour. Returns the state object (its ``sent`` and ``delayed`` counters).
    """
    if not isinstance(transport, _sctp.RTCSctpTransport):
        raise TypeError(f"expected an aiortc RTCSctpTransport, got {type(transport).__name__}")
    target: Any = transport  # instance attributes over aiortc's methods
    existing = target.__dict__.get("_send_sack")
    if existing is not None:
        state: _DelayedAcks = existing.__self__
        return state
    state = _DelayedAcks(target)
    target._send_sack = state.send_sack
    target._receive_forward_tsn_chunk = state.receive_forward_tsn
    log.debug("SCTP: delayed acknowledgements on %x", id(transport))
    return state


__all__ = ["ACK_DELAY", "ACK_EVERY", "AiortcChanged", "delay_acks", "quick_receive"]
