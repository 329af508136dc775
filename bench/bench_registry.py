"""Registry: lookups/s over 10,000 records, 1,000 signaling sockets, relay latency, RSS.

Run: ``python -m bench registry``. The registry runs in its own process (one
core), the clients in this one (the other core), talking over 127.0.0.1.
Baseline: raw SQLite primary-key lookups on the same database in this run.
"""

from __future__ import annotations

import asyncio
import os
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from crypto.identity import Identity
from registry.client import RegistryClient, RegistryConnection
from registry.records import NodeRecord
from registry.store import RegistryDB

RECORDS = 10_000
LOOKUPS = 5_000
SOCKETS = 1_000
RELAY_RATE = 500  # messages per second
RELAY_SECONDS = 4
ROOT = Path(__file__).resolve().parents[1]

SERVE = """
import asyncio, sys
from registry.server import Limits, RegistryServer, run_forever
# One client process opens every socket from 127.0.0.1: lift the per-address caps.
big = Limits(address_rate=1e9, address_burst=1e9, send_rate=1e9, send_burst=1e9,
             publish_rate=1e9, publish_burst=1e9, max_connections=100_000,
             address_sockets=100_000, connect_rate=1e9, connect_burst=1e9)
asyncio.run(run_forever(RegistryServer(sys.argv[1], limits=big), "127.0.0.1", 0))
"""


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _fill(db_path: Path) -> list[str]:
    db = RegistryDB(db_path)
    now = int(time.time())
    ids = []
    for i in range(RECORDS):
        identity = Identity(i.to_bytes(4, "big") * 8)
        record = NodeRecord.create(
            identity,
            now=now,
            sequence=1,
            display_name=f"Dr {i}",
            institution="Bench Hospital",
            country="FR",
            subspecialties=(("neuro", "msk", "chest", "paediatric")[i % 4],),
            jurisdictions=("FR",),
            languages=("fr", "en"),
            endpoints=(f"lan:http://127.0.0.1:{10000 + i % 50000}",),
        )
        db.put(record, now)
        ids.append(str(record.node_id))
    db.close()
    return ids


def _sqlite_baseline(db_path: Path, ids: list[str]) -> float:
    db = sqlite3.connect(str(db_path))
    started = time.perf_counter()
    for i in range(LOOKUPS):
        db.execute("SELECT wire FROM records WHERE node_id = ?", (ids[i % len(ids)],)).fetchone()
    elapsed = time.perf_counter() - started
    db.close()
    return LOOKUPS / elapsed


async def _lookups(url: str, ids: list[str], verify: bool) -> float:
    async with aiohttp.ClientSession() as session:
        counter = iter(range(LOOKUPS))
        now = int(time.time())

        async def worker() -> None:
            for i in counter:
                async with session.get(f"{url}/v1/records/{ids[i % len(ids)]}") as response:
                    body = await response.read()
                    assert response.status == 200
                    if verify:
                        NodeRecord.from_wire(body).verify(now)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(32)))
        return LOOKUPS / (time.perf_counter() - started)


async def _sockets(url: str, pid: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, SOCKETS * 2 + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    identities = [Identity(os.urandom(32)) for _ in range(SOCKETS)]
    clients = [RegistryClient(url, identity) for identity in identities]
    conns: list[RegistryConnection] = [c.connect(connect_timeout=60) for c in clients]
    rss_before = _rss_mb(pid)
    started = time.perf_counter()
    sem = asyncio.Semaphore(100)

    async def open_one(conn: RegistryConnection) -> None:
        async with sem:
            await conn.__aenter__()

    await asyncio.gather(*(open_one(c) for c in conns))
    connect_s = time.perf_counter() - started
    rss_after = _rss_mb(pid)
    print(
        f"{SOCKETS} authenticated signaling sockets open in {connect_s:.1f} s "
        f"({SOCKETS / connect_s:.0f} connects/s incl. challenge signature)"
    )
    print(
        f"registry RSS: {rss_before:.1f} MB before sockets, {rss_after:.1f} MB with them "
        f"({(rss_after - rss_before) * 1024 / SOCKETS:.0f} KB per socket)"
    )

    latencies: list[float] = []
    total = RELAY_RATE * RELAY_SECONDS
    pairs = SOCKETS // 2

    async def receiver(conn: RegistryConnection) -> None:
        while True:
            message = await conn.receive()
            latencies.append(time.perf_counter() - float(message.data.decode()))

    receivers = [asyncio.create_task(receiver(conns[pairs + i])) for i in range(pairs)]
    interval = 1 / RELAY_RATE
    started = time.perf_counter()
    sends = []
    for n in range(total):
        target = started + n * interval
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sender, recipient = conns[n % pairs], identities[pairs + n % pairs]
        sends.append(
            asyncio.create_task(sender.send(recipient.node_id, str(time.perf_counter()).encode()))
        )
    await asyncio.gather(*sends)
    deadline = time.perf_counter() + 5
    while len(latencies) < total and time.perf_counter() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    achieved = total / (time.perf_counter() - started)
    for task in receivers:
        task.cancel()
    ordered = sorted(latencies)
    p50 = ordered[len(ordered) // 2] * 1000
    p99 = ordered[int(len(ordered) * 0.99)] * 1000
    print(
        f"relay at {RELAY_RATE} msg/s across {pairs} pairs: {len(latencies)}/{total} delivered, "
        f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, mean {statistics.mean(ordered) * 1000:.2f} ms "
        f"(offered {achieved:.0f} msg/s)"
    )
    print(f"registry RSS after relay: {_rss_mb(pid):.1f} MB")

    async def close_one(conn: RegistryConnection) -> None:
        async with sem:
            await conn.close()

    await asyncio.gather(*(close_one(c) for c in conns))
    await asyncio.gather(*(c.close() for c in clients))


async def _run(url: str, ids: list[str], pid: int, baseline: float) -> None:
    raw = await _lookups(url, ids, verify=False)
    verified = await _lookups(url, ids, verify=True)
    print(f"raw SQLite lookups (baseline):        {baseline:10.0f} /s")
    print(f"HTTP lookups, 32 concurrent:          {raw:10.0f} /s  ({raw / baseline:.3f}x baseline)")
    print(
        f"HTTP lookups + client verification:   {verified:10.0f} /s  ({verified / baseline:.3f}x)"
    )
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        for _ in range(200):
            async with session.get(
                f"{url}/v1/search", params={"subspecialty": "neuro", "limit": "50"}
            ) as r:
                await r.read()
        rate = 200 / (time.perf_counter() - started)
        print(f"search (50 results/page), sequential: {rate:10.0f} /s")
    await _sockets(url, pid)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db_path = Path(tmp) / "registry.db"
        started = time.perf_counter()
        ids = _fill(db_path)
        print(
            f"{RECORDS} signed records created and stored in {time.perf_counter() - started:.1f} s"
        )
        baseline = _sqlite_baseline(db_path, ids)
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, str(db_path)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            url = line.split("listening on ", 1)[1].split()[0]
            print(f"registry process RSS with {RECORDS} records: {_rss_mb(proc.pid):.1f} MB")
            asyncio.run(_run(url, ids, proc.pid, baseline))
        finally:
            proc.terminate()
            proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()


if __name__ == "__main__":
    main()
