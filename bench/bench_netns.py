"""radmesh vs the classic way over a 20 Mbit/s link between two network namespaces.

Run: ``python -m bench netns`` (as root; needs iproute2 and dcmtk, Orthanc optional).

Two namespaces joined by a veth pair, both ends shaped with ``tc tbf rate 20mbit``.
The same synthetic head CT (node/demo/phantom.py, the demo's study) goes from A to B:

- dcmtk ``storescu`` in A to ``storescp`` in B, uncompressed, as a PACS sends it;
- radmesh: a node process in A with the study in its store runs ``send_study``,
  a node in B runs ``receive_study`` into its own store, over aiortc across the
  veth (signaling relayed over a Unix socket, as tests/peer_transport/test_netns.py
  does); timed from ``connect()`` to the last instance verified and stored, then
  checked byte for byte; once more with the study encoded before the clock starts;
- Orthanc peer transfer (``/peers/b/store``) between an Orthanc in each namespace.

Also printed: the connection's raw bulk rate on the shaped link (the transport's
ceiling). A 20 ms RTT run with netem follows when the kernel has sch_netem.
``BENCH_NETNS_SLICES`` changes the study size (default 200).

Measured here (2 shared cores, 200 slices, 105 MB, 33.7 MB on the wire): storescu
52.5 s (2.00 MB/s), radmesh 21.2 s (2.48x storescu; the first 6 s go to encoding
before the manifest can be offered), radmesh with the study encoded beforehand
16.8 s (3.12x), Orthanc peers 46.4 s; raw bulk 2.28 MB/s of the link's 2.5 MB/s.
No netem in this kernel, so no RTT figure.

The addresses exist only inside the namespaces, which are deleted whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from crypto.identity import Identity
from node.core.children import stop
from node.demo.phantom import generate_ct
from node.dicom.store import Store
from peer_transport import frames as fr
from peer_transport.connection import (
    PeerConnection,
    Received,
    Transport,
    TransportOptions,
    install_event_loop_policy,
)
from peer_transport.mux import ChannelLink
from peer_transport.rtc import RtcOptions, restrict_host_addresses
from peer_transport.signaling import StreamSignaling
from peer_transport.transfer.prepared import PreparedStudy
from peer_transport.transfer.runner import StudySender, receive_study, send_study

ROOT = Path(__file__).resolve().parents[1]
RATE = "20mbit"
ADDRESSES = {"a": "10.231.9.1", "b": "10.231.9.2"}
SLICES = int(os.environ.get("BENCH_NETNS_SLICES", "200"))
DICOM_PORT = 11112
ORTHANC_HTTP = 8042
GOAL = 3.0
RAW_BYTES = 12 << 20
Result = dict[str, Any]
SENDS_STUDY = ("send", "send-prepared")
SENDERS = (*SENDS_STUDY, "raw-send")
RUN_TIMEOUT = 900.0  # one transfer at 20 Mbit/s: ~45 s expected for 105 MB
TOOLS = ("ip", "tc", "storescu", "storescp")


# -- namespaces ------------------------------------------------------------------------


def _run(*args: str, timeout: float = 10) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=timeout)


@dataclass(frozen=True)
class Link:
    names: dict[str, str]  # side -> namespace
    devices: dict[str, str]  # side -> veth name inside that namespace

    def exec(self, side: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.names[side], *argv]

    def shape(self, delay_ms: int = 0) -> None:
        """tbf at RATE on both ends; with ``delay_ms``, netem adds that one-way delay first."""
        for side, dev in self.devices.items():
            ns = self.names[side]
            with contextlib.suppress(subprocess.CalledProcessError):
                _run("tc", "-n", ns, "qdisc", "del", "dev", dev, "root")
            tbf = ["tbf", "rate", RATE, "burst", "32kbit", "latency", "400ms"]
            if delay_ms:
                _run("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:",
                     "netem", "delay", f"{delay_ms}ms")  # fmt: skip
                _run("tc", "-n", ns, "qdisc", "add", "dev", dev, "parent", "1:1", "handle",
                     "10:", *tbf)  # fmt: skip
            else:
                _run("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", *tbf)


@contextlib.contextmanager
def veth_link() -> Iterator[Link]:
    tag = f"{os.getpid() % 100000:05d}"
    names = {side: f"rmb-{tag}-{side}" for side in ADDRESSES}
    devices = {"a": f"rba{tag}", "b": f"rbb{tag}"}
    created: list[str] = []
    try:
        for name in names.values():
            _run("ip", "netns", "add", name)
            created.append(name)
        _run("ip", "link", "add", devices["a"], "type", "veth", "peer", "name", devices["b"])
        for side, dev in devices.items():
            ns = names[side]
            _run("ip", "link", "set", dev, "netns", ns)
            _run("ip", "-n", ns, "addr", "add", f"{ADDRESSES[side]}/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        yield Link(names, devices)
    finally:
        for name in created:  # deleting a namespace deletes its end of the veth pair too
            with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
                _run("ip", "netns", "del", name)


@contextlib.contextmanager
def background(argv: Sequence[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A server process, stopped (then killed) on the way out."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        yield proc
    finally:
        stop(proc, 10)


def wait_listening(link: Link, side: str, port: int, timeout: float = 20) -> None:
    """Wait until something accepts TCP on ``port`` in ``side``'s namespace."""
    probe = f"import socket; socket.create_connection(('{ADDRESSES[side]}', {port}), 1).close()"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = subprocess.run(
            link.exec(side, sys.executable, "-c", probe), capture_output=True, timeout=10
        )
        if done.returncode == 0:
            return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {ADDRESSES[side]}:{port} after {timeout} s")


