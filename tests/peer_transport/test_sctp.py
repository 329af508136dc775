"""peer_transport.sctp: fewer SACKs, cheaper receiving, the same bytes and the same resume."""

from __future__ import annotations

import asyncio
import contextlib
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiortc
import pytest
from aiortc import rtcsctptransport as stock

from bench import bench_transfer as rtc_link
from bench.bench_codec import ct_series
from peer_transport import sctp
from peer_transport.rtc import RtcLink, RtcOptions
from tests.peer_transport.transfer_links import crash_then_resume

# -- the import-time checks -------------------------------------------------------------


def test_an_untested_aiortc_version_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aiortc, "__version__", "1.17.0")
    with pytest.raises(sctp.AiortcChanged, match=r"aiortc 1\.17\.0 is installed"):
        sctp._check_aiortc()


@pytest.mark.parametrize(
    "name",
    [
        "_send_sack",
        "_handle_data",
        "_receive_forward_tsn_chunk",
        "_receive_data_chunk",
        "_mark_received",
    ],
)
def test_a_moved_private_method_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    async def renamed(self: Any) -> None:
        return None

    monkeypatch.setattr(stock.RTCSctpTransport, name, renamed)
    with pytest.raises(sctp.AiortcChanged, match=name):
        sctp._check_aiortc()


def test_the_installed_aiortc_passes_the_checks() -> None:
    sctp._check_aiortc()


# -- delayed acknowledgements (sans network) --------------------------------------------


class FakeTransport:
    """What _DelayedAcks reads of an RTCSctpTransport; records each SACK sent."""

    State = stock.RTCSctpTransport.State

    def __init__(self) -> None:
        self._sack_misordered: set[int] = set()
        self._sack_duplicates: list[int] = []
        self._sack_needed = False
        self._association_state = self.State.ESTABLISHED
        self.sacks: list[tuple[set[int], list[int]]] = []
        self.sacked = asyncio.Event()
        self.forward_tsns = 0

    async def _send_sack(self) -> None:
        self.sacks.append((set(self._sack_misordered), list(self._sack_duplicates)))
        self._sack_duplicates.clear()
        self._sack_needed = False
        self.sacked.set()

    async def _receive_forward_tsn_chunk(self, chunk: Any) -> None:
        self.forward_tsns += 1
        self._sack_needed = True

    async def packet(self, acks: Any, *, gap: int | None = None, dup: int | None = None) -> None:
        """One received DATA packet, as _handle_data handles it."""
        self._sack_needed = True
        if gap is not None:
            self._sack_misordered.add(gap)
        if dup is not None:
            self._sack_duplicates.append(dup)
        await acks.send_sack()


async def test_every_second_packet_is_acknowledged() -> None:
    transport = FakeTransport()
    acks = sctp._DelayedAcks(transport)
    for _ in range(6):
        await transport.packet(acks)
    assert len(transport.sacks) == 3
    assert (acks.packets, acks.sent, acks.delayed) == (6, 3, 3)


async def test_a_gap_or_a_duplicate_is_acknowledged_at_once() -> None:
    transport = FakeTransport()
    acks = sctp._DelayedAcks(transport)
    await transport.packet(acks, gap=7)
    assert transport.sacks == [({7}, [])]
    transport._sack_misordered.clear()
    await transport.packet(acks)  # first of a pair: waits
    await transport.packet(acks, dup=3)  # would pair anyway; a fresh duplicate alone:
    await transport.packet(acks, dup=4)
    assert transport.sacks[1:] == [(set(), [3]), (set(), [4])]


async def test_a_forward_tsn_is_acknowledged_at_once() -> None:
    transport = FakeTransport()
    acks = sctp._DelayedAcks(transport)
    await acks.receive_forward_tsn(object())
    await acks.send_sack()  # _handle_data's call after the packet
    assert transport.forward_tsns == 1
    assert len(transport.sacks) == 1


async def test_an_odd_last_packet_is_acknowledged_by_the_timer() -> None:
    transport = FakeTransport()
    acks = sctp._DelayedAcks(transport)
    await transport.packet(acks)
    assert transport.sacks == []  # left for the next packet or the timer
    await asyncio.wait_for(transport.sacked.wait(), 5)
    assert len(transport.sacks) == 1
    assert not transport._sack_needed


