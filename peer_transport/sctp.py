"""Cheaper SCTP for aiortc's pure-Python stack, on radmesh's own connections only:
fewer acknowledgements, and larger packets where the path carries them.

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

Packets: aiortc cuts every message into DATA chunks of at most 1,160 bytes
(``USERDATA_MAX_LENGTH``, a module constant sized for any path), and each one costs a
Python SCTP packet, a DTLS record and a UDP send on both sides. :class:`PathMtu` runs
RFC 8899's packetization-layer path MTU search (the decisions are sans-IO in
:mod:`peer_transport.pmtu`; section 6.2.1 for SCTP, RFC 8261 section 5 for SCTP over
DTLS): probes are a HEARTBEAT padded with a PAD chunk (RFC 4820), sent with DF set,
and a size is used once the peer's HEARTBEAT-ACK confirms its probe.
:func:`set_packet_size` makes one association fragment at its own size (aiortc's
methods that read the constant are bound to it again with their own globals), and
:func:`widen_dtls` lets its DTLS transport read and write records up to 2^14 bytes
(aiortc reads ``recv(1500)``: OpenSSL keeps the rest of a larger record for the next
reads, which shifts every later datagram, so a stock aiortc peer must never get one:
a node probes only a peer that announced it reads large records). On loopback (MTU
65,536) and jumbo-frame LANs packets grow to 16 KiB and 8.9 KB; on a 1,500-byte path
to 1,384 bytes; nothing else changes.

Why one module: it is aiortc's SCTP adapter, the one place besides
:mod:`peer_transport.rtc` that touches aiortc; every private attribute it relies on is
checked here, together, when it is imported.

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
import os
import socket
import struct
import sys
import types
from collections.abc import Callable, Coroutine
from typing import Any

import aiortc
from aiortc import rtcdtlstransport as _dtls
from aiortc import rtcsctptransport as _sctp

from peer_transport.pmtu import PROBE_SIZES, PROBE_TIMEOUT, PmtuSearch, Step

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
            for flag in (
                "SCTP_DATA_FIRST_FRAG",
                "SCTP_DATA_LAST_FRAG",
                "tsn_plus_one",
                "uint32_gt",
                "uint32_gte",
            )
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


def _serial_mark(target: Any) -> Callable[[int], bool]:
    """``target._mark_received`` in TSN serial-number order (RFC 9260 1.6, RFC 1982).

    aiortc's sorts the misordered TSNs as plain integers to advance the cumulative TSN:
    once they straddle the wrap from 2^32-1 to 0, the sort puts 0 first, the next TSN
    expected is never at the head, and the cumulative TSN stops for good (the peer
    retransmits forever; the link dies). Here the cumulative TSN advances while its
    successor is in the set, which is also the in-order case's whole cost.
    """
    plus_one = _sctp.tsn_plus_one
    gte: Callable[[int, int], bool] = getattr(_sctp, "uint32_gte")  # noqa: B009 (not exported)
    gt: Callable[[int, int], bool] = getattr(_sctp, "uint32_gt")  # noqa: B009

    def mark_received(tsn: int) -> bool:
        last = target._last_received_tsn
        misordered: set[int] = target._sack_misordered
        if gte(last, tsn) or tsn in misordered:
            target._sack_duplicates.append(tsn)
            return True
        misordered.add(tsn)
        while plus_one(last) in misordered:
            last = plus_one(last)
        target._last_received_tsn = last
        if target._sack_duplicates:
            target._sack_duplicates = [x for x in target._sack_duplicates if gt(x, last)]
        target._sack_misordered = {x for x in misordered if gt(x, last)}
        return False

    return mark_received


def mark_in_serial_order(transport: Any) -> None:
    """Fix aiortc's cumulative-TSN stall across the 2^32 wrap on this transport
    (:func:`_serial_mark`); the association's initial TSN is random, so a long transfer
    crosses the wrap now and then, and a loss or reordering there stalled it."""
    if not isinstance(transport, _sctp.RTCSctpTransport):
        raise TypeError(f"expected an aiortc RTCSctpTransport, got {type(transport).__name__}")
    target: Any = transport  # an instance attribute over aiortc's method
    target._mark_received = _serial_mark(target)


def quick_receive(transport: Any) -> None:
    """Cheaper bookkeeping per received DATA chunk on this transport (``pc.sctp``).

    Reassembly through :class:`_TailStream`; and ``_mark_received`` without its
    per-packet sort (:func:`_serial_mark`, which links use too).
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
    target._mark_received = _serial_mark(target)


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


