"""Study transfer over aiortc on loopback: throughput vs the raw channel, first slice, RSS.

The receiver is a separate process (its peak RSS is what is reported); the
sender encodes with the streaming :meth:`PreparedStudy.from_source` into a
sealed on-disk spool, the way ``send_study`` does. The 1 GB study is generated
on the fly (2000 noisy 512x512 CT slices), never held in memory at once.

Run: ``python -m bench transfer``; ``python -m bench.bench_transfer --first-slice [N]``
for the first slice after ``send_study`` of a study never encoded (streamed offers).
Also home of a bare aiortc data-channel pair on 127.0.0.1 used by the transfer runner's
loopback test. The study runs of ``main`` use the SCTP setting of the node's own links
(delayed acknowledgements and the path MTU search, :mod:`peer_transport.sctp`); the raw
channel they are compared with is stock aiortc. ``--ratio`` measures the levers one by
one.

The link is a stand-in for peer_transport/connection.py without its handshake,
per-channel encryption and heartbeat (libsodium's secretbox costs little next to
the SCTP): two negotiated channels, ``control`` and ``bulk``, and a
:class:`ChannelLink` that gives the transfer runner ``send_control`` and a
``send_bulk`` that waits on ``bufferedamountlow`` (backpressure).

Where the receiver's CPU goes (``--ratio`` prints it per thread, per wire MB, for the
200-slice CT, 33 MB on the wire). Before (commit 1096020, decoding in one thread): verify
0.049-0.058 s, event loop 0.019-0.023, store 0.003, the whole process 0.072-0.084, 558
page faults per slice; one verify thread at 0.05 s per MB capped it near 20 wire MB/s.
The verify path alone, one thread (ms per wire MB): JPEG-LS 32-34, reading the sealed
part back 2.0, SHA-256 of the file 2.3, pydicom's parse 2.3 + UIDs 0.8 + pixel check 0.5,
BLAKE2b of the wire 1.4, msgpack 0.4, zstd 0.1, joining the file 0.4 (2.5 with its page
faults); all but msgpack, pydicom and the copies release the GIL (about 4 ms held). The
event loop's own share of a chunk (digest, seal, pwrite, journal) is about 3 ms of its
17-23; the rest is aiortc's SCTP and DTLS. Now: a verify thread per core
(:func:`peer_transport.transfer.runner.verify_threads`: two here), the file decoded in
place (one buffer, no per-frame arrays, no join), glibc's mmap threshold at 4 MiB, not
128 KiB (a slice's half-megabyte buffers reused, not mmapped and zero-filled anew: 120-160
faults per slice), a poll that no longer walks the study, decoding threads at nice 5
(:data:`~peer_transport.transfer.runner.DECODE_NICE`: the event loop gets a core first):
verify 0.044-0.051 (both threads), event loop 0.015-0.019, store 0.002-0.003, the process
0.063-0.075.

A/B in one run, alternated round by round, 2 December 2026, the final code:
``BENCH_BEFORE_TREE=<1096020 checkout> BENCH_BEFORE_LEVERS=acks,pmtu --ratio 200 6
acks,pmtu,nice0/acks,pmtu``, load 1.1-1.9 (the bench's own two processes are ~1.5 of it),
raw 12.4-22.8 MB/s; x raw per round before / now with decoders at nice 0 / now (now's
wire MB/s): 2.91 / 3.33 / 3.55 (24.9), 3.43 / 4.49 / 4.02 (21.5), 3.88 / 4.45 / 4.21
(17.8), 2.73 / 3.78 / 4.03 (23.3), 2.73 / 3.60 / 3.68 (25.9), 2.97 / 3.72 / 3.99 (26.6);
median 2.94x (min 2.73) before, 4.00x (min 3.55) now, 1.28x the rate of before (min 1.08,
max 1.47). Per wire MB in that run: before verify 0.049, loop 0.019, store 0.003, process
0.072 (558 faults per slice); now 0.044 / 0.015 / 0.002 / 0.063 (116-159 faults).
``python -m bench transfer`` right after (load 1.5-1.7): the 200-slice study 5.22x raw
(81.4 MB/s, RSS 103 MB), the 1.05 GB study at 63.4 MB/s with the receiver's peak RSS
107 MB (goal < 300 MB).

Earlier runs, decoders at nice 0 (the default then), on a busier machine; x raw before /
now per round (now's wire MB/s), load as the rounds ended (another helper's CPU work ran
at times). ``BENCH_BEFORE_TREE=<1096020 checkout>
BENCH_BEFORE_LEVERS=acks,pmtu --ratio 200 6 acks,pmtu``, load 1.6-2.2, raw 8.9-19.3 MB/s:
4.19 / 5.49 (18.5), 3.12 / 5.02 (23.5), 3.96 / 3.89 (17.4), 3.83 / 4.85 (17.0),
2.62 / 4.21 (19.6), 2.72 / 3.67 (20.4); median 3.48x (min 2.62) before, 4.53x (min 3.67)
now; now 1.33x the rate of before (min 0.98). ``--ratio 200 6
acks,pmtu,verify1,mmap128/acks,pmtu`` (one thread and the old threshold against now,
both with the in-place decode and the poll fix), load 1.2-1.7, raw 10.6-16.8 MB/s:
3.48 / 4.77 (20.0), 4.05 / 5.08 (19.3), 3.97 / 4.84 (20.3), 3.39 / 4.04 (18.9),
3.90 / 4.32 (20.8), 3.08 / 4.35 (23.1); median 3.69x (min 3.08) against 4.56x (min 4.04),
1.24x the rate (min 1.11). ``python -m bench transfer`` (load 1.6-2.1): the 1.05 GB study
at 56.6 MB/s, the receiver's peak RSS 106 MB (goal < 300 MB). All of these ran the
decoding threads at nice 0. Then at nice 5 (lever ``nice5``, now the default) against 0:
1.13x the rate (1.04-1.45) over 3 rounds, 1.11x (0.85-1.22) over 5, 1.29x (0.70-1.50)
over 6, ahead in 10 of the 14 (load 1.1-2.4, raw 8.3-17 MB/s: a busy machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import aioice.ice
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from pydicom.uid import generate_uid

from bench import bench_codec
from crypto.identity import Identity
from peer_transport.transfer.prepared import PreparedStudy
from peer_transport.transfer.progress import Progress
from peer_transport.transfer.receiver import DEFAULT_WINDOW
from peer_transport.transfer.runner import StudyReceiver, StudySender
from peer_transport.transfer.spool import SenderSpool

HIGH_WATER = 1 << 20  # bytes queued in SCTP before send_bulk waits
LOW_WATER = 256 << 10


def loopback_only() -> None:
    """Gather only 127.0.0.1 host candidates: tests and benches never touch real NICs."""
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]


class ChannelLink:
    def __init__(self, control: Any, bulk: Any) -> None:
        self.control, self.bulk = control, bulk
        bulk.bufferedAmountLowThreshold = LOW_WATER
        self._low = asyncio.Event()
        bulk.on("bufferedamountlow", self._low.set)

    async def send_control(self, data: bytes) -> None:
        self.control.send(data)

    async def send_bulk(self, data: bytes) -> None:
        while self.bulk.bufferedAmount > HIGH_WATER:
            self._low.clear()
            await asyncio.wait_for(self._low.wait(), 30)
        self.bulk.send(data)

    def attach(self, on_control: Callable[[bytes], None], on_bulk: Callable[[bytes], None]) -> None:
        self.control.on("message", on_control)
        self.bulk.on("message", on_bulk)


def peer() -> tuple[RTCPeerConnection, ChannelLink]:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # never aiortc's public STUN
    control = pc.createDataChannel("control", negotiated=True, id=0)
    bulk = pc.createDataChannel("bulk", negotiated=True, id=1)
    tuned(pc)
    return pc, ChannelLink(control, bulk)


def socket_buffers(pc: RTCPeerConnection, size: int) -> None:
    """Experiment (``BENCH_RCVBUF=BYTES``): a larger kernel receive buffer on the ICE
    sockets, so that a receiver busy for a few ms does not lose datagrams (aiortc's
    SCTP halves its window on every loss). Not what the node's connection does."""
    import socket

    ice = pc.sctp.transport.transport  # type: ignore[union-attr]
    for protocol in ice._connection._protocols:
        sock = protocol.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def tuned(pc: RTCPeerConnection) -> None:
    """``BENCH_LEVERS=acks,...``: the receive-path levers of :mod:`peer_transport.sctp`
    on this peer connection (the study runs of :func:`ratios` set it per variant; the
    raw baseline never does)."""
    levers = set(filter(None, os.environ.get("BENCH_LEVERS", "").split(",")))
    from peer_transport import sctp

    if "acks" in levers:
        sctp.delay_acks(pc.sctp)
    if "quick" in levers:
        sctp.quick_receive(pc.sctp)
    if "big" in levers:  # a fixed 16 KiB packet on both sides, no search (an upper bound)
        sctp.widen_dtls(pc.sctp.transport, writes=True)  # type: ignore[union-attr]
        sctp.set_packet_size(pc.sctp, sctp.RECORD_MAX)
    if "pmtu" in levers:  # the path MTU search (RFC 8899) the node's links run
        sctp.path_mtu(pc.sctp)


