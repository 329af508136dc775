"""One live-session participant in its own process, driven by bench_live over JSON lines.

``python -m bench.live_peer ROOT NAME`` starts a real NodeRuntime under
``ROOT/NAME`` (127.0.0.1, no mDNS, no ICE servers), prints its signed node
record, then answers one JSON line on stdout for each command line on stdin:

- ``trust``: remember and verify the given node records (every other participant);
- ``mesh``: wait until the session holds ``size`` participants;
- ``watch``: from now on, stamp with ``time.monotonic()`` (CLOCK_MONOTONIC, the
  same clock in every process of the host) the first time each cursor position
  of the ``mover`` is seen (its x is the move number) and each raw ``RAW<n>``
  presence message arrives; count bulk bytes from the mover;
- ``report``: those stamps, and stop watching;
- ``annotations``: wait until the session holds ``count`` annotations, answer the stamp;
- ``stop`` (or stdin closed): stop the node and exit.

Errors are answered as ``{"error": ...}``; logs go to stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from consult.live import LiveConsult
from crypto.identity import Identity, NodeId
from node.app.runtime import NodeRuntime
from node.core.config import NetworkConfig, NodeConfig, NodeHome
from node.core.keystore import save_identity
from peer_transport.connection import (
    PeerConnection,
    TransportOptions,
    install_event_loop_policy,
)
from peer_transport.rtc import RtcOptions, restrict_host_addresses
from registry.records import NodeRecord

CONSULT = "bench0000bench0000bench0000bench"
# Bulk chunks ahead of presence in SCTP's one send queue bound the cursor's delay under a
# transfer; the transport keeps live_bulk_window while presence flows on a connection.
# BENCH_LIVE_BULK_WINDOW tries other windows (the transport's default otherwise).
BULK_WINDOW = int(os.environ.get("BENCH_LIVE_BULK_WINDOW", TransportOptions.live_bulk_window))
OPTIONS = TransportOptions(
    rtc=RtcOptions(ice_servers=()), connect_timeout=15.0, live_bulk_window=BULK_WINDOW
)
RAW = b"RAW"
Reply = dict[str, Any]


async def start(root: Path, name: str) -> NodeRuntime:
    """A real node on 127.0.0.1, no mDNS, no registry, no ICE servers."""
    restrict_host_addresses(["127.0.0.1"])
    home = NodeHome(root / name)
    identity = Identity.generate()
    save_identity(home.key_path, identity, None)
    network = NetworkConfig(mdns=False, listen_host="127.0.0.1")
    home.save_config(NodeConfig(display_name=name, network=network))
    runtime = NodeRuntime(home, identity, transport_options=OPTIONS)
    await runtime.start()
    return runtime


def trust(runtime: NodeRuntime, records: list[str]) -> None:
    """Know and verify these peers, as after comparing safety numbers."""
    for wire in records:
        record = NodeRecord.from_wire(bytes.fromhex(wire))
        if record.public_key != runtime.identity.public_key:
            runtime.directory.remember(record, "bench", runtime.now())
            runtime.trust.mark_verified(record.node_id, runtime.now())


def introduce(nodes: list[NodeRuntime]) -> None:
    """Nodes of one process know and verify each other (bench_tui runs two that way)."""
    records = [n.record.to_wire().hex() for n in nodes if n.record is not None]
    for node in nodes:
        trust(node, records)


async def until(check: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {within:.0f} s")
        await asyncio.sleep(0.005)


class Watch:
    """Receive stamps of one measurement phase on a watcher."""

    def __init__(self, live: LiveConsult, mover: bytes, conn: PeerConnection) -> None:
        self.live, self.conn = live, conn
        self.mover = str(NodeId.from_public_key(mover))
        self.cursor: dict[int, float] = {}
        self.raw: dict[int, float] = {}
        self.bulk = 0
        self.hub_presence = conn._receivers["presence"]
        conn.set_receiver("presence", self.on_presence)
        conn.set_receiver("bulk", self.on_bulk)
        self.unsubscribe = live.subscribe(self.on_change)

    def on_change(self) -> None:
        now = time.monotonic()
        for p in self.live.participants():
            if p.node == self.mover and p.cursor is not None:
                self.cursor.setdefault(int(p.cursor.x), now)

    def on_presence(self, data: bytes) -> None:
        if data.startswith(RAW):  # the baseline: never handed to the session
            self.raw.setdefault(int(data[len(RAW) :]), time.monotonic())
        else:
            self.hub_presence(data)

    def on_bulk(self, data: bytes) -> None:
        self.bulk += len(data)

    def close(self) -> Reply:
        self.unsubscribe()
        self.conn.set_receiver("presence", self.hub_presence)  # bulk may still be arriving
        return {"cursor": self.cursor, "raw": self.raw, "bulk_bytes": self.bulk}


class Peer:
    def __init__(self, runtime: NodeRuntime) -> None:
        self.runtime = runtime
        self.watch: Watch | None = None

    def session(self) -> LiveConsult:
        return self.runtime.live_hub().sessions[CONSULT]

    async def handle(self, cmd: dict[str, Any]) -> Reply:
        match cmd["cmd"]:
            case "trust":
                trust(self.runtime, cmd["records"])
            case "mesh":
                sessions = self.runtime.live_hub().sessions
                await until(
                    lambda: (
                        CONSULT in sessions and len(sessions[CONSULT].participants()) >= cmd["size"]
                    ),
                    30,
                    f"the session does not show {cmd['size']} participants",
                )
            case "watch":
                mover = bytes.fromhex(cmd["mover"])
                conn = self.runtime.transport.connection(mover)
                if conn is None:
                    raise RuntimeError("no connection to the mover")
                self.watch = Watch(self.session(), mover, conn)
            case "report":
                if self.watch is None:
                    raise RuntimeError("report without watch")
                reply, self.watch = self.watch.close(), None
                return reply
            case "annotations":
                return {"at": await self.annotations(cmd["count"])}
            case "stop":
                pass
            case other:
                raise ValueError(f"unknown command {other!r}")
        return {"ok": True}

    async def annotations(self, count: int) -> float:
        """The stamp at which the session first holds ``count`` annotations."""
        sessions = self.runtime.live_hub().sessions
        await until(lambda: CONSULT in sessions, 30, "never joined the session")
        live = sessions[CONSULT]
        done: asyncio.Future[float] = asyncio.get_running_loop().create_future()

        def check() -> None:
            # The map's size, not annotations(): that parses them all, and running it on
            # each of a thousand updates (one per annotation added) starves the loop.
            if not done.done() and len(live.state._annotations) >= count:
                done.set_result(time.monotonic())

        unsubscribe = live.subscribe(check)
        try:
            check()
            at = await asyncio.wait_for(done, 30)
        finally:
            unsubscribe()
        if len(live.annotations()) < count:
            raise RuntimeError(f"{count} entries arrived but not {count} valid annotations")
        return at


def say(reply: Reply) -> None:
    print(json.dumps(reply), flush=True)


async def serve(root: Path, name: str) -> None:
    runtime = await start(root, name)
    try:
        assert runtime.record is not None
        say({"record": runtime.record.to_wire().hex()})
        peer = Peer(runtime)
        while line := await asyncio.to_thread(sys.stdin.readline):
            cmd = json.loads(line)
            try:
                reply = await peer.handle(cmd)
            except Exception as exc:
                reply = {"error": f"{name}: {exc!r}"}
            say(reply)
            if cmd["cmd"] == "stop":
                break
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(runtime.stop(), 10)


def main(argv: list[str]) -> None:
    install_event_loop_policy()  # as the radmesh console script does
    asyncio.run(serve(Path(argv[0]), argv[1]))


if __name__ == "__main__":
    main(sys.argv[1:])
