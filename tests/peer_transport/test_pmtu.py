"""Path MTU discovery (peer_transport.pmtu, peer_transport.sctp.PathMtu): the search's
decisions, then real aiortc on 127.0.0.1 with larger packets, a stock aiortc peer, a
path that drops large datagrams and a black hole that opens mid-transfer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiortc import rtcdtlstransport as stock_dtls
from aiortc import rtcsctptransport as stock

from bench import bench_transfer as rtc_link
from bench.bench_codec import ct_series
from peer_transport import pmtu, sctp
from peer_transport.pmtu import MAX_PROBES, PmtuError, PmtuSearch, State
from tests.peer_transport.pmtu_links import bulk as _bulk
from tests.peer_transport.pmtu_links import random_messages as _messages
from tests.peer_transport.pmtu_links import settled as _settled
from tests.peer_transport.pmtu_links import until as _until
from tests.peer_transport.transfer_links import crash_then_resume

BASE = sctp.BASE_PACKET
SIZES = pmtu.PROBE_SIZES
GCM = 37  # DTLS 1.2 AES-GCM record overhead: 13 header + 8 explicit nonce + 16 tag

# -- the search, sans network (table-driven) ----------------------------------------------

# Each case: events in order, then (size, state, probes sent) after them.
# "ready" = the peer announced; "ack" = the probe in flight was confirmed;
# "lost" = its timer expired; "timer" = the raise timer expired; "hole" = black hole.
CASES: list[tuple[str, list[str], int, State, list[int]]] = [
    ("stock peer: never probed", [], BASE, State.DISABLED, []),
    ("all confirmed", ["ready", "ack", "ack", "ack", "ack"], 16384, State.DONE, list(SIZES)),
    (
        "a 1,500-byte path: 4000 lost three times",
        ["ready", "ack", "lost", "lost", "lost"],
        1384,
        State.DONE,
        [1384, 4000, 4000, 4000],
    ),
    (
        "a lost probe, then confirmed on the retry",
        ["ready", "lost", "ack"],
        1384,
        State.SEARCHING,
        [1384, 1384, 4000],
    ),
    (
        "nothing above the base: stays there",
        ["ready", "lost", "lost", "lost"],
        BASE,
        State.DONE,
        [1384, 1384, 1384],
    ),
    (
        "black hole: back to the base, then a later search finds the path again",
        ["ready", "ack", "ack", "ack", "ack", "hole", "timer", "ack"],
        1384,
        State.SEARCHING,
        [*SIZES, 1384, 4000],
    ),
    (
        "black hole while probing: the probe's late ack is ignored",
        ["ready", "ack", "hole", "ack"],
        BASE,
        State.DONE,
        [1384, 4000],
    ),
    ("the peer's announcement repeated", ["ready", "ready"], BASE, State.SEARCHING, [1384]),
]


def _run(events: list[str]) -> tuple[PmtuSearch, list[int]]:
    search = PmtuSearch(BASE)
    probes: list[int] = []
    step = None
    for event in events:
        if event == "ready":
            step = search.peer_ready()
        elif event == "ack":
            assert step is not None
            step = search.acked(search.probing or 0)
        elif event in ("lost", "timer"):
            step = search.timer()
        elif event == "hole":
            step = search.black_hole()
        assert step is not None
        if step.probe is not None:
            probes.append(step.probe)
        assert step.size == search.size
    return search, probes


@pytest.mark.parametrize(("name", "events", "size", "state", "probes"), CASES)
def test_the_search_decides_sizes_and_probes(
    name: str, events: list[str], size: int, state: State, probes: list[int]
) -> None:
    search, sent = _run(events)
    assert (search.size, search.state, sent) == (size, state, probes)


def test_a_size_is_used_only_once_its_own_probe_is_confirmed() -> None:
    search = PmtuSearch(BASE)
    search.peer_ready()
    assert search.acked(16384).size == BASE  # not the size being probed: ignored
    assert search.acked(1384).size == 1384
    assert search.attempts == 1
    assert search.probing == 4000


def test_each_size_gets_max_probes_then_the_raise_timer() -> None:
    search = PmtuSearch(BASE)
    search.peer_ready()
    steps = [search.timer() for _ in range(MAX_PROBES)]
    assert [s.probe for s in steps] == [1384] * (MAX_PROBES - 1) + [None]
    assert steps[-1].timer == pmtu.RAISE_AFTER


def test_an_event_out_of_place_is_refused_by_the_table() -> None:
    with pytest.raises(PmtuError, match="search complete"):
        pmtu._TABLE.fire(State.DONE, pmtu.Event.CONFIRMED_MORE)
    with pytest.raises(ValueError, match="must rise"):
        PmtuSearch(BASE, (4000, 1384))


# -- the probe packet and the import-time checks ------------------------------------------


def test_a_probe_is_one_heartbeat_and_a_pad_chunk_of_exactly_the_size() -> None:
    transport: Any = type("T", (), {})()
    transport._local_port, transport._remote_port, transport._remote_verification_tag = (
        5000,
        5000,
        0x1234,
    )
    packet = sctp.probe_packet(transport, 4000, b"info")
    assert len(packet) == 4000
    _, _, tag, chunks = stock.parse_packet(packet)  # checksum verified; PAD skipped
    assert tag == 0x1234
    assert [type(c) for c in chunks] == [stock.HeartbeatChunk]
    heartbeat: Any = chunks[0]
    assert heartbeat.params == [(sctp.HEARTBEAT_INFO, b"info")]
    assert packet[12 + len(bytes(chunks[0]))] == sctp.PAD_CHUNK


@pytest.mark.parametrize(
    ("owner", "name"),
    [(stock_dtls.RTCDtlsTransport, "_recv_next"), (stock_dtls.RTCDtlsTransport, "_write_ssl")],
)
def test_a_dtls_read_size_that_moved_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, owner: Any, name: str
) -> None:
    async def other(self: Any) -> None:
        self._ssl.recv(2048)
        self._ssl.bio_read(2048)

    monkeypatch.setattr(owner, name, other)
    with pytest.raises(sctp.AiortcChanged, match=name):
        sctp._check_sizing()


def test_a_fragment_size_no_longer_read_from_the_constant_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def send(self: Any, *args: Any) -> None:
        return None

    monkeypatch.setattr(stock.RTCSctpTransport, "_send", send)
    with pytest.raises(sctp.AiortcChanged, match="USERDATA_MAX_LENGTH"):
        sctp._check_sizing()


# -- real aiortc on 127.0.0.1 ---------------------------------------------------------------


class NarrowPath:
    """One direction of a path with an MTU: a UDP payload over ``mtu`` bytes is dropped
    when the socket sets DF (as a router does), and let through when it does not (the
    router fragments it). Records every datagram's size."""

    def __init__(self, pc: Any, mtu: int | None = None) -> None:
        self.pc, self.mtu = pc, mtu
        ice = pc.sctp.transport.transport
        self._inner: Callable[[bytes], Awaitable[None]] = ice._send
        ice._send = self.send
        self.sizes: list[int] = []
        self.dropped: list[int] = []
        self.fragmented: list[int] = []

    def dont_fragment(self) -> bool:
        for sock in sctp._sockets(self.pc.sctp):
            if sock.family == socket.AF_INET and sock.getsockopt(socket.IPPROTO_IP, 10) == 0:
                return False  # IP_PMTUDISC_DONT
        return True

    async def send(self, data: bytes) -> None:
        if self.mtu is not None and len(data) > self.mtu:
            if self.dont_fragment():
                self.dropped.append(len(data))
                return
            self.fragmented.append(len(data))
        self.sizes.append(len(data))
        await self._inner(data)