def _tune(pc: RTCPeerConnection, mode: str) -> None:
    size = int(os.environ.get("BENCH_RCVBUF", "0"))
    if "rcvbuf" in os.environ.get("BENCH_LEVERS", "").split(","):
        size = size or 2 << 20
    if size and (mode == "study" or os.environ.get("BENCH_RCVBUF_RAW")):
        socket_buffers(pc, size)


async def wait_open(link: ChannelLink) -> None:
    for channel in (link.control, link.bulk):
        opened = asyncio.Event()
        channel.on("open", opened.set)
        if channel.readyState != "open":
            await opened.wait()


async def offer(pc: RTCPeerConnection) -> dict[str, str]:
    await pc.setLocalDescription(await pc.createOffer())
    return {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}


async def answer(pc: RTCPeerConnection, remote: dict[str, str]) -> dict[str, str]:
    await pc.setRemoteDescription(RTCSessionDescription(**remote))
    await pc.setLocalDescription(await pc.createAnswer())
    return {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}


async def finish(pc: RTCPeerConnection, remote: dict[str, str]) -> None:
    await pc.setRemoteDescription(RTCSessionDescription(**remote))


async def pair() -> tuple[RTCPeerConnection, ChannelLink, RTCPeerConnection, ChannelLink]:
    loopback_only()
    pc_a, link_a = peer()
    pc_b, link_b = peer()
    await finish(pc_a, await answer(pc_b, await offer(pc_a)))
    async with asyncio.timeout(15):
        await asyncio.gather(wait_open(link_a), wait_open(link_b))
    return pc_a, link_a, pc_b, link_b


