"""Registry: lookups/s over 10,000 records, 1,000 signaling sockets, relay latency, RSS;
then one SQLite instance against two instances sharing one PostgreSQL.

Run: ``python -m bench registry``. The registry runs in its own process (one
core), the clients in this one (the other core), talking over 127.0.0.1.
Baseline: raw SQLite primary-key lookups on the same database in this run.
The comparison (skipped without PostgreSQL; ``python -m bench.bench_registry
compare`` runs it alone, about 3 minutes) publishes 10,000 records, looks them up
and relays signals between nodes connected to different instances, on loopback,
with 2,000 idle authenticated signaling sockets connected throughout (split over
the two PostgreSQL instances; all 2,000 on the SQLite one); its ratios are
PostgreSQL-pair / SQLite-single from the same run. One run (2-core machine shared
with other work; per-address HTTP, relay and connect rates and socket caps
counted in PostgreSQL)::

                           SQLite x1  PostgreSQL x2   ratio
    publish/s                 481.34         231.91    0.48
    lookups/s                2846.60        1125.77    0.40
    relay p50 ms                1.46           4.18    2.86
    relay p99 ms              105.22          14.00    0.13
    relayed                     1.00           1.00    1.00
    registry CPU ms/msg         1.30           3.10
    database CPU ms/msg         0.00           0.15
    crowd connect s             4.63          14.08

The SQLite p99 rises with all 2,000 sockets on its one instance (105 ms here,
484 ms in a second run; 10.7 ms without the crowd before); a second run gave the
pair 232 publishes/s (0.53x), 895 lookups/s (0.45x), relay p50 4.8 ms, p99 23 ms.

Paper estimate, national network (20,000 nodes, 200,000 consult messages a day):

* Sockets: 20,000 signaling sockets at the RSS per socket measured above (tens of
  KB) is well under 1 GB; ``max_connections`` is 10,000 per instance, so at least
  two instances, three for one to fail or be upgraded without the others filling.
* Publishing: nodes republish every RECORD_TTL/4 = 15 min when connected, so
  20,000 / 900 s = 22 publishes/s average (each a verify and one upsert).
* Relay: 200,000 messages/day = 2.3/s average; take 10x for the daytime peak and
  10 signaling frames per message (WebRTC offer, answer, ICE candidates): ~230
  relays/s at peak. On PostgreSQL each relay is one transaction (advisory lock on
  the recipient, quota sums over its indexed rows, insert with NOTIFY) plus one
  batched delete. Measured below: ~2.5 ms of registry CPU and ~0.1 ms of database
  CPU per relayed message (3.1 ms with 2,000 sockets connected and the address
  relay rate shared in the database), so the peak needs about 0.7 of a core of
  registry instances and a few percent of one PostgreSQL core.
* Lookups/search: a few per consult plus directory refreshes: tens per second.
* Mailbox: only mail for offline nodes stays; at a few KB per sealed message and
  the 7-day TTL, even all 1.4 M messages of a week kept is ~5-10 GB, and the
  per-recipient/sender/address/global byte quotas bound it by construction.
So two or three registry instances and one PostgreSQL (with a streaming replica)
carry a national network with a large margin; the figures below show how much
each instance does on one core.
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
             address_sockets=100_000, connect_rate=1e9, connect_burst=1e9,
             new_record_rate=1e9, new_record_burst=1e9,
             address_send_rate=1e9, address_send_burst=1e9)
asyncio.run(run_forever(RegistryServer(sys.argv[1], limits=big), "127.0.0.1", 0))
"""


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _record(
    identity: Identity,
    i: int,
    now: int,
    languages: tuple[str, ...],
    endpoints: tuple[str, ...] = (),
) -> NodeRecord:
    """The bench's record number ``i``: a French hospital's, one of four subspecialties."""
    return NodeRecord.create(
        identity,
        now=now,
        sequence=1,
        display_name=f"Dr {i}",
        institution="Bench Hospital",
        country="FR",
        subspecialties=(("neuro", "msk", "chest", "paediatric")[i % 4],),
        jurisdictions=("FR",),
        languages=languages,
        endpoints=endpoints,
    )


def _fill(db_path: Path) -> list[str]:
    db = RegistryDB(db_path)
    now = int(time.time())
    ids = []
    for i in range(RECORDS):
        identity = Identity(i.to_bytes(4, "big") * 8)
        record = _record(
            identity,
            i,
            now,
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
    compare_sqlite_postgres()


# One SQLite instance against two instances on one PostgreSQL ---------------------------

COMPARE_RECORDS = 10_000
COMPARE_LOOKUPS = 3_000
COMPARE_CROWD = 2_000  # idle authenticated signaling sockets during the measurement
CROWD_TIMEOUT = 180.0  # seconds to connect (or close) the whole crowd, at most
COMPARE_PAIRS = 25
COMPARE_RATE = 50  # relayed messages per second (under saturation on a shared 2-core box)
COMPARE_SECONDS = 4


def _start_instance(db: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE, db], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"registry instance did not start: {line!r}")
    return proc, line.split("listening on ", 1)[1].split()[0]