# -- the classic way: dcmtk --------------------------------------------------------------


def storescu_run(link: Link, files: Sequence[Path], work: Path) -> float:
    received = work / "storescp"
    received.mkdir()
    server = link.exec("b", "storescp", "-aet", "STORESCP", "-od", str(received), str(DICOM_PORT))
    with background(server, work / "storescp.log"):
        wait_listening(link, "b", DICOM_PORT)
        client = link.exec(
            "a", "storescu", "-aet", "STORESCU", "-aec", "STORESCP",
            ADDRESSES["b"], str(DICOM_PORT), *map(str, files),
        )  # fmt: skip
        started = time.perf_counter()
        done = subprocess.run(client, capture_output=True, text=True, timeout=RUN_TIMEOUT)
        seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"storescu failed: {done.stderr[-2000:]}")
    got = len(list(received.iterdir()))
    if got != len(files):
        raise RuntimeError(f"storescp stored {got} of {len(files)} instances")
    return seconds


# -- radmesh: one node process per namespace ---------------------------------------------


class _Audit:
    """Keeps the transfer record ``send_study`` writes (wire bytes)."""

    def __init__(self) -> None:
        self.details: dict[str, Any] = {}

    def append(self, kind: Any, *, now: float, details: Any = None, **_: Any) -> int:
        self.details = dict(details or {})
        return 0


def node_store(cfg: dict[str, Any]) -> Store:
    """The node's encrypted store (a fresh key each run)."""
    store = Store.open(Path(cfg["work"]) / "store", os.urandom(32))
    if cfg["role"] in SENDS_STUDY:  # the study is in the sender's store before the clock starts
        for path in sorted(Path(cfg["files"]).iterdir()):
            store.add_file(path, source="bench")
    return store


async def _send(conn: PeerConnection, cfg: dict[str, Any], me: Identity, store: Store) -> Result:
    audit = _Audit()
    state = await send_study(
        ChannelLink(conn), store, cfg["study"], me, peer=cfg["peer"], audit=audit
    )
    return {"state": state.value, "wire_bytes": audit.details.get("wire_bytes", 0)}


async def _receive(conn: PeerConnection, cfg: dict[str, Any], store: Store) -> Result:
    first: list[float] = []

    def on_progress(_p: object) -> None:
        if not first:
            first.append(time.time())

    progress = await receive_study(
        ChannelLink(conn), store, Path(cfg["work"]) / "spool", peer=cfg["peer"],
        on_progress=on_progress,
    )  # fmt: skip
    end = time.time()
    hashes = sorted(
        hashlib.sha256(store.read_instance(row.sop_instance_uid)).hexdigest()
        for row in store.instances(cfg["study"])
    )
    return {
        "end": end,
        "first_stored": first[0] if first else end,
        "bytes": progress.bytes_done,
        "instances": len(hashes),
        "digest": hashlib.sha256("".join(hashes).encode()).hexdigest(),
    }


async def _prepare(cfg: dict[str, Any], me: Identity, store: Store) -> PreparedStudy:
    """Encoded before the clock starts, as if the node had encoded the study at import."""
    rows = store.instances(cfg["study"])
    return await PreparedStudy.from_files(
        [store.read_instance(r.sop_instance_uid) for r in rows], me
    )