# -- benchmark: two processes on loopback ------------------------------------------------

RAW_BYTES = 48 << 20
RAW_MESSAGE = 60 * 1024
# Stock aiortc's association now and then stalls for good (once in ~40 raw runs here):
# that run is dropped after RAW_TIMEOUT seconds and measured again.
RAW_TIMEOUT, RAW_ATTEMPTS = 60, 3


class CountingStore:
    """Keeps only hashes, so the receiver's RSS reflects the transfer, not the data."""

    def __init__(self) -> None:
        self.hashes: set[str] = set()
        self.bytes = 0

    def has_hash(self, content_hash: str) -> bool:
        return content_hash in self.hashes

    def add_bytes(self, data: bytes, *, source: str, warm: bool = True) -> None:
        self.hashes.add(hashlib.sha256(data).hexdigest())
        self.bytes += len(data)


def _use_uvloop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


async def _child(mode: str, want: int) -> dict[str, Any]:
    """Receiver process: SDP over stdin/stdout, results as one JSON line."""
    loopback_only()
    pc, link = peer()
    remote = json.loads(await asyncio.to_thread(sys.stdin.readline))
    print(json.dumps(await answer(pc, remote)), flush=True)
    await wait_open(link)
    _tune(pc, mode)
    loop = asyncio.get_running_loop()
    result: dict[str, Any] = {}
    cpu, sys_cpu, faults = _cpu(), _usage().ru_stime, _usage().ru_minflt
    threads = _ThreadCpu()
    sampling = loop.create_task(threads.sample())
    if mode == "raw":
        done = loop.create_future()
        got = [0, 0.0]

        def on_bulk(data: bytes) -> None:
            if got[0] == 0:
                got[1] = loop.time()
            got[0] += len(data)
            if got[0] >= RAW_BYTES and not done.done():
                done.set_result(loop.time())

        link.attach(lambda _d: None, on_bulk)
        end = await done
        result["seconds"] = end - got[1]
        result["bytes"] = got[0]
        link.control.send(b"done")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            store: Any = CountingStore()
            if os.environ.get("BENCH_STORE") == "real":  # the node's store: fsync per instance
                from node.dicom.store import Store

                store = Store.open(Path(tmp) / "store", os.urandom(32))
            window = int(os.environ.get("BENCH_WINDOW", DEFAULT_WINDOW))
            streaming = asyncio.Event()  # a tenth of the study is in: ask mid-transfer

            def note(p: Progress) -> None:
                if p.instances_done * 10 >= p.instances_total:
                    streaming.set()

            kind = StudyReceiver
            levers = os.environ.get("BENCH_LEVERS", "").split(",")
            if "procdecode" in levers:
                kind = ProcessDecodeReceiver
                ProcessDecodeReceiver.start_pool()
            # verifyN: N decoding threads (verify1 is the receiver before 2 threads)
            verifiers = [int(lever[6:]) for lever in levers if lever[:6] == "verify"]
            # (a receiver of before threads were given has no such parameter)
            given: dict[str, Any] = {"threads": verifiers[-1]} if verifiers else {}
            receiver = kind(link, Path(tmp) / "spool", store, "bench", note, window=window, **given)
            for lever in levers:  # mmapK: glibc's mmap threshold at K KiB
                if lever[:4] == "nice":  # niceN: decoding threads at nice N
                    executor: Any = receiver._executor
                    executor._initializer = functools.partial(_nice, int(lever[4:]))
                if lever[:4] == "mmap":
                    import ctypes

                    ctypes.CDLL("libc.so.6").mallopt(-3, int(lever[4:]) << 10)  # M_MMAP_THRESHOLD
            link.attach(receiver.on_control, receiver.on_bulk)
            run = asyncio.create_task(receiver.run())
            await receiver._started.wait()
            trace = _trace_rss(receiver) if os.environ.get("BENCH_RSS_TRACE") else None
            start = loop.time()
            if want >= 0:
                assert receiver.protocol is not None
                await streaming.wait()  # declarations come before any chunk
                uid = receiver.protocol.wires[want].entry.sop_instance_uid
                asked = loop.time()
                await receiver.instance(uid)
                result["first_slice"] = loop.time() - asked
                result["asked_after"] = receiver.protocol.progress().instances_done
            progress = await run
            result["seconds"] = loop.time() - start
            if trace is not None:
                trace.cancel()
                print(f"rss trace: {_RSS_TRACE}", file=sys.stderr, flush=True)
            result["bytes"] = progress.bytes_done
            assert receiver.protocol is not None
            result["rerequested"] = receiver.protocol.chunks_rerequested
            result["rejected"] = receiver.protocol.chunks_rejected
    result["rss_mb"] = _peak_rss_mb()
    result["cpu"] = _cpu() - cpu  # from the channels' opening on
    result["sys_cpu"] = _usage().ru_stime - sys_cpu  # in the kernel (page faults, syscalls)
    result["faults"] = _usage().ru_minflt - faults
    sampling.cancel()
    result["threads"] = threads.totals()
    print(json.dumps(result), flush=True)
    await asyncio.sleep(0.5)
    await pc.close()
    return result