# --- Per-association packet size (used by peer_transport.pmtu's search) ---------------

DTLS_READ = 1500  # the datagram/record size aiortc's DTLS transport reads and writes
RECORD_MAX = 16384  # largest DTLS record plaintext (RFC 6347: 2^14), so largest SCTP packet
_WIDE_READ = 13 + RECORD_MAX + 2048  # a whole DTLS record: header, 2^14 of data, expansion
_SIZED = "USERDATA_MAX_LENGTH"  # aiortc's module constant: user data per DATA chunk


def user_data_room(packet: int) -> int:
    """User data per DATA chunk in an SCTP packet of ``packet`` bytes (aiortc's formula)."""
    room = packet - _sctp.SCTP_COMMON_HEADER_LENGTH - _sctp.SCTP_DATA_CHUNK_HEADER_LENGTH
    return room // 4 * 4


def _sized_methods() -> dict[str, Any]:
    """Every RTCSctpTransport method that reads ``USERDATA_MAX_LENGTH`` (its fragmenting,
    burst limit, cwnd steps), except ``__init__`` (the initial cwnd, set once)."""
    found = {}
    for name, member in vars(_sctp.RTCSctpTransport).items():
        code = getattr(member, "__code__", None)
        if code is not None and _SIZED in code.co_names and name != "__init__":
            found[name] = member
    return found


def _widened(function: Any) -> Any:
    """``function`` with its one ``1500`` constant (a read size) raised to a whole record."""
    code = function.__code__
    consts = tuple(_WIDE_READ if c == DTLS_READ else c for c in code.co_consts)
    return types.FunctionType(
        code.replace(co_consts=consts),
        function.__globals__,
        function.__name__,
        function.__defaults__,
        function.__closure__,
    )


def _check_sizing() -> None:
    """What :func:`widen_dtls` and :func:`set_packet_size` rely on: the DTLS transport reads
    (``_recv_next``: ``self._ssl.recv(1500)``) and writes (``_write_ssl``:
    ``self._ssl.bio_read(1500)``) with one 1500 constant each; the SCTP transport sizes
    its DATA chunks through the module constant in ``_send`` (and its congestion steps
    in ``_transmit``, ``_receive_sack_chunk``, ``_t3_expired``); HEARTBEAT and
    HEARTBEAT-ACK chunks, ``crc32c``, the DTLS ``_send_data`` and the SCTP
    ``_receive_chunk``/``_set_state`` exist."""
    version = getattr(aiortc, "__version__", "0.0")
    dtls = _dtls.RTCDtlsTransport
    for name, uses in (("_recv_next", "recv"), ("_write_ssl", "bio_read")):
        code = getattr(getattr(dtls, name, None), "__code__", None)
        if code is None or code.co_consts.count(DTLS_READ) != 1 or uses not in code.co_names:
            raise AiortcChanged(
                f"aiortc {version}: RTCDtlsTransport.{name} no longer calls {uses}() with "
                f"one {DTLS_READ}-byte size; peer_transport/sctp.py needs re-checking"
            )
    sized = _sized_methods()
    if not {"_send", "_transmit", "_receive_sack_chunk", "_t3_expired"} <= set(sized):
        raise AiortcChanged(
            f"aiortc {version}: RTCSctpTransport no longer sizes DATA chunks and its "
            f"congestion window through {_SIZED} (found in {sorted(sized)}); "
            "peer_transport/sctp.py needs re-checking"
        )
    cls = _sctp.RTCSctpTransport
    for owner, name in (
        (dtls, "_send_data"),
        (cls, "_receive_chunk"),
        (cls, "_receive_sack_chunk"),
    ):
        if not inspect.iscoroutinefunction(getattr(owner, name, None)):
            raise AiortcChanged(f"aiortc {version}: {owner.__name__}.{name} is gone")
    if not all(
        hasattr(_sctp, n)
        for n in ("HeartbeatChunk", "HeartbeatAckChunk", "crc32c", "SCTP_MAX_PACKET_LENGTH")
    ) or not callable(getattr(cls, "_set_state", None)):
        raise AiortcChanged(
            f"aiortc {version}: rtcsctptransport no longer has HeartbeatChunk, "
            "HeartbeatAckChunk, crc32c, SCTP_MAX_PACKET_LENGTH or _set_state; "
            "peer_transport/sctp.py needs re-checking"
        )