# -- the reassembly shortcut yields what aiortc's does -----------------------------------


def _chunks(messages: list[bytes], stream_seq0: int, tsn0: int) -> list[Any]:
    chunks = []
    tsn = tsn0
    for seq, message in enumerate(messages, stream_seq0):
        parts = [message[i : i + 100] for i in range(0, len(message), 100)] or [b""]
        for i, part in enumerate(parts):
            chunk = stock.DataChunk()
            chunk.flags = (stock.SCTP_DATA_FIRST_FRAG if i == 0 else 0) | (
                stock.SCTP_DATA_LAST_FRAG if i == len(parts) - 1 else 0
            )
            chunk.tsn = tsn % stock.SCTP_TSN_MODULO
            chunk.stream_id = 1
            chunk.stream_seq = seq % 65536
            chunk.protocol = 53
            chunk.user_data = part
            chunks.append(chunk)
            tsn += 1
    return chunks


@pytest.mark.parametrize("seed", range(40))
def test_the_reassembly_shortcut_yields_exactly_what_aiortc_does(seed: int) -> None:
    rng = random.Random(seed)
    messages = [rng.randbytes(rng.randrange(0, 1200)) for _ in range(rng.randrange(1, 12))]
    tsn0 = rng.choice([0, 1000, stock.SCTP_TSN_MODULO - 7])  # across the TSN wrap too
    seq0 = rng.choice([0, 65530])  # across the stream sequence wrap too
    chunks = _chunks(messages, seq0, tsn0)
    for _ in range(rng.randrange(0, 6)):  # a few arrive out of order
        i, j = rng.randrange(len(chunks)), rng.randrange(len(chunks))
        chunks[i], chunks[j] = chunks[j], chunks[i]
    ours, theirs = sctp._TailStream(), stock.InboundStream()
    ours.sequence_number = theirs.sequence_number = seq0
    got: list[list[Any]] = [[], []]
    for chunk in chunks:
        for stream, out in ((ours, got[0]), (theirs, got[1])):
            stream.add_chunk(chunk)
            out.append(list(stream.pop_messages()))
    assert got[0] == got[1]
    assert [m[2] for step in got[0] for m in step] == messages


# -- real aiortc: a transfer and a resume --------------------------------------------------


async def _tuned_pair() -> tuple[Any, Any, Any, Any, list[Any]]:
    pc_a, link_a, pc_b, link_b = await rtc_link.pair()
    states = []
    for pc in (pc_a, pc_b):
        states.append(sctp.delay_acks(pc.sctp))
        sctp.quick_receive(pc.sctp)
    return pc_a, link_a, pc_b, link_b, states


async def _close(*pcs: Any) -> None:
    for pc in pcs:
        with contextlib.suppress(Exception):
            await pc.close()


@pytest.mark.webrtc
async def test_real_aiortc_with_both_levers_moves_a_study_byte_exact_and_resumes(
    tmp_path: Path,
) -> None:
    """A receiver dies halfway; a new connection (levers on again) finishes the study,
    resending at most the window; every instance's bytes arrive exactly."""
    delayed = []

    async def connect() -> Any:
        pc_a, link_a, pc_b, link_b, states = await _tuned_pair()
        delayed.append(states[1])
        return link_a, link_b, lambda: _close(pc_a, pc_b)

    await crash_then_resume(tmp_path, ct_series(8, seed=61, size=512), connect)
    assert sum(state.delayed for state in delayed) > 0  # packets left for a paired SACK


@pytest.mark.webrtc
async def test_levers_touch_only_the_connection_they_are_given() -> None:
    pc_a, _link_a, pc_b, _link_b = await rtc_link.pair()
    try:
        sctp.delay_acks(pc_a.sctp)
        sctp.quick_receive(pc_a.sctp)
        assert "_send_sack" in vars(pc_a.sctp)
        assert "_send_sack" not in vars(pc_b.sctp)  # the stock baseline stays stock
        assert "_get_inbound_stream" not in vars(pc_b.sctp)
        assert "_mark_received" not in vars(pc_b.sctp)
        assert stock.RTCSctpTransport._send_sack.__qualname__ == "RTCSctpTransport._send_sack"
    finally:
        await _close(pc_a, pc_b)