def _nice(value: int) -> None:
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), value)  # this thread only


class ProcessDecodeReceiver(StudyReceiver):
    """Experiment (``BENCH_LEVERS=procdecode``): each instance decodes in a worker
    process instead of the receiver's decode thread (whose JPEG-LS and zstd calls
    already release the GIL); the thread reads the spooled part, checks its wire digest
    and waits for the process. Exceptions come back pickled, the same checks hold."""

    pool: ProcessPoolExecutor | None = None

    @classmethod
    def start_pool(cls) -> None:
        import multiprocessing

        cls.pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        cls.pool.submit(int).result()  # the worker is up (and has imported) before timing

    @staticmethod
    def _verify(receiver: Any, index: int) -> bytes | Exception:
        from node.dicom import wirecodec
        from peer_transport.transfer.errors import RemoteTransferError
        from peer_transport.transfer.instance import decode_part
        from peer_transport.transfer.manifest import wire_digest

        assert ProcessDecodeReceiver.pool is not None
        try:
            partial = receiver._partials[index]
            chunks = [
                (*receiver._extent(index, seq), partial.verified[seq])
                for seq in range(partial.count)
            ]
            part = receiver.spool.read_part(index, chunks)
            declared = receiver.wires[index]
            if len(part) != declared.wire_size or wire_digest(part) != declared.digest:
                raise wirecodec.CorruptInstance("its wire bytes differ from the declaration")
            uid = receiver.manifest.study_instance_uid
            job = ProcessDecodeReceiver.pool.submit(
                decode_part, part, declared.entry, uid, declared.wire_size
            )
            data: bytes = job.result()
            return data
        except (wirecodec.WireCodecError, OSError, RemoteTransferError) as exc:
            return exc


class _ThreadCpu:
    """CPU seconds of each of this process's threads (Linux ``/proc/self/task``, 10 ms
    ticks), by thread name (``MainThread`` runs the event loop; a pool's threads are
    summed under its prefix, ``transfer-verify``), sampled every 50 ms so that a worker
    thread that exits before the end is counted up to its last sample."""

    def __init__(self) -> None:
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._first = self._read()
        self._last = dict(self._first)

    def _read(self) -> dict[int, tuple[str, float]]:
        names = {t.native_id: t.name for t in threading.enumerate()}
        found: dict[int, tuple[str, float]] = {}
        with contextlib.suppress(OSError):
            for task in Path("/proc/self/task").iterdir():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                    tid = int(task.name)
                    name = names.get(tid) or self._last_name(tid)
                    found[tid] = (name, (int(fields[11]) + int(fields[12])) / self._tick)
        return found

    def _last_name(self, tid: int) -> str:
        last = getattr(self, "_last", {}).get(tid)
        return "other" if last is None else last[0]

    async def sample(self) -> None:
        while True:
            self._last.update(self._read())
            await asyncio.sleep(0.05)

    def totals(self) -> dict[str, float]:
        self._last.update(self._read())
        out: dict[str, float] = {}
        for tid, (name, seconds) in self._last.items():
            group = name.rsplit("_", 1)[0] if name.rsplit("_", 1)[-1].isdigit() else name
            before = self._first.get(tid, (name, 0.0))[1]
            out[group] = out.get(group, 0.0) + seconds - before
        return out


_RSS_TRACE: list[tuple[int, int]] = []


def _trace_rss(receiver: StudyReceiver) -> asyncio.Task[None]:
    """``BENCH_RSS_TRACE=1``: the receiver's RSS (MB) against instances stored, every
    half second, printed to stderr at the end (where the peak comes from)."""

    async def sample() -> None:
        while True:
            progress = receiver.progress()
            done = 0 if progress is None else progress.instances_done
            _RSS_TRACE.append((done, _rss_mb()))
            await asyncio.sleep(0.5)

    return asyncio.get_running_loop().create_task(sample())