_check_sizing()
BASE_PACKET = int(_sctp.SCTP_MAX_PACKET_LENGTH)  # aiortc's fixed size: fits any path
_SIZED_METHODS = _sized_methods()


def widen_dtls(dtls: Any, *, writes: bool) -> None:
    """Let one RTCDtlsTransport read (and with ``writes``, send) records over 1500 bytes.

    aiortc reads one record per datagram with ``recv(1500)``; OpenSSL keeps the rest of
    a larger record and hands it out on the following reads, so the peer's next
    datagrams come out shifted. A node must widen its reads before it tells the peer it
    may probe (:class:`PathMtu` widens them when it starts). Writes read the memory BIO
    with ``bio_read(1500)``, which would cut a larger record across two datagrams;
    :class:`PathMtu` widens them before its first probe, after the handshake (whose
    flights keep aiortc's reads) and only towards a peer that announced.
    """
    if not isinstance(dtls, _dtls.RTCDtlsTransport):
        raise TypeError(f"expected an aiortc RTCDtlsTransport, got {type(dtls).__name__}")
    target: Any = dtls
    if "_recv_next" not in target.__dict__:
        target._recv_next = types.MethodType(_widened(_dtls.RTCDtlsTransport._recv_next), dtls)
    if writes and "_write_ssl" not in target.__dict__:
        target._write_ssl = types.MethodType(_widened(_dtls.RTCDtlsTransport._write_ssl), dtls)


def set_packet_size(transport: Any, packet: int) -> None:
    """Fragment this RTCSctpTransport's messages into packets of ``packet`` bytes.

    aiortc reads one module constant for the user data per DATA chunk, its burst limit
    and its congestion-window steps (RFC 9260 counts those in MTUs). Each method that
    reads it is bound to this transport again with its own copy of the module globals
    in which the constant is this size: other connections keep aiortc's. Back at
    :data:`BASE_PACKET` the instance's copies are removed.
    """
    if not isinstance(transport, _sctp.RTCSctpTransport):
        raise TypeError(f"expected an aiortc RTCSctpTransport, got {type(transport).__name__}")
    if not BASE_PACKET <= packet <= RECORD_MAX:
        raise ValueError(f"SCTP packet size {packet} is outside {BASE_PACKET}..{RECORD_MAX}")
    target: Any = transport
    if packet == BASE_PACKET:
        for name in _SIZED_METHODS:
            target.__dict__.pop(name, None)
        return
    names = dict(next(iter(_SIZED_METHODS.values())).__globals__)
    names[_SIZED] = user_data_room(packet)
    for name, function in _SIZED_METHODS.items():
        sized = types.FunctionType(
            function.__code__, names, function.__name__, function.__defaults__, function.__closure__
        )
        setattr(target, name, types.MethodType(sized, transport))


# --- The path MTU search on one association (RFC 8899 6.2.1, RFC 8261 5) -------------