async def _pair(
    *, pmtu_a: bool = True, pmtu_b: bool = True, mtu: int | None = None
) -> tuple[Any, Any, Any, Any, list[sctp.PathMtu | None], list[NarrowPath]]:
    rtc_link.loopback_only()
    pc_a, link_a = rtc_link.peer()
    pc_b, link_b = rtc_link.peer()
    searches = [
        sctp.path_mtu(pc.sctp) if on else None for pc, on in ((pc_a, pmtu_a), (pc_b, pmtu_b))
    ]
    paths = [NarrowPath(pc_a, mtu), NarrowPath(pc_b, mtu)]
    await rtc_link.finish(pc_a, await rtc_link.answer(pc_b, await rtc_link.offer(pc_a)))
    async with asyncio.timeout(15):
        await asyncio.gather(rtc_link.wait_open(link_a), rtc_link.wait_open(link_b))
    return pc_a, link_a, pc_b, link_b, searches, paths


async def _close(*pcs: Any) -> None:
    for pc in pcs:
        with contextlib.suppress(Exception):
            await pc.close()


@pytest.mark.webrtc
async def test_on_loopback_both_sides_confirm_a_whole_record_and_data_uses_it() -> None:
    pc_a, link_a, pc_b, link_b, (a, b), (path_a, _path_b) = await _pair()
    try:
        assert a is not None
        assert b is not None
        await _settled(a, State.DONE)
        await _settled(b, State.DONE)
        assert (a.size, b.size) == (16384, 16384)
        assert a.probes == list(SIZES)
        assert a.peer_ready
        assert a.heard
        path_a.sizes.clear()
        messages = _messages(40, seed=3)
        assert await _bulk(link_a, link_b, messages) == messages
        assert max(path_a.sizes) == 16384 + GCM  # full-size DATA packets went out
        assert len(path_a.sizes) < sum(map(len, messages)) / 4000  # not 1,200-byte ones
        # another connection in the same process (a bench's raw baseline) stays stock
        pc_c, link_c, pc_d, link_d, _, (path_c, _path_d) = await _pair(pmtu_a=False, pmtu_b=False)
        try:
            assert await _bulk(link_c, link_d, messages[:10]) == messages[:10]
            assert max(path_c.sizes) == BASE - 1 + GCM  # aiortc's 1,188-byte DATA packets
            assert "_send" not in vars(pc_c.sctp)
        finally:
            await _close(pc_c, pc_d)
    finally:
        await _close(pc_a, pc_b)