def _rss_mb(field: str = "VmRSS") -> int:
    """This process's ``VmRSS`` (now) or ``VmHWM`` (peak) in MB, 0 off Linux."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) // 1024
    return 0


def _peak_rss_mb() -> float:
    """The receiver process's own peak RSS.

    Not ``getrusage().ru_maxrss``: Linux carries the high-water mark of the memory a
    process had before ``execve`` into it, and a child starts as a fork of the bench,
    so ``ru_maxrss`` reports the parent's RSS at spawn when that is larger (inside
    ``make bench`` the bench process has run the other benchmarks first: the 264 and
    353 MB once reported here; 97-103 MB run alone, flat from the first instance to the
    2000th). ``VmHWM`` belongs to the memory the process has had since exec.
    """
    return float(_rss_mb("VmHWM")) or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def _parent(mode: str, study: PreparedStudy | None, want: int) -> dict[str, Any]:
    loopback_only()
    for attempt in range(RAW_ATTEMPTS if mode == "raw" else 1):
        try:
            return await _run_parent(mode, study, want, dict(os.environ))
        except TimeoutError:
            if attempt + 1 == RAW_ATTEMPTS or mode != "raw":
                raise
            print("  raw: the stock channel stalled (no progress); measured again", flush=True)
    raise AssertionError("unreachable")


async def _run_parent(
    mode: str, study: PreparedStudy | None, want: int, env: dict[str, str]
) -> dict[str, Any]:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.bench_transfer", "--child", mode, str(want),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
        cwd=env.get("BENCH_RECEIVER_TREE"),  # the receiver of another checkout (before/after)
    )  # fmt: skip
    try:
        return await _talk(child, mode, study, want)
    finally:
        if child.returncode is None:  # a stalled run: its receiver is not left behind
            child.kill()
            await child.wait()


async def _talk(
    child: asyncio.subprocess.Process, mode: str, study: PreparedStudy | None, want: int
) -> dict[str, Any]:
    assert child.stdin is not None
    assert child.stdout is not None
    cpu, drops, parent_rss = _cpu(), _udp_drops(), _rss_mb()
    pc, link = peer()
    child.stdin.write((json.dumps(await offer(pc)) + "\n").encode())
    await child.stdin.drain()
    await finish(pc, json.loads(await child.stdout.readline()))
    await wait_open(link)
    _tune(pc, mode)
    if mode == "raw":
        done = asyncio.Event()
        link.attach(lambda _d: done.set(), lambda _d: None)
        payload = os.urandom(RAW_MESSAGE)
        for _ in range(RAW_BYTES // RAW_MESSAGE + 1):
            await link.send_bulk(payload)
        await asyncio.wait_for(done.wait(), RAW_TIMEOUT)
    else:
        assert study is not None
        sender = StudySender(study, link)
        link.attach(sender.on_control, lambda _d: None)
        await asyncio.wait_for(sender.run(), 600)
    result: dict[str, Any] = json.loads(await asyncio.wait_for(child.stdout.readline(), 60))
    result["sender_cpu"] = _cpu() - cpu
    result["udp_drops"] = _udp_drops() - drops
    result["parent_rss_mb"] = parent_rss
    await child.wait()
    await pc.close()
    return result


def _udp_drops() -> int:
    """Datagrams the kernel dropped for a full socket buffer, machine-wide (Linux)."""
    try:
        lines = Path("/proc/net/snmp").read_text().splitlines()
    except OSError:
        return 0
    names, values = (line.split() for line in lines if line.startswith("Udp:"))
    return int(dict(zip(names, values, strict=True)).get("RcvbufErrors", 0))


def _usage() -> resource.struct_rusage:
    return resource.getrusage(resource.RUSAGE_SELF)


def _cpu() -> float:
    """CPU seconds of this process and its threads (not of the receiver child)."""
    usage = _usage()
    return usage.ru_utime + usage.ru_stime


def _study(files: Iterator[bytes], count: int) -> tuple[PreparedStudy, float]:
    started = time.perf_counter()

    async def prepare() -> PreparedStudy:
        study = await PreparedStudy.from_source(
            files, Identity.generate(), SenderSpool(), count=count, total=64 << 30, source=b""
        )
        await study.encode()  # all of it before the transfer: the wire path alone is timed
        return study

    study = asyncio.run(prepare())
    return study, time.perf_counter() - started


def _ct_stream(n: int, seed: int) -> Iterator[bytes]:
    """The files of ``bench_codec.ct_series`` one at a time."""
    rng = np.random.default_rng(seed)
    study, series = generate_uid(), generate_uid()
    return (bench_codec.ct_instance(rng, study, series, i) for i in range(n))


def _wire_bytes(study: PreparedStudy) -> int:
    return sum(d.wire_size for d in study.declared.values())


class _MemoryLink:
    """One end of an in-process link (no network): the first-slice figure is about the
    sender's pipeline, not the channel."""

    def __init__(self) -> None:
        self.peer: _MemoryLink | None = None
        self.callbacks: tuple[Callable[[bytes], None], Callable[[bytes], None]] | None = None
        self.bulk: asyncio.Queue[bytes] = asyncio.Queue(64)
        self.pump: asyncio.Task[None] | None = None

    async def send_control(self, data: bytes) -> None:
        assert self.peer is not None
        assert self.peer.callbacks is not None
        self.peer.callbacks[0](data)

    async def send_bulk(self, data: bytes) -> None:
        assert self.peer is not None
        await self.peer.bulk.put(data)

    def attach(self, on_control: Callable[[bytes], None], on_bulk: Callable[[bytes], None]) -> None:
        self.callbacks = (on_control, on_bulk)

        async def deliver() -> None:
            while True:
                on_bulk(await self.bulk.get())

        self.pump = asyncio.get_running_loop().create_task(deliver())

    def detach(self) -> None:
        if self.pump is not None:
            self.pump.cancel()