async def _send_prepared(conn: PeerConnection, study: PreparedStudy) -> Result:
    link = ChannelLink(conn)
    sender = StudySender(study, link)
    link.attach(sender.on_control, lambda _data: None)
    state = await sender.run()
    return {"state": state.value, "wire_bytes": sum(d.wire_size for d in study.declared.values())}


async def _raw_send(conn: PeerConnection) -> Result:
    """The transport's own ceiling on this link: bulk frames of random bytes, no codec."""
    payload = os.urandom(fr.MAX_BULK_PAYLOAD)
    for _ in range(RAW_BYTES // len(payload) + 1):
        await conn.send_bulk(payload)
    while True:  # the receiver says when it has counted everything
        event = await conn.next_event(RUN_TIMEOUT)
        if isinstance(event, Received) and event.channel == "message":
            return {}


async def _raw_receive(conn: PeerConnection) -> Result:
    received = 0
    while received < RAW_BYTES:
        event = await conn.next_event(RUN_TIMEOUT)
        if isinstance(event, Received) and event.channel == "bulk":
            received += len(event.data)
    end = time.time()
    await conn.send_message(b"done")
    return {"end": end, "bytes": received}


async def node_main(cfg: dict[str, Any], store: Store) -> Result:
    """One radmesh node inside a namespace (config written by the parent, keys inside)."""
    restrict_host_addresses([cfg["address"]])
    me, peer = Identity(bytes.fromhex(cfg["seed"])), bytes.fromhex(cfg["peer_key"])
    reader, writer = await asyncio.open_unix_connection(cfg["sock"])
    options = TransportOptions(rtc=RtcOptions(ice_servers=()), connect_timeout=30)
    transport = Transport(
        me, StreamSignaling(reader, writer), is_trusted=lambda k: k == peer, options=options
    )
    await transport.start()
    try:
        if cfg["role"] in SENDERS:
            prepared = await _prepare(cfg, me, store) if cfg["role"] == "send-prepared" else None
            start = time.time()
            conn = await transport.connect(peer)
            connected = time.time()
            if prepared is not None:
                result = await _send_prepared(conn, prepared)
            elif cfg["role"] == "send":
                result = await _send(conn, cfg, me, store)
            else:
                result = await _raw_send(conn)
            return {**result, "start": start, "connected": connected}
        print("ready", flush=True)
        conn = await transport.accept(RUN_TIMEOUT)
        if cfg["role"] == "receive":
            result = await _receive(conn, cfg, store)
        else:
            result = await _raw_receive(conn)
        await asyncio.sleep(0.5)  # let the sender see the last acknowledgement
        return result
    finally:
        await transport.close()


async def signaling_relay(sock: Path, ready: asyncio.Event, lifetime: float) -> None:
    """Forwards each length-prefixed signaling message to the other node (also used by
    tests/peer_transport/test_netns.py)."""
    clients: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    both = asyncio.Event()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        clients.append((reader, writer))
        if len(clients) == 2:
            both.set()
        await both.wait()
        other = clients[1] if clients[0][0] is reader else clients[0]
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                size = await reader.readexactly(4)
                other[1].write(size + await reader.readexactly(int.from_bytes(size, "big")))
                await other[1].drain()

    server = await asyncio.start_unix_server(on_client, str(sock))
    ready.set()
    async with server:
        await asyncio.sleep(lifetime)


@contextlib.asynccontextmanager
async def relaying(sock: Path, lifetime: float) -> AsyncIterator[dict[str, Any]]:
    """The signaling relay on ``sock``, and a dict for the node processes the caller starts:
    on the way out any still running is killed, and the relay stopped (also used by
    tests/peer_transport/test_netns.py)."""
    ready = asyncio.Event()
    relay = asyncio.ensure_future(signaling_relay(sock, ready, lifetime))
    await ready.wait()
    procs: dict[str, Any] = {}
    try:
        yield procs
    finally:
        for proc in procs.values():
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        relay.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await relay


async def _spawn(link: Link, side: str, config: dict[str, Any], work: Path) -> Any:
    path = work / f"node-{side}.json"
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return await asyncio.create_subprocess_exec(
        *link.exec(side, sys.executable, "-m", "bench.bench_netns", "--node", str(path)),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


async def _radmesh(
    link: Link, files_dir: Path, study_uid: str, work: Path, sender: str = "send"
) -> Result:
    work = work / sender
    work.mkdir()
    sock = work / "signal.sock"
    ids = {"a": Identity.generate(), "b": Identity.generate()}
    async with relaying(sock, RUN_TIMEOUT) as procs:
        receiver = "raw-receive" if sender == "raw-send" else "receive"
        for side, role, other in (("b", receiver, "a"), ("a", sender, "b")):
            (work / side).mkdir()
            config = {
                "role": role, "sock": str(sock),
                "address": ADDRESSES[side], "seed": ids[side].seed.hex(),
                "peer_key": ids[other].public_key.hex(), "peer": str(ids[other].node_id),
                "work": str(work / side), "files": str(files_dir), "study": study_uid,
            }  # fmt: skip
            procs[side] = await _spawn(link, side, config, work)
            if side == "b":  # the receiver accepts before the sender calls
                line = await asyncio.wait_for(procs["b"].stdout.readline(), 60)
                if line.strip() != b"ready":
                    raise RuntimeError(f"receiver did not start: {line!r}")
        out: dict[str, dict[str, Any]] = {}
        for side, proc in procs.items():
            stdout, stderr = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT)
            if proc.returncode != 0:
                raise RuntimeError(f"node {side} failed: {stderr.decode()[-3000:]}")
            out[side] = json.loads(stdout.decode().strip().splitlines()[-1])
    return {**out["a"], **out["b"]}


def radmesh_run(
    link: Link, files: Sequence[Path], study_uid: str, work: Path, sender: str
) -> Result:
    res = asyncio.run(_radmesh(link, files[0].parent, study_uid, work, sender))
    want = sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in files)
    if res["state"] != "complete" or res["instances"] != len(files):
        raise RuntimeError(f"radmesh transfer incomplete: {res}")
    if res["digest"] != hashlib.sha256("".join(want).encode()).hexdigest():
        raise RuntimeError("radmesh: the stored study is not byte-identical to the original")
    return res