def _signed_records(count: int) -> list[bytes]:
    now = int(time.time())
    return [
        _record(Identity(os.urandom(32)), i, now, languages=("fr",)).to_wire() for i in range(count)
    ]


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes (Linux /proc), 0 for any gone."""
    total = 0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / tick


def _postgres_pids(port: int) -> list[int]:
    """The postmaster listening on ``port`` and its backends."""
    master = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[0].endswith(b"/postgres") and str(port).encode() in argv:
                master = int(entry.name)
    pids = [master] if master else []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if master and int(stat[1]) == master:
                pids.append(int(entry.name))
    return pids


def _raise_open_files(want: int) -> None:
    """Room for ``want`` sockets in this process and the instances it starts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, want)), hard))


async def _crowd(urls: list[str]) -> tuple[list[RegistryClient], list[RegistryConnection], float]:
    """COMPARE_CROWD idle authenticated sockets, spread over the instances."""
    clients = [
        RegistryClient(urls[i % len(urls)], Identity(os.urandom(32))) for i in range(COMPARE_CROWD)
    ]
    conns = [c.connect(connect_timeout=60) for c in clients]
    sem = asyncio.Semaphore(100)

    async def open_one(conn: RegistryConnection) -> None:
        async with sem:
            await conn.__aenter__()

    started = time.perf_counter()
    async with asyncio.timeout(CROWD_TIMEOUT):
        await asyncio.gather(*(open_one(c) for c in conns))
    return clients, conns, time.perf_counter() - started


async def _disperse(clients: list[RegistryClient], conns: list[RegistryConnection]) -> None:
    sem = asyncio.Semaphore(100)

    async def close_one(conn: RegistryConnection, client: RegistryClient) -> None:
        async with sem:
            await conn.close()
            await client.close()

    async with asyncio.timeout(CROWD_TIMEOUT):
        await asyncio.gather(*(close_one(c, k) for c, k in zip(conns, clients, strict=True)))


async def _scenario(
    urls: list[str], wires: list[bytes], server_pids: list[int], db_pids: list[int]
) -> dict[str, float]:
    """With COMPARE_CROWD idle nodes connected: publish, look up (spread over the
    instances) and relay from instance 0 to the last."""
    figures: dict[str, float] = {}
    crowd_clients, crowd, crowd_s = await _crowd(urls)
    figures["crowd connect s"] = crowd_s
    try:
        figures |= await _measure(urls, wires, server_pids, db_pids)
    finally:
        await _disperse(crowd_clients, crowd)
    return figures