ANNOUNCE = b"radmesh-pmtu/1 reads records of any size"  # HEARTBEAT info: may be probed
PROBE = b"radmesh-pmtu/1 probe"  # HEARTBEAT info of a probe: + 8-byte nonce + size
HEARTBEAT_INFO = 1  # RFC 9260 3.3.5 Heartbeat Info parameter
PAD_CHUNK = 0x84  # RFC 4820; top bits 10: a receiver that does not know it skips it
BLACK_HOLE_TIMEOUTS = 2  # T3 expiries in a row without progress above the base size
ANNOUNCEMENTS = 10  # announcements sent (one per PROBE_TIMEOUT) until the peer acks one
# Linux: IP_MTU_DISCOVER / IPV6_MTU_DISCOVER; PROBE = set DF, ignore the kernel's own
# path MTU (the search is ours); DONT = let the kernel fragment (retransmissions of
# packets sent at a size that has since failed, RFC 9260 7.3).
# Python's socket module does not name them; elsewhere than Linux nothing is probed.
_LINUX = sys.platform == "linux"
_MTU_DISCOVER = {
    socket.AF_INET: (socket.IPPROTO_IP, 10 if _LINUX else None),
    socket.AF_INET6: (socket.IPPROTO_IPV6, 23 if _LINUX else None),
}
DF_PROBE, DF_DONT = 3, 0  # IP_PMTUDISC_PROBE, IP_PMTUDISC_DONT (same for IPv6)


def _check_search() -> None:
    """:class:`PathMtu` reads the ports and the peer's verification tag to build a probe
    packet, and reaches the ICE sockets through the DTLS and ICE transports."""
    version = getattr(aiortc, "__version__", "0.0")
    names = _sctp.RTCSctpTransport.__init__.__code__.co_names
    wanted = {"_local_port", "_remote_port", "_remote_verification_tag", "_last_sacked_tsn"}
    if not wanted <= set(names) or "_sent_queue" not in names:
        raise AiortcChanged(
            f"aiortc {version}: RTCSctpTransport no longer keeps {sorted(wanted)}; "
            "peer_transport/sctp.py needs re-checking"
        )


_check_search()


def _sockets(transport: Any) -> list[socket.socket]:
    """The UDP sockets under one association (host, server-reflexive and TURN)."""
    found = []
    with contextlib.suppress(AttributeError):
        for protocol in transport.transport.transport._connection._protocols:
            sock = protocol.transport.get_extra_info("socket")
            if sock is not None:
                found.append(sock)
    return found


def set_dont_fragment(transport: Any, mode: int) -> bool:
    """Set IP_MTU_DISCOVER ``mode`` on the association's sockets; False where the
    platform has no such option (no probing there: a probe must not be fragmented)."""
    sockets = _sockets(transport)
    done = bool(sockets)
    for sock in sockets:
        level, option = _MTU_DISCOVER.get(sock.family, (0, None))
        if option is None:
            done = False
            continue
        try:
            sock.setsockopt(level, option, mode)
        except OSError:
            done = False
    return done


def probe_packet(transport: Any, size: int | None, info: bytes) -> bytes:
    """An SCTP packet of exactly ``size`` bytes: a HEARTBEAT carrying ``info``, then a
    PAD chunk (RFC 4820) filling the rest; the peer echoes the info in a small
    HEARTBEAT-ACK and skips the PAD (aiortc's parser drops unknown chunk types).
    With ``size`` None, the HEARTBEAT alone."""
    heartbeat = _sctp.HeartbeatChunk()
    heartbeat.params = [(HEARTBEAT_INFO, info)]
    chunks = bytes(heartbeat)
    if size is not None:
        pad = size - _sctp.SCTP_COMMON_HEADER_LENGTH - len(chunks)
        if pad < 4 or pad % 4:
            raise ValueError(f"no PAD chunk makes a {size}-byte probe")
        chunks += struct.pack("!BBH", PAD_CHUNK, 0, pad) + bytes(pad - 4)
    header = struct.pack(
        "!HHL", transport._local_port, transport._remote_port, transport._remote_verification_tag
    )
    crc32c: Callable[[bytes], int] = getattr(_sctp, "crc32c")  # noqa: B009 (not exported)
    checksum = crc32c(header + b"\x00\x00\x00\x00" + chunks)
    return header + struct.pack("<L", checksum) + chunks


