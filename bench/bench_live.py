"""Live consultation: cursor latency between 3 participants, and a late joiner's wait.

Three real NodeRuntimes in this process (one event loop, like the TUI), real
aiortc on 127.0.0.1, a full mesh. One participant moves its cursor 20 times a
second; latency is from ``move_cursor`` to the moment the others' presence
shows the new position. Measured idle, then while a bulk stream saturates the
mover's connection to one of the others (``send_bulk`` in a loop, as a study
transfer would). Baseline, same run and conditions: raw bytes on the presence
channel of the same connection (no awareness encoding, no envelope checks).
Goal (issue 7): cursor p99 under 50 ms. Also: how long a late joiner waits for
a session holding 1,000 annotations.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from consult.presence import Cursor
from consult.shared import AnnotationKind
from crypto.identity import Identity
from node.config import NetworkConfig, NodeConfig, NodeHome
from node.keystore import save_identity
from node.runtime import NodeRuntime
from peer_transport.connection import PeerConnection, TransportOptions
from peer_transport.frames import MAX_BULK_PAYLOAD
from peer_transport.rtc import RtcOptions, restrict_host_addresses

MOVES = 150
RATE_HZ = 20
CONSULT = "bench0000bench0000bench0000bench"
OPTIONS = TransportOptions(rtc=RtcOptions(ice_servers=()), connect_timeout=15.0)


async def start(root: Path, name: str) -> NodeRuntime:
    home = NodeHome(root / name)
    identity = Identity.generate()
    save_identity(home.key_path, identity, None)
    network = NetworkConfig(mdns=False, listen_host="127.0.0.1")
    home.save_config(NodeConfig(display_name=name, network=network))
    runtime = NodeRuntime(home, identity, transport_options=OPTIONS)
    await runtime.start()
    return runtime


def introduce(nodes: list[NodeRuntime]) -> None:
    for a in nodes:
        for b in nodes:
            if a is not b and b.record is not None:
                a.directory.remember(b.record, "bench", a.now())
                a.trust.mark_verified(b.identity.node_id, a.now())


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def cursor_latencies(nodes: list[NodeRuntime]) -> list[float]:
    a, b, c = nodes
    mover = a.live_hub().sessions[CONSULT]
    watchers = [n.live_hub().sessions[CONSULT] for n in (b, c)]
    me = str(a.identity.node_id)
    sent: dict[int, float] = {}
    seen: list[float] = []
    done: set[tuple[int, int]] = set()

    def watch(index: int) -> None:
        for p in watchers[index].participants():
            if p.node == me and p.cursor is not None:
                move = int(p.cursor.x)
                if move in sent and (index, move) not in done:
                    done.add((index, move))
                    seen.append(time.perf_counter() - sent[move])

    def watcher(index: int) -> Callable[[], None]:
        return lambda: watch(index)

    unsubscribe = [w.subscribe(watcher(i)) for i, w in enumerate(watchers)]
    for move in range(MOVES):
        sent[move] = time.perf_counter()
        mover.move_cursor(Cursor("2.25.1", 0, float(move), 10.0))
        await asyncio.sleep(1 / RATE_HZ)
    await asyncio.sleep(0.5)
    for u in unsubscribe:
        u()
    lost = 2 * MOVES - len(seen)
    if lost:
        print(f"    ({lost} of {2 * MOVES} cursor updates not seen: presence is lossy)")
    return seen


async def raw_presence_latencies(conn_out: PeerConnection, conn_in: PeerConnection) -> list[float]:
    sent: dict[int, float] = {}
    seen: list[float] = []

    def receive(data: bytes) -> None:
        if data[:3] == b"RAW":
            seen.append(time.perf_counter() - sent[int(data[3:])])

    conn_in.set_receiver("presence", receive)
    for move in range(MOVES):
        sent[move] = time.perf_counter()
        conn_out.send_presence(b"RAW%d" % move)
        await asyncio.sleep(1 / RATE_HZ)
    await asyncio.sleep(0.5)
    return seen


async def saturate(conn: PeerConnection, stop: asyncio.Event, counter: list[int]) -> None:
    chunk = bytes(MAX_BULK_PAYLOAD)
    while not stop.is_set():
        await conn.send_bulk(chunk)
        counter[0] += len(chunk)


def report(label: str, live: list[float], raw: list[float]) -> None:
    lp50, lp99 = pct(live, 0.5) * 1000, pct(live, 0.99) * 1000
    rp50, rp99 = pct(raw, 0.5) * 1000, pct(raw, 0.99) * 1000
    verdict = "meets" if lp99 < 50 else "MISSES"
    print(
        f"  {label:<28} cursor p50 {lp50:6.1f} ms  p99 {lp99:6.1f} ms  ({verdict} p99 < 50 ms) | "
        f"raw presence p50 {rp50:5.1f} p99 {rp99:5.1f} ms | "
        f"live/raw p50 x{lp50 / max(rp50, 1e-3):.1f}"
    )


async def run(root: Path) -> None:
    restrict_host_addresses(["127.0.0.1"])
    nodes = [await start(root, name) for name in ("ana", "ben", "cai")]
    try:
        introduce(nodes)
        a, b, c = nodes
        a.live_hub().open(CONSULT)
        for other in (b, c):
            await a.live_hub().invite(CONSULT, other.identity.public_key)
        sessions = [n.live_hub().sessions[CONSULT] for n in nodes]
        deadline = time.monotonic() + 15
        while not all(len(s.participants()) == 3 for s in sessions):
            assert time.monotonic() < deadline, "mesh did not form"
            await asyncio.sleep(0.05)
        a_to_b = a.transport.connection(b.identity.public_key)
        b_from_a = b.transport.connection(a.identity.public_key)
        assert a_to_b is not None
        assert b_from_a is not None
        print(f"  3 participants, cursor moves at {RATE_HZ} Hz, {MOVES} moves per condition")

        live = await cursor_latencies(nodes)
        hub_receiver = b_from_a._receivers["presence"]
        raw = await raw_presence_latencies(a_to_b, b_from_a)
        b_from_a.set_receiver("presence", hub_receiver)
        report("idle", live, raw)

        b_from_a.set_receiver("bulk", lambda _data: None)
        stop, sent = asyncio.Event(), [0]
        pump = asyncio.ensure_future(saturate(a_to_b, stop, sent))
        await asyncio.sleep(1.0)
        started, before = time.perf_counter(), sent[0]
        live = await cursor_latencies(nodes)
        raw = await raw_presence_latencies(a_to_b, b_from_a)
        b_from_a.set_receiver("presence", hub_receiver)
        rate = (sent[0] - before) / (time.perf_counter() - started) / 1e6
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pump, 5)
        report(f"bulk {rate:.1f} MB/s on a->b", live, raw)

        # A late joiner: a fourth node, invited into a session with 1,000 annotations.
        d = await start(root, "dee")
        nodes.append(d)
        introduce(nodes)
        for i in range(1000):
            sessions[0].add_annotation(
                AnnotationKind.ARROW, "2.25.1", i % 50, ((i, i), (i + 4, i + 9)), text=f"f{i}"
            )
        size = len(sessions[0].state.full_update())
        started = time.perf_counter()
        await a.live_hub().invite(CONSULT, d.identity.public_key)
        joined = d.live_hub().sessions[CONSULT]
        deadline = time.monotonic() + 30
        while len(joined.annotations()) < 1000:
            assert time.monotonic() < deadline, "late joiner never caught up"
            await asyncio.sleep(0.01)
        took = time.perf_counter() - started
        print(
            f"  late joiner, 1,000 annotations ({size / 1024:.0f} KiB state): "
            f"{took * 1000:.0f} ms from invite to full state (incl. its connection setup)"
        )
    finally:
        for node in nodes:
            await node.stop()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(Path(tmp)))


if __name__ == "__main__":
    main()