def first_slice_cold(slices: int = 200) -> dict[str, float]:
    """Seconds from ``send_study`` of a stored study never encoded (no wire cache) to
    the receiver holding its first instance, over an in-process link, sent as stored
    (``first``) and de-identified (``first_deid``: entries streamed, the offer waits for
    the first file only); and, measured in the same run, what the sender took before it
    could offer when the manifest carried wire sizes (``full_encode``: encoding the
    whole study) and when it carried every entry (``deid_pass``: de-identifying and
    hashing every file, what a de-identified share's offer waited for before streamed
    entries)."""
    from node.dicom import sharing
    from node.dicom.deid import PseudonymMap
    from node.dicom.store import Store
    from peer_transport.transfer.runner import receive_study, send_study

    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(Path(tmp) / "store", os.urandom(32))
        study_uid = ""
        for data in _ct_stream(slices, seed=4):
            study_uid = store.add_bytes(data, source="bench", warm=False).study_uid
        identity = Identity.generate()

        async def full_encode() -> float:
            started = time.perf_counter()
            spool = SenderSpool(Path(tmp) / "out")
            try:
                study = PreparedStudy.from_store(store, study_uid, identity, spool)
                await study.encode()
            finally:
                spool.close()
            return time.perf_counter() - started

        def deid_pass() -> float:
            from peer_transport.transfer.instance import describe_entry

            pseudonyms = PseudonymMap()
            pseudonyms.burned_in_checked = True
            prepare = sharing.deidentifier(pseudonyms, Path(tmp) / "map0", os.urandom(32))
            started = time.perf_counter()
            rows = store.instances(study_uid)
            for data in prepare(store.read_instance(r.sop_instance_uid) for r in rows):
                describe_entry(data)
            return time.perf_counter() - started

        async def streamed(deidentify: bool) -> dict[str, float]:
            prepare = None
            if deidentify:
                pseudonyms = PseudonymMap()
                pseudonyms.burned_in_checked = True  # generated CT: nothing burned in
                prepare = sharing.deidentifier(pseudonyms, Path(tmp) / "map", os.urandom(32))
            a, b = _MemoryLink(), _MemoryLink()
            a.peer, b.peer = b, a
            sink = CountingStore()
            marks: dict[str, float] = {}
            receivers: list[StudyReceiver] = []
            real_add = sink.add_bytes

            def add_bytes(data: bytes, *, source: str, warm: bool = True) -> None:
                real_add(data, source=source, warm=warm)
                marks.setdefault("first", time.perf_counter())  # series order: slice 1

            sink.add_bytes = add_bytes  # type: ignore[method-assign]
            receiving = asyncio.ensure_future(
                receive_study(b, sink, Path(tmp) / "in", peer="bench", on_receiver=receivers.append)
            )
            await asyncio.sleep(0)  # the receiver listens before the offer goes out
            started = time.perf_counter()
            await send_study(
                a,
                store,
                study_uid,
                identity,
                peer="bench",
                prepare=prepare,
                spool_dir=Path(tmp) / "out",
            )
            await receiving
            return {
                "first": marks["first"] - started,
                "whole": time.perf_counter() - started,
            }

        # The streamed run first: the page cache is as warm for both, the wire cache cold.
        result = asyncio.run(streamed(deidentify=False))
        result["full_encode"] = asyncio.run(full_encode())
        result["first_deid"] = asyncio.run(streamed(deidentify=True))["first"]
        result["deid_pass"] = deid_pass()
        store.close()
    return result


def _print_first_slice(slices: int = 200) -> None:
    got = first_slice_cold(slices)
    print(
        f"first slice after send, cold (CT {slices}x512x512, in-process link): "
        f"{got['first'] * 1000:.0f} ms (goal < 1000 ms); whole study {got['whole']:.1f} s; "
        f"before streamed offers the first byte waited for the whole encode: "
        f"{got['full_encode']:.1f} s in this run; de-identified share: first slice "
        f"{got['first_deid'] * 1000:.0f} ms (entries streamed); before streamed entries "
        f"its offer waited for every file de-identified and hashed: "
        f"{got['deid_pass']:.1f} s in this run",
        flush=True,
    )


def _node_study(study: PreparedStudy, want: int) -> dict[str, Any]:
    """A study run with the SCTP settings of the node's own links (RtcLink: delayed
    acknowledgements, the path MTU search); the raw baseline it is compared with stays
    stock aiortc."""
    os.environ["BENCH_LEVERS"] = "acks,pmtu"
    try:
        return asyncio.run(_parent("study", study, want))
    finally:
        os.environ.pop("BENCH_LEVERS", None)