# -- Orthanc peer transfer ---------------------------------------------------------------


def _orthanc_config(directory: Path, peers: dict[str, str]) -> Path:
    config = {
        "Name": f"radmesh-bench-{directory.name}",
        "StorageDirectory": str(directory / "storage"),
        "IndexDirectory": str(directory / "index"),
        "HttpServerEnabled": True,
        "HttpPort": ORTHANC_HTTP,
        "RemoteAccessAllowed": True,  # reachable only inside the bench's namespaces
        "AuthenticationEnabled": False,
        "DicomServerEnabled": False,
        "OrthancPeers": {name: {"Url": url} for name, url in peers.items()},
        "Plugins": [],
        "StorageCompression": False,
        "HttpTimeout": 600,
        "SaveJobs": False,
    }
    path = directory / "orthanc.json"
    path.write_text(json.dumps(config))
    return path


def orthanc_client(base: str, files_dir: Path) -> dict[str, Any]:
    """Runs in namespace A: upload the study to the local Orthanc, time the peer store."""

    def call(path: str, body: bytes) -> Any:
        req = urllib.request.Request(base + path, data=body, method="POST")  # noqa: S310
        with urllib.request.urlopen(req, timeout=RUN_TIMEOUT) as response:  # noqa: S310
            return json.loads(response.read())

    study = ""
    for path in sorted(files_dir.iterdir()):
        study = call("/instances", path.read_bytes())["ParentStudy"]
    started = time.perf_counter()
    call("/peers/b/store", study.encode())
    return {"seconds": time.perf_counter() - started}


def orthanc_run(link: Link, files: Sequence[Path], work: Path) -> float | str:
    binary = shutil.which("Orthanc")
    if binary is None:
        return "Orthanc not found (Debian package orthanc)"
    dirs = {side: work / f"orthanc-{side}" for side in ADDRESSES}
    for d in dirs.values():
        d.mkdir()
    peer = {"b": f"http://{ADDRESSES['b']}:{ORTHANC_HTTP}/"}
    configs = {"a": _orthanc_config(dirs["a"], peer), "b": _orthanc_config(dirs["b"], {})}
    with contextlib.ExitStack() as stack:
        for side in ADDRESSES:
            argv = link.exec(side, binary, "--no-jobs", str(configs[side]))
            stack.enter_context(background(argv, dirs[side] / "orthanc.log"))
        for side in ADDRESSES:
            wait_listening(link, side, ORTHANC_HTTP, timeout=60)
        base = f"http://{ADDRESSES['a']}:{ORTHANC_HTTP}"
        argv = link.exec(
            "a", sys.executable, "-m", "bench.bench_netns", "--orthanc", base, str(files[0].parent)
        )
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT)
        if done.returncode != 0:
            return f"Orthanc peer transfer failed: {done.stderr[-1500:]}"
        seconds: float = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
        return seconds


# -- the benchmark ---------------------------------------------------------------------