class PathMtu:
    """Path MTU discovery on one RTCSctpTransport (``pc.sctp``), before it connects.

    Its DTLS transport reads records of any size at once; once the association is
    established the node announces that (a HEARTBEAT with :data:`ANNOUNCE`, repeated
    until acknowledged) and, when the peer announced the same, probes larger sizes
    (:class:`peer_transport.pmtu.PmtuSearch`) with DF set on its sockets (Linux
    ``IP_PMTUDISC_PROBE``, from the first probe on: elsewhere nothing is probed); a
    confirmed size becomes this association's packet size (:func:`set_packet_size`).
    :data:`BLACK_HOLE_TIMEOUTS` retransmission timeouts in a row without progress at a
    size above the base drop it back to the base, and the packets already sent larger
    are retransmitted with DF cleared (RFC 9260 7.3: the kernel fragments them); at
    the base size with DF set (a path under 1,254 bytes), DF is cleared.
    A stock aiortc peer never announces: nothing larger than aiortc's own packets is
    ever sent to it.
    """

    def __init__(self, transport: Any, sizes: tuple[int, ...] = PROBE_SIZES) -> None:
        if not isinstance(transport, _sctp.RTCSctpTransport):
            raise TypeError(f"expected an aiortc RTCSctpTransport, got {type(transport).__name__}")
        self.transport: Any = transport
        self.search = PmtuSearch(BASE_PACKET, sizes)
        self.nonce = os.urandom(8)
        self.can_probe = False  # DF can be set on the sockets (Linux)
        self.df: int | None = None  # the IP_MTU_DISCOVER mode set, None: the kernel's default
        self.peer_ready = False  # the peer announced (it reads records of any size)
        self.heard = False  # the peer acknowledged our announcement
        self.announcements = 0
        self.probes: list[int] = []  # the last sizes probed, in order (tests read it)
        self.stalls = 0
        self._stall_mark: Any = None
        self._timer: asyncio.TimerHandle | None = None
        self._announce_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.stepped = asyncio.Event()  # set after each step of the search (tests wait on it)
        widen_dtls(transport.transport, writes=False)
        target: Any = transport  # instance attributes over aiortc's methods
        self._receive = target._receive_chunk
        self._set_state = target._set_state
        target._receive_chunk = self._receive_chunk
        target._set_state = self._state_set
        self._wrap_t3()

    @property
    def size(self) -> int:
        """The packet size data uses now."""
        return self.search.size

    def _state_set(self, state: Any) -> None:
        self._set_state(state)
        if state == self.transport.State.ESTABLISHED:
            self.can_probe = _LINUX and bool(_sockets(self.transport))
            self._announce()
        elif state == self.transport.State.CLOSED:
            self._stop()

    def _stop(self) -> None:
        for timer in (self._timer, self._announce_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._announce_timer = None

    def _spawn(self, packet: bytes) -> None:
        task = asyncio.ensure_future(self._send(packet))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, packet: bytes) -> None:
        with contextlib.suppress(ConnectionError):  # the DTLS transport closed meanwhile
            await self.transport.transport._send_data(packet)

    def _announce(self) -> None:
        self._announce_timer = None
        if self.heard or self.announcements >= ANNOUNCEMENTS:
            return
        self.announcements += 1
        self._spawn(probe_packet(self.transport, None, ANNOUNCE + self.nonce))
        loop = asyncio.get_running_loop()
        self._announce_timer = loop.call_later(PROBE_TIMEOUT, self._announce)

    async def _receive_chunk(self, chunk: Any) -> None:
        if isinstance(chunk, _sctp.HeartbeatAckChunk):
            self._heartbeat_ack(chunk)
        elif isinstance(chunk, _sctp.HeartbeatChunk):
            info = dict(chunk.params).get(HEARTBEAT_INFO, b"")
            if info.startswith(ANNOUNCE) and not self.peer_ready:
                self.peer_ready = True
                log.debug("SCTP: the peer reads large records; probing: %s", self.can_probe)
                if self.can_probe:
                    self._apply(self.search.peer_ready())
        await self._receive(chunk)

    def _heartbeat_ack(self, chunk: Any) -> None:
        info = dict(chunk.params).get(HEARTBEAT_INFO, b"")
        if info == ANNOUNCE + self.nonce:
            self.heard = True
            self.stepped.set()
        elif info.startswith(PROBE + self.nonce) and len(info) == len(PROBE) + 12:
            (size,) = struct.unpack("!I", info[-4:])
            self._apply(self.search.acked(size))

    def _expired(self) -> None:
        self._timer = None
        self._apply(self.search.timer())

    def _apply(self, step: Step) -> None:
        if step.probe is not None or step.size > BASE_PACKET:
            widen_dtls(self.transport.transport, writes=True)  # never for a stock peer
        if step.size != self._applied:
            self._resize(step.size)
        if step.probe is not None:
            self.probes.append(step.probe)
            del self.probes[:-32]  # a search every 10 minutes for days: the last ones
            info = PROBE + self.nonce + struct.pack("!I", step.probe)
            if self._dont_fragment(DF_PROBE):  # else the probe is lost: its timer says so
                self._spawn(probe_packet(self.transport, step.probe, info))
        if step.timer is not None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = asyncio.get_running_loop().call_later(step.timer, self._expired)
        self.stepped.set()

    _applied = BASE_PACKET

    def _resize(self, size: int) -> None:
        smaller = size < self._applied
        self._applied = size
        set_packet_size(self.transport, size)
        self._wrap_t3()
        if smaller:  # packets already sent larger go out fragmented (RFC 9260 7.3)
            self._dont_fragment(DF_DONT)
        log.debug("SCTP: packet size %d on %x", size, id(self.transport))

    def _wrap_t3(self) -> None:
        expired = self.transport._t3_expired  # aiortc's, or its sized copy

        def t3_expired() -> None:
            expired()
            self._stalled()

        self.transport._t3_expired = t3_expired

    def _dont_fragment(self, mode: int) -> bool:
        if self.df != mode:
            if not set_dont_fragment(self.transport, mode):
                return False
            self.df = mode
        return True

    def _stalled(self) -> None:
        if self._applied == BASE_PACKET and self.df != DF_PROBE:
            return  # aiortc's own packets, sent as aiortc sends them
        mark = self.transport._last_sacked_tsn
        self.stalls = self.stalls + 1 if mark == self._stall_mark else 1
        self._stall_mark = mark
        if self.stalls < BLACK_HOLE_TIMEOUTS:
            return
        self.stalls = 0
        if self._applied == BASE_PACKET:  # a path under aiortc's own size (IPv4 only):
            log.info("SCTP: %d-byte packets keep being lost; DF cleared", BASE_PACKET)
            self._dont_fragment(DF_DONT)  # DF was ours: let the kernel fragment them
            return
        log.info(
            "SCTP: %d-byte packets keep being lost; back to %d bytes", self._applied, BASE_PACKET
        )
        self._apply(self.search.black_hole())


def path_mtu(transport: Any) -> PathMtu:
    """Start :class:`PathMtu` on this RTCSctpTransport (``pc.sctp``) before it connects."""
    return PathMtu(transport)


__all__ = [
    "ACK_DELAY",
    "ACK_EVERY",
    "BASE_PACKET",
    "RECORD_MAX",
    "AiortcChanged",
    "PathMtu",
    "delay_acks",
    "mark_in_serial_order",
    "path_mtu",
    "quick_receive",
    "set_packet_size",
    "user_data_room",
    "widen_dtls",
]