def main() -> None:
    loop_name = _use_uvloop()
    _print_first_slice()

    # The machine is shared: measure the raw channel around each study and use the
    # mean of the two measurements next to it.
    def raw_rate() -> float:
        raw = asyncio.run(_parent("raw", None, -1))
        return float(raw["bytes"] / raw["seconds"])

    def sent_then_raw(study: PreparedStudy, before: float) -> tuple[dict[str, Any], float, float]:
        """``study`` sent (and closed), then the raw channel measured again: the run, the
        raw rate after it, and the mean of the raw rates around it."""
        res = _node_study(study, -1)
        study.close()
        after = raw_rate()
        print(f"raw aiortc data channel, 2 processes: {after / 1e6:.2f} MB/s")
        return res, after, (before + after) / 2

    print(f"event loop: {loop_name}")
    before = raw_rate()
    print(f"raw aiortc data channel, 2 processes: {before / 1e6:.2f} MB/s")

    ct, encode_s = _study(_ct_stream(200, seed=1), 200)
    ct_bytes = ct.total_size
    wire = _wire_bytes(ct)
    res, after, raw = sent_then_raw(ct, before)
    rate = res["bytes"] / res["seconds"]
    print(
        f"CT 200x512x512 ({ct_bytes / 1e6:.0f} MB, wire {wire / 1e6:.0f} MB, "
        f"encode+verify {encode_s:.1f} s before offering): {rate / 1e6:.2f} MB/s original "
        f"= {rate / raw:.2f}x raw (goal >= 3x); receiver peak RSS {res['rss_mb']:.0f} MB"
    )

    noise, encode_s = _study((bench_codec.random_instance(s) for s in range(60)), 60)
    res, _, raw = sent_then_raw(noise, after)
    rate = res["bytes"] / res["seconds"]
    print(
        f"incompressible 60x512x512 (encode {encode_s:.1f} s): {rate / 1e6:.2f} MB/s "
        f"= {rate / raw:.2f}x raw (goal >= 0.8x)"
    )

    big, encode_s = _study(_ct_stream(500, seed=2), 500)
    res = _node_study(big, 400)
    big.close()
    print(
        f"CT 500 slices: slice 400 asked for mid-transfer ({res['asked_after']:.0f} slices in), "
        f"verified and stored {res['first_slice'] * 1000:.0f} ms later (goal < 1000 ms); "
        f"whole study {res['seconds']:.1f} s; receiver peak RSS {res['rss_mb']:.0f} MB"
    )

    huge, encode_s = _study(_ct_stream(2000, seed=3), 2000)
    res = _node_study(huge, -1)
    huge.close()
    print(
        f"CT 2000x512x512 ({huge.total_size / 1e9:.2f} GB, wire "
        f"{_wire_bytes(huge) / 1e6:.0f} MB, encode {encode_s:.0f} s): "
        f"{res['bytes'] / res['seconds'] / 1e6:.2f} MB/s; receiver peak RSS "
        f"{res['rss_mb']:.0f} MB (goal < 300 MB; this bench's own RSS "
        f"{res['parent_rss_mb']:.0f} MB)"
    )