def _arrivals(rng: random.Random, start: int, count: int) -> list[int]:
    """TSNs after ``start`` (mod 2^32), some swapped and some twice: what a lossy path gives."""
    tsns = [(start + 1 + i) % stock.SCTP_TSN_MODULO for i in range(count)]
    for _ in range(rng.randrange(0, 5)):  # some out of order
        i, j = rng.randrange(len(tsns)), rng.randrange(len(tsns))
        tsns[i], tsns[j] = tsns[j], tsns[i]
    for _ in range(rng.randrange(0, 5)):  # some twice
        i = rng.randrange(len(tsns))
        tsns.insert(rng.randrange(i, len(tsns)), tsns[i])
    return tsns


def _marks(start: int) -> Any:
    return SimpleNamespace(_last_received_tsn=start, _sack_misordered=set(), _sack_duplicates=[])


@pytest.mark.parametrize("seed", range(40))
def test_the_serial_mark_ends_where_aiortc_does_away_from_the_wrap(seed: int) -> None:
    rng = random.Random(seed)
    ours, theirs = _marks(5), _marks(5)
    mark = sctp._serial_mark(ours)
    for tsn in _arrivals(rng, 5, 60):
        assert mark(tsn) == stock.RTCSctpTransport._mark_received(theirs, tsn)
        assert vars(ours) == vars(theirs)
    assert ours._last_received_tsn == 5 + 60


@pytest.mark.parametrize("seed", range(20))
def test_the_serial_mark_advances_across_the_tsn_wrap(seed: int) -> None:
    rng = random.Random(seed)
    start = stock.SCTP_TSN_MODULO - 20
    ours = _marks(start)
    mark = sctp._serial_mark(ours)
    tsns = _arrivals(rng, start, 60)
    seen: set[int] = set()
    for tsn in tsns:
        assert mark(tsn) == (tsn in seen)  # a duplicate is told as one, nothing else
        seen.add(tsn)
    assert ours._last_received_tsn == 40  # 19 before the wrap, then 0..40
    assert ours._sack_misordered == set()


def test_aiortc_itself_stalls_at_the_wrap_where_the_serial_mark_does_not() -> None:
    """The bug the serial mark fixes: TSNs 0 and 1 arrive before 2^32-1 (a reordering
    across the wrap); aiortc's cumulative TSN never moves past 2^32-2 again."""
    top = stock.SCTP_TSN_MODULO - 1
    theirs, ours = _marks(top - 1), _marks(top - 1)
    mark = sctp._serial_mark(ours)
    for tsn in (0, 1, top, 2):
        stock.RTCSctpTransport._mark_received(theirs, tsn)
        mark(tsn)
    assert theirs._last_received_tsn == top - 1
    assert ours._last_received_tsn == 2


@pytest.mark.webrtc
async def test_an_rtc_link_acknowledges_every_second_packet_and_delivers_every_byte() -> None:
    got: list[bytes] = []
    done = asyncio.Event()
    sent = [random.Random(7).randbytes(60 * 1024) for _ in range(20)]

    def on_message(channel: str, data: bytes) -> None:
        if channel == "bulk":
            got.append(data)
            if len(got) == len(sent):
                done.set()

    a = RtcLink(RtcOptions(), lambda _c, _d: None, lambda _r: None)
    b = RtcLink(RtcOptions(), on_message, lambda _r: None)
    try:
        await a.accept_answer(await b.accept_offer(await a.create_offer()))
        await asyncio.gather(a.wait_open(15), b.wait_open(15))
        for data in sent:
            a.send("bulk", data)
        await asyncio.wait_for(done.wait(), 60)
    finally:
        await a.close()
        await b.close()
    assert got == sent
    acks = sctp.delay_acks(b._pc.sctp)  # the state RtcLink installed (not a second one)
    assert acks.delayed > 0
    assert acks.sent < acks.packets  # some packets shared a SACK (a gap gets its own)