def missing_prerequisite() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces and tc need root"
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return f"{tool} not found: install the Debian packages iproute2 and dcmtk"
    return None


def _line(name: str, size: int, seconds: float) -> str:
    return f"{name:<34} {size / 1e6:7.1f} MB {seconds:7.1f} s {size / seconds / 1e6:6.2f} MB/s"


def _measure(link: Link, files: list[Path], study_uid: str, work: Path, title: str) -> None:
    size = sum(p.stat().st_size for p in files)
    print(f"-- {title}", flush=True)
    classic = storescu_run(link, files, work)
    print(_line("dcmtk storescu -> storescp", size, classic), flush=True)
    raw = asyncio.run(_radmesh(link, files[0].parent, study_uid, work, "raw-send"))
    raw_seconds = raw["end"] - raw["connected"]
    raw_rate = raw["bytes"] / raw_seconds
    print(_line("radmesh connection, raw bulk bytes", raw["bytes"], raw_seconds), flush=True)
    res = radmesh_run(link, files, study_uid, work, "send")
    total = res["end"] - res["start"]
    print(_line("radmesh send_study -> receive_study", size, total) + _detail(res), flush=True)
    pre = radmesh_run(link, files, study_uid, work, "send-prepared")
    pre_total = pre["end"] - pre["start"]
    print(_line("radmesh, encoded before the clock", size, pre_total) + _detail(pre), flush=True)
    orthanc = orthanc_run(link, files, work)
    if isinstance(orthanc, str):
        print(f"Orthanc peer transfer not measured: {orthanc}", flush=True)
    else:
        print(_line("Orthanc /peers/b/store", size, orthanc), flush=True)
    ratio = classic / total
    verdict = "met" if ratio >= GOAL else "NOT met"
    print(f"radmesh is {ratio:.2f}x faster than storescu (goal >= {GOAL:.0f}x: {verdict})")
    print(
        f"encoded before the clock (at import): {classic / pre_total:.2f}x storescu; the wire "
        f"bytes alone at the raw bulk rate would take {res['wire_bytes'] / raw_rate:.1f} s",
        flush=True,
    )


def _detail(res: Result) -> str:
    start = res["start"]
    return (
        f"  (wire {res['wire_bytes'] / 1e6:.1f} MB; connected at {res['connected'] - start:.1f} s,"
        f" first instance stored at {res['first_stored'] - start:.1f} s; byte-exact)"
    )


def _encode_seconds(files: list[Path]) -> float:
    """What ``send_study`` spends encoding and hashing before it can offer the manifest."""
    data = [p.read_bytes() for p in files]
    started = time.perf_counter()
    asyncio.run(PreparedStudy.from_files(data, Identity.generate()))
    return time.perf_counter() - started


def main() -> None:
    why = missing_prerequisite()
    if why is not None:
        print(f"bench_netns skipped: {why}")
        return
    with tempfile.TemporaryDirectory(prefix="radmesh-netns-") as tmp:
        work = Path(tmp)
        files = generate_ct(work / "study", slices=SLICES, rows=512, seed=3)
        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        print(
            f"study: demo head CT, {SLICES} slices of 512x512, 12 bits stored, 6 HU noise; "
            f"encode+hash before offering: {_encode_seconds(files):.1f} s (this machine)",
            flush=True,
        )
        with veth_link() as link:
            link.shape()
            run_dir = work / "run-tbf"
            run_dir.mkdir()
            _measure(link, files, study_uid, run_dir, f"veth, tbf {RATE} both ways, no delay")
            try:
                link.shape(delay_ms=10)
            except subprocess.CalledProcessError as exc:
                print(f"20 ms RTT not measured: netem unavailable ({exc.stderr.decode().strip()})")
            else:
                run_dir = work / "run-rtt"
                run_dir.mkdir()
                _measure(link, files, study_uid, run_dir, f"tbf {RATE} + netem 10 ms each way")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--node", type=Path, help="run one radmesh node (config file)")
    parser.add_argument("--orthanc", nargs=2, metavar=("URL", "DIR"), help="Orthanc client")
    args = parser.parse_args()
    if args.node is not None:
        install_event_loop_policy()
        node_config = json.loads(args.node.read_text())
        with node_store(node_config) as node_store_:
            print(json.dumps(asyncio.run(node_main(node_config, node_store_))), flush=True)
    elif args.orthanc is not None:
        print(json.dumps(orthanc_client(args.orthanc[0], Path(args.orthanc[1]))), flush=True)
    else:
        main()