@pytest.mark.webrtc
@pytest.mark.parametrize("stock_side", ["offerer", "answerer"])
async def test_a_stock_aiortc_peer_is_never_probed_and_gets_every_byte(stock_side: str) -> None:
    ours_first = stock_side == "answerer"
    pc_a, link_a, pc_b, link_b, searches, paths = await _pair(
        pmtu_a=ours_first, pmtu_b=not ours_first
    )
    ours = searches[0] if ours_first else searches[1]
    our_path = paths[0] if ours_first else paths[1]
    assert ours is not None
    try:
        await _until(ours, lambda: ours.heard)  # the stock peer echoed our announcement:
        # it got it, skipped its PAD chunk and went on
        messages = _messages(20, seed=5)
        assert await _bulk(link_a, link_b, messages) == messages
        assert await _bulk(link_b, link_a, messages) == messages  # both directions
        assert not ours.peer_ready
        assert ours.probes == []
        assert ours.size == BASE
        assert max(our_path.sizes) <= BASE + GCM  # nothing larger ever reached it
    finally:
        await _close(pc_a, pc_b)


@pytest.mark.webrtc
async def test_a_path_dropping_large_datagrams_is_found_and_never_exceeded() -> None:
    mtu = 4000 + GCM + 20  # UDP payload: 4000-byte packets pass, 8876-byte ones do not
    pc_a, link_a, pc_b, link_b, (a, _b), (path_a, _path_b) = await _pair(mtu=mtu)
    try:
        assert a is not None
        await _settled(a, State.DONE)
        assert a.size == 4000
        assert a.probes == [1384, 4000] + [8876] * MAX_PROBES
        messages = _messages(30, seed=9)
        assert await _bulk(link_a, link_b, messages) == messages
        assert path_a.dropped == [8876 + GCM] * MAX_PROBES  # the probes only, never data
        assert max(path_a.sizes) == 4000 + GCM
        assert a.search.black_holes == 0
    finally:
        await _close(pc_a, pc_b)