async def _measure(
    urls: list[str], wires: list[bytes], server_pids: list[int], db_pids: list[int]
) -> dict[str, float]:
    figures: dict[str, float] = {}
    clients = [RegistryClient(u) for u in urls]
    jobs = iter(enumerate(wires))

    async def publisher() -> None:
        for i, wire in jobs:
            await clients[i % len(clients)].publish(NodeRecord.from_wire(wire))

    started = time.perf_counter()
    await asyncio.gather(*(publisher() for _ in range(16)))
    figures["publish/s"] = len(wires) / (time.perf_counter() - started)
    ids = [str(NodeRecord.from_wire(w).node_id) for w in wires]
    async with aiohttp.ClientSession() as session:
        counter = iter(range(COMPARE_LOOKUPS))

        async def looker() -> None:
            for i in counter:
                url = urls[i % len(urls)]
                async with session.get(f"{url}/v1/records/{ids[i % len(ids)]}") as response:
                    await response.read()
                    assert response.status == 200

        started = time.perf_counter()
        await asyncio.gather(*(looker() for _ in range(32)))
        figures["lookups/s"] = COMPARE_LOOKUPS / (time.perf_counter() - started)
    for client in clients:
        await client.close()

    senders = [Identity(os.urandom(32)) for _ in range(COMPARE_PAIRS)]
    receivers = [Identity(os.urandom(32)) for _ in range(COMPARE_PAIRS)]
    out_clients = [RegistryClient(urls[0], i) for i in senders]
    in_clients = [RegistryClient(urls[-1], i) for i in receivers]
    conns = [c.connect(connect_timeout=60) for c in out_clients + in_clients]
    await asyncio.gather(*(c.__aenter__() for c in conns))
    latencies: list[float] = []

    async def receive(conn: RegistryConnection) -> None:
        while True:
            message = await conn.receive()
            latencies.append(time.perf_counter() - float(message.data.decode()))

    tasks = [asyncio.create_task(receive(c)) for c in conns[COMPARE_PAIRS:]]
    total = COMPARE_RATE * COMPARE_SECONDS
    cpu_servers, cpu_db = _cpu_seconds(server_pids), _cpu_seconds(db_pids)
    started = time.perf_counter()
    sends = []
    for n in range(total):
        delay = started + n / COMPARE_RATE - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        stamp = str(time.perf_counter()).encode()
        sender = conns[n % COMPARE_PAIRS]
        sends.append(asyncio.create_task(sender.send(receivers[n % COMPARE_PAIRS].node_id, stamp)))
    await asyncio.gather(*sends)
    deadline = time.perf_counter() + 10
    while len(latencies) < total and time.perf_counter() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    figures["registry CPU ms/msg"] = (_cpu_seconds(server_pids) - cpu_servers) * 1000 / total
    figures["database CPU ms/msg"] = (_cpu_seconds(db_pids) - cpu_db) * 1000 / total
    for task in tasks:
        task.cancel()
    ordered = sorted(latencies) or [float("nan")]
    figures["relay p50 ms"] = ordered[len(ordered) // 2] * 1000
    figures["relay p99 ms"] = ordered[int(len(ordered) * 0.99)] * 1000
    figures["relayed"] = len(latencies) / total
    await asyncio.gather(*(c.close() for c in conns))
    await asyncio.gather(*(c.close() for c in out_clients + in_clients))
    return figures


async def _new_database(cluster: str) -> str:
    import asyncpg

    conn = await asyncpg.connect(f"{cluster}/postgres")
    try:
        await conn.execute("CREATE DATABASE bench")
    finally:
        await conn.close()
    return f"{cluster}/bench"


def compare_sqlite_postgres() -> None:
    import pytest

    from tests.registry.postgres import postgres_cluster

    _raise_open_files(COMPARE_CROWD * 2 + 1024)
    started = time.perf_counter()
    wires = _signed_records(COMPARE_RECORDS)
    print(
        f"{COMPARE_RECORDS} records signed for the comparison "
        f"in {time.perf_counter() - started:.1f} s"
    )
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = _start_instance(str(Path(tmp) / "registry.db"))
        try:
            results["sqlite x1"] = asyncio.run(_scenario([url], wires, [proc.pid], []))
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    try:
        with postgres_cluster() as cluster:
            db = asyncio.run(_new_database(cluster))
            procs: list[subprocess.Popen[str]] = []
            try:
                urls = []
                for _ in range(2):
                    proc, url = _start_instance(db)
                    procs.append(proc)
                    urls.append(url)
                port = int(cluster.rsplit(":", 1)[1])
                results["postgres x2"] = asyncio.run(
                    _scenario(urls, wires, [p.pid for p in procs], _postgres_pids(port))
                )
            finally:
                for proc in procs:
                    proc.terminate()
                    proc.wait(timeout=10)
    except pytest.skip.Exception as exc:
        print(f"PostgreSQL comparison skipped: {exc}")
        return
    sqlite, pg = results["sqlite x1"], results["postgres x2"]
    print(
        f"{COMPARE_RECORDS} records, {COMPARE_LOOKUPS} lookups, relay {COMPARE_RATE} msg/s "
        f"for {COMPARE_SECONDS} s across {COMPARE_PAIRS} pairs (PostgreSQL: sender and "
        f"recipient on different instances), {COMPARE_CROWD} idle authenticated sockets "
        "connected throughout (split over the instances)"
    )
    print(f"{'':20}{'SQLite x1':>12}{'PostgreSQL x2':>15}{'ratio':>8}")
    for key in ("publish/s", "lookups/s", "relay p50 ms", "relay p99 ms", "relayed"):
        print(f"{key:20}{sqlite[key]:12.2f}{pg[key]:15.2f}{pg[key] / sqlite[key]:8.2f}")
    for key in ("registry CPU ms/msg", "database CPU ms/msg", "crowd connect s"):
        print(f"{key:20}{sqlite[key]:12.2f}{pg[key]:15.2f}")
    per_msg = pg["registry CPU ms/msg"] + pg["database CPU ms/msg"]
    if per_msg > 0:
        print(
            f"shared relay costs {per_msg:.2f} ms of CPU per message in all (instances and "
            f"database): one core relays about {1000 / per_msg:.0f} msg/s"
        )


if __name__ == "__main__":
    if sys.argv[1:] == ["compare"]:  # the SQLite/PostgreSQL comparison alone
        compare_sqlite_postgres()
    else:
        main()