def ratios(slices: int, rounds: int, levers: str = "") -> None:
    """Alternate raw and study runs on one prepared CT: each study's ratio against the
    mean of the raw runs either side of it (the machine is shared: ratios, not rates).

    ``python -m bench.bench_transfer --ratio SLICES ROUNDS [VARIANTS]``: VARIANTS is
    a ``/``-separated list of lever sets (``acks`` = :func:`peer_transport.sctp.delay_acks`,
    ``quick`` = :func:`peer_transport.sctp.quick_receive`, ``pmtu`` = the path MTU
    search of :class:`peer_transport.sctp.PathMtu` (16 KiB packets on loopback),
    ``big`` = 16 KiB packets without a search, ``rcvbuf`` = a 2 MiB
    kernel receive buffer (:func:`socket_buffers`), ``procdecode`` =
    :class:`ProcessDecodeReceiver`, ``verifyN`` = a receiver decoding on N threads
    (``verify1``: one, as before; default :func:`~peer_transport.transfer.runner.verify_threads`),
    ``mmapK`` = glibc's mmap threshold at K KiB in the receiver (``mmap128``: as before;
    default :data:`~peer_transport.transfer.runner.LARGE_BLOCK`), ``niceN`` = decoding
    threads at nice N (``nice0``: as before; default
    :data:`~peer_transport.transfer.runner.DECODE_NICE`), combined with commas;
    ``stock`` = none), each run as a study variant in every round (both study
    processes, never the raw baseline); without it, ``stock`` only.
    ``BENCH_PROFILE=DIR`` writes cProfile stats of both processes of each
    study run there. ``BENCH_STORE=real`` has the
    receiver store into a real ``node.dicom.store.Store`` (sealed, fsynced) instead of
    only counting. ``BENCH_BEFORE_TREE=DIR`` adds a
    study run whose receiver is the checkout in DIR (``git archive main``, this bench
    copied in): the receiver's code before and after, in the same run, with the levers
    in ``BENCH_BEFORE_LEVERS`` (none when unset).
    """
    print(f"event loop: {_use_uvloop()}")
    ct, encode_s = _study(_ct_stream(slices, seed=1), slices)
    wire = _wire_bytes(ct)
    print(
        f"CT {slices}x512x512: {ct.total_size / 1e6:.0f} MB, "
        f"wire {wire / 1e6:.0f} MB, encode {encode_s:.1f} s"
    )

    def raw_rate() -> float:
        raw = asyncio.run(_parent("raw", None, -1))
        print(
            f"  raw: {raw['bytes'] / raw['seconds'] / 1e6:.2f} MB/s; CPU s per MB "
            f"sender {raw['sender_cpu'] / raw['bytes'] * 1e6:.3f}, "
            f"receiver {raw['cpu'] / raw['bytes'] * 1e6:.3f}; UDP drops {raw['udp_drops']:.0f}",
            flush=True,
        )
        return float(raw["bytes"] / raw["seconds"])

    before_tree = os.environ.pop("BENCH_BEFORE_TREE", None)
    before_levers = os.environ.pop("BENCH_BEFORE_LEVERS", "")

    def study(variant: str) -> dict[str, Any]:
        if variant == "before":
            os.environ["BENCH_RECEIVER_TREE"] = str(before_tree)
            os.environ["BENCH_LEVERS"] = before_levers
        elif variant != "stock":
            os.environ["BENCH_LEVERS"] = variant
        res: dict[str, Any] = _profiled(
            f"sender-{variant}", lambda: asyncio.run(_parent("study", ct, -1))
        )
        os.environ.pop("BENCH_LEVERS", None)
        os.environ.pop("BENCH_RECEIVER_TREE", None)
        print(
            f"  study ({variant}): {wire / res['seconds'] / 1e6:.2f} MB/s on the wire; CPU s "
            f"per wire MB sender {res['sender_cpu'] / wire * 1e6:.3f}, receiver "
            f"{res['cpu'] / wire * 1e6:.3f} (in the kernel {res['sys_cpu'] / wire * 1e6:.3f}, "
            f"{res['faults'] / slices:.0f} page faults per slice); "
            f"UDP drops {res['udp_drops']:.0f}; "
            f"rerequested {res['rerequested']:.0f}; receiver threads per wire MB: "
            + ", ".join(f"{name} {sec / wire * 1e6:.3f}" for name, sec in _busy(res["threads"])),
            flush=True,
        )
        return res

    variants = (["before"] if before_tree else []) + (levers or "stock").split("/")
    found: dict[str, list[float]] = {v: [] for v in variants}
    # The machine is shared and the raw rate swings between rounds: each variant's rate
    # against the first variant's in the same round, and the CPU each spends per wire
    # MB (both processes), are steadier figures for a lever than the ratio to raw.
    against: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    threads: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    before = raw_rate()
    for _ in range(rounds):
        results = {v: study(v) for v in variants}
        after = raw_rate()
        raw = (before + after) / 2
        first = results[variants[0]]
        for variant, res in results.items():
            found[variant].append(res["bytes"] / res["seconds"] / raw)
            against[variant].append(first["seconds"] / res["seconds"])
            cpu[variant].append((res["sender_cpu"] / wire * 1e6, res["cpu"] / wire * 1e6))
            threads[variant].append(res["threads"])
        print(
            f"raw {before / 1e6:.2f} / {after / 1e6:.2f} MB/s: "
            + ", ".join(f"{v} {found[v][-1]:.2f}x raw" for v in variants)
            + "; load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()),
            flush=True,
        )
        before = after
    ct.close()
    per = 1e6 / wire  # seconds per wire MB
    for variant, got in found.items():
        print(
            f"{variant}: median {statistics.median(got):.2f}x raw over {rounds} runs "
            f"(min {min(got):.2f}, max {max(got):.2f}; goal >= 3x); "
            f"{statistics.median(against[variant]):.2f}x the rate of {variants[0]} "
            f"(min {min(against[variant]):.2f}, max {max(against[variant]):.2f}); "
            f"CPU s per wire MB sender {statistics.median(c[0] for c in cpu[variant]):.3f}, "
            f"receiver {statistics.median(c[1] for c in cpu[variant]):.3f} (threads: "
            + ", ".join(
                f"{name} {statistics.median(t.get(name, 0.0) for t in threads[variant]) * per:.3f}"
                for name, _ in _busy(threads[variant][0])
            )
            + ")"
        )


def _busy(threads: dict[str, float]) -> list[tuple[str, float]]:
    """The receiver's threads that used CPU (10 ms or more), busiest first."""
    return sorted(((n, s) for n, s in threads.items() if s >= 0.01), key=lambda t: -t[1])


def _profiled(name: str, run: Callable[[], Any]) -> Any:
    where = os.environ.get("BENCH_PROFILE")
    if not where:
        return run()
    import cProfile

    profile = cProfile.Profile()
    try:
        return profile.runcall(run)
    finally:
        profile.dump_stats(Path(where) / f"{name}-{os.getpid()}.prof")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        _use_uvloop()
        mode, want = sys.argv[2], int(sys.argv[3])
        if mode == "study":
            _profiled("receiver-study", lambda: asyncio.run(_child(mode, want)))
        else:
            asyncio.run(_child(mode, want))
    elif len(sys.argv) in (4, 5) and sys.argv[1] == "--ratio":
        ratios(int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:])
    elif len(sys.argv) in (2, 3) and sys.argv[1] == "--first-slice":
        _print_first_slice(*map(int, sys.argv[2:]))
    else:
        main()