@pytest.mark.webrtc
async def test_a_black_hole_mid_transfer_falls_back_and_the_transfer_completes() -> None:
    pc_a, link_a, pc_b, link_b, (a, _b), (path_a, _path_b) = await _pair()
    try:
        assert a is not None
        await _settled(a, State.DONE)
        assert a.size == 16384
        messages = _messages(60, seed=11)

        def shrink() -> None:
            path_a.mtu = 1500  # the path shrinks under a transfer in full flight

        got = await _bulk(link_a, link_b, messages, at=(10, shrink))
        assert got == messages
        assert a.search.black_holes == 1
        assert a.size == BASE
        assert path_a.dropped  # large packets were lost ...
        assert path_a.fragmented  # ... and went out again fragmented (DF cleared)
        fresh = _messages(5, seed=12)  # new data: base-sized packets only
        path_a.fragmented.clear()
        assert await _bulk(link_a, link_b, fresh) == fresh
        assert path_a.fragmented == []
    finally:
        await _close(pc_a, pc_b)


@pytest.mark.webrtc
async def test_a_study_moves_byte_exact_over_large_packets_and_resumes(tmp_path: Path) -> None:
    """A receiver dies halfway; a new connection (searching again) finishes the study."""
    paths = []

    async def connect() -> Any:
        pc_a, link_a, pc_b, link_b, (a, _b), (path_a, _) = await _pair()
        assert a is not None
        await _settled(a, State.DONE)
        paths.append(path_a)
        return link_a, link_b, lambda: _close(pc_a, pc_b)

    await crash_then_resume(tmp_path, ct_series(8, seed=63, size=512), connect)
    assert [max(path.sizes) for path in paths] == [16384 + GCM] * 2


# -- the kernel's own MTU: lo inside a network namespace ------------------------------------

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def _namespace(mtu: int) -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("ip not found: install the Debian package iproute2")
    name = f"rm-pmtu-{uuid.uuid4().hex[:6]}"
    try:
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=10)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot create a network namespace here: {exc.stderr.decode()}")
    try:
        subprocess.run(
            ["ip", "-n", name, "link", "set", "lo", "up", "mtu", str(mtu)],
            check=True,
            capture_output=True,
            timeout=10,
        )
        yield name
    finally:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            subprocess.run(["ip", "netns", "del", name], check=True, timeout=10)


def _in_namespace(name: str, mode: str) -> dict[str, Any]:
    run = subprocess.run(
        ["ip", "netns", "exec", name, sys.executable, "-m", f"{__package__}.pmtu_netns_peer", mode],
        cwd=ROOT,
        capture_output=True,
        timeout=80,
        check=False,
    )
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    result: dict[str, Any] = json.loads(run.stdout.decode().splitlines()[-1])
    return result


@pytest.mark.system
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_1500_byte_link_confirms_1384_and_never_sends_more() -> None:
    with _namespace(1500) as name:
        got = _in_namespace(name, "static")
    assert got["confirmed"] == 1384  # 4000-byte probes: DF set, the kernel refused them
    assert got["probes"] == [1384] + [4000] * MAX_PROBES
    assert got["exact"]
    assert got["largest"] == 1384 + GCM
    assert got["over_mtu"] == 0


@pytest.mark.system
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_link_shrinking_mid_transfer_falls_back_and_completes() -> None:
    with _namespace(65536) as name:
        got = _in_namespace(name, "shrink")
    assert got["confirmed"] == 16384
    assert got["largest_before"] == 16384 + GCM
    assert got["black_holes"] == 1
    assert got["size"] == BASE
    assert got["exact"]
    assert got["over_mtu"] > 0  # the packets already sent at 16 KiB, resent fragmented
