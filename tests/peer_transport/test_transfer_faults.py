"""Study transfer under faults: kill -9 of either node process, connections killed at random.

Real node processes (the CLI's ``fetch`` and ``send``) with real stores in temporary
homes, real aiortc on 127.0.0.1. After every fault the study must arrive byte-exact,
no partial instance may ever be visible in the receiver's store, and what is sent
again is bounded by what was in flight.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.bench_codec import ct_series
from crypto.identity import Identity
from node.core.config import NetworkConfig, NodeConfig, NodeHome
from node.core.keystore import save_identity
from node.demo.phantom import generate_ct
from node.dicom.store import open_store
from peer_transport.connection import PeerConnection
from peer_transport.mux import ChannelLink
from peer_transport.transfer.instance import prepare_instance
from peer_transport.transfer.machine import State
from peer_transport.transfer.manifest import chunk_count
from peer_transport.transfer.messages import CHUNK_SIZE
from peer_transport.transfer.prepared import PreparedStudy
from peer_transport.transfer.progress import Progress
from peer_transport.transfer.runner import StudyReceiver, StudySender
from registry.directory import PeerDirectory
from registry.records import NodeRecord
from registry.trust import TrustStore
from tests.peer_transport.helpers import kill_link, mesh
from tests.peer_transport.transfer_links import MemoryStore
from tests.ports import free_port as _free_port

ROOT = Path(__file__).resolve().parents[2]
PROGRESS = re.compile(r"\] (\d+)/(\d+) ")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


# -- two node homes that know and trust each other -----------------------------------------


@dataclass(frozen=True)
class Home:
    home: NodeHome
    identity: Identity
    port: int

    @property
    def node_id(self) -> str:
        return str(self.identity.node_id)


def _make_home(root: Path, name: str) -> Home:
    """A node home with a fixed LAN port, so a restarted process is found where it was."""
    home = NodeHome(root / name)
    identity = Identity.generate()
    save_identity(home.key_path, identity, None)
    port = _free_port()
    network = NetworkConfig(mdns=False, listen_host="127.0.0.1", listen_port=port)
    home.save_config(NodeConfig(display_name=name, network=network))
    home.data_dir.mkdir(parents=True, exist_ok=True)
    return Home(home, identity, port)


def _introduce(a: Home, b: Home) -> None:
    """Each remembers the other's record (as if found by mDNS) and trusts its key."""
    now = int(time.time())
    for me, other in ((a, b), (b, a)):
        record = NodeRecord.create(
            other.identity,
            now=now,
            sequence=now,
            display_name=other.home.root.name,
            endpoints=(f"lan:http://127.0.0.1:{other.port}",),
        )
        with closing(TrustStore(me.home.trust_db)) as trust:
            trust.mark_verified(other.identity.node_id, now)
            directory = PeerDirectory(me.home.peers_db, trust)
            try:
                assert directory.remember(record, "test", now)
            finally:
                directory.close()


@dataclass(frozen=True)
class Study:
    uid: str
    by_hash: dict[str, bytes]  # content hash (hex SHA-256) -> original file
    chunks: int  # chunks of the whole study on the wire


def _ct_study(sender: Home, files: list[bytes]) -> Study:
    with closing(open_store(sender.home, sender.identity)) as store:
        uids = {store.add_bytes(f, source="test").study_uid for f in files}
    chunks = sum(chunk_count(len(prepare_instance(f)[2]), CHUNK_SIZE) for f in files)
    return Study(uids.pop(), {hashlib.sha256(f).hexdigest(): f for f in files}, chunks)


def _stored(receiver: Home, study: Study) -> dict[str, bytes]:
    """Every instance the receiver's store lists, read back (the store checks its hash)."""
    with closing(open_store(receiver.home, receiver.identity)) as store:
        rows = store.instances(study.uid)
        found = {r.content_hash: store.read_instance(r.sop_instance_uid) for r in rows}
    for content_hash, data in found.items():
        assert hashlib.sha256(data).hexdigest() == content_hash
        assert study.by_hash.get(content_hash) == data, "the store holds an instance never sent"
    return found


# -- node processes --------------------------------------------------------------------------


class StillRunning(AssertionError):
    """A node process did not finish in time (a transfer that never resumed)."""


class NodeProcess:
    """``radmesh --home H ...`` in its own process; output collected without blocking."""

    def __init__(self, node: Home, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.peer_transport.transfer_proc",
                "--home",
                str(node.home.root),
                *args,
            ],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.out = b""
        self.err = b""
        for stream in (self.proc.stdout, self.proc.stderr):
            assert stream is not None
            os.set_blocking(stream.fileno(), False)

    def pump(self) -> None:
        for name, stream in (("out", self.proc.stdout), ("err", self.proc.stderr)):
            assert stream is not None
            while data := stream.read(65536):
                setattr(self, name, getattr(self, name) + data)

    def wait_until(self, predicate: Callable[[], bool], within: float, what: str) -> None:
        deadline = time.monotonic() + within
        while True:
            self.pump()
            if predicate():
                return
            if self.proc.poll() is not None:
                self.pump()
                pytest.fail(f"process ended ({self.proc.returncode}) before {what}\n{self.log}")
            if time.monotonic() > deadline:
                pytest.fail(f"not {what} within {within:.0f} s\n{self.log}")
            time.sleep(0.02)

    def finish(self, within: float) -> int:
        deadline = time.monotonic() + within
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.pump()
            time.sleep(0.05)
        self.pump()
        if self.proc.returncode is None:
            raise StillRunning(f"process still running after {within:.0f} s\n{self.log}")
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.pump()

    @property
    def instances_done(self) -> int:
        found = PROGRESS.findall(self.err.decode(errors="replace"))
        return int(found[-1][0]) if found else 0

    @property
    def bulk_sent(self) -> int:
        found = re.findall(rb"^bulk (\d+)$", self.out, re.MULTILINE)
        return int(found[-1]) if found else 0

    @property
    def log(self) -> str:
        """What the process said, for a failure message: its log and its last progress."""
        text = (self.out + b"\n" + self.err).decode(errors="replace").replace("\r", "\n")
        lines = [line for line in text.splitlines() if line and not line.startswith("bulk ")]
        said = [line for line in lines if not PROGRESS.search(line)][-30:]
        progress = [line for line in lines if PROGRESS.search(line)][-1:]
        return "\n".join([*said, *progress, f"(bulk chunks sent: {self.bulk_sent})"])


@contextmanager
def processes() -> Iterator[list[NodeProcess]]:
    started: list[NodeProcess] = []
    try:
        yield started
    finally:
        for p in started:
            p.kill()
            for stream in (p.proc.stdout, p.proc.stderr):
                if stream is not None:
                    stream.close()


def _listening(port: int) -> bool:
    with closing(socket.socket()) as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _fetch(receiver: Home, sender: Home) -> NodeProcess:
    env = {"RADMESH_TEST_WINDOW": str(FETCH_WINDOW)}
    proc = NodeProcess(receiver, "fetch", "--from", sender.node_id, "--wait", "60", env=env)
    proc.wait_until(lambda: _listening(receiver.port), 20, "listening")
    return proc


def _send(sender: Home, receiver: Home, study: Study, reoffer: bool = True) -> NodeProcess:
    # Without reoffer the sender never offers again on its own: a restarted receiver
    # gets the transfer back only by asking for it.
    env = None if reoffer else {"RADMESH_TEST_REOFFER_AFTER": "3600"}
    return NodeProcess(sender, "send", study.uid, "--to", receiver.node_id, "--identified", env=env)


# -- tests -----------------------------------------------------------------------------------

SLICES = 16  # of 512 x 512 CT, three chunks each on the wire: six windows
# The fetch's window (chunks in flight; the node's is receiver.DEFAULT_WINDOW): small, so
# that a small study spans several and a kill can leave more than one window to resend.
FETCH_WINDOW = 8


CT_SEED = 0  # the CT's pixels; each test's own random seed picks where it kills


@pytest.fixture(scope="session")
def ct_files(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> list[bytes]:
    """The CT every process-kill test sends, generated once per run: the xdist workers
    share one copy (in the run's temporary directory, written under a lock, complete once
    ``done`` exists)."""
    root = tmp_path_factory.getbasetemp()
    root = root if worker_id == "master" else root.parent
    folder = root / f"transfer-faults-ct-{SLICES}"
    with open(root / "transfer-faults-ct.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "done").exists():
            generate_ct(folder, slices=SLICES, rows=512, seed=CT_SEED)
            (folder / "done").touch()
    return [p.read_bytes() for p in sorted(folder.glob("CT*.dcm"))]


def _two_homes_and_a_study(tmp_path: Path, files: list[bytes]) -> tuple[int, Home, Home, Study]:
    """A random seed; a sender and a receiver that trust each other; a CT study to send."""
    seed = random.randrange(1 << 16)
    sender, receiver = _make_home(tmp_path, "rural"), _make_home(tmp_path, "neuro")
    _introduce(sender, receiver)
    return seed, sender, receiver, _ct_study(sender, files)


def _kill_point(seed: int, study: Study) -> int:
    """Instances stored before the kill: late enough that starting over would resend more
    than the window, early enough to leave work to resume."""
    per_instance = study.chunks / SLICES
    return random.Random(seed).randint(int(FETCH_WINDOW / per_instance) + 2, SLICES - 8)


def _receiver_killed(
    procs: list[NodeProcess],
    sender: Home,
    receiver: Home,
    study: Study,
    kill_at: int,
    why: str,
    **send: bool,
) -> NodeProcess:
    """A fetch and a send started, the fetch killed once ``kill_at`` instances are stored:
    every instance its store lists is whole and verifies, and some are still missing.
    Returns the send, still running."""
    procs.append(fetching := _fetch(receiver, sender))
    procs.append(sending := _send(sender, receiver, study, **send))
    fetching.wait_until(lambda: fetching.instances_done >= kill_at, 60, "half stored")
    fetching.kill()
    before = _stored(receiver, study)
    assert kill_at <= len(before) < SLICES, why
    return sending


def _finished(fetching: NodeProcess, sending: NodeProcess, why: str) -> int:
    """The chunks the (restarted) send sent, once both processes finished well."""
    assert fetching.finish(25) == 0, f"{why}\n{fetching.log}"
    assert sending.finish(20) == 0, f"{why}\n{sending.log}"
    return sending.bulk_sent


def _all_stored_and_at_most_a_window_resent(
    receiver: Home, study: Study, sent: int, why: str
) -> None:
    assert _stored(receiver, study) == study.by_hash, why
    assert sent <= study.chunks + FETCH_WINDOW, f"{why}: {sent} of {study.chunks} chunks"


def test_receiver_killed_and_restarted_asks_for_its_transfer_and_resends_at_most_the_window(
    tmp_path: Path, ct_files: list[bytes]
) -> None:
    """The sender never re-offers on its own here: the restarted fetch must ask."""
    seed, sender, receiver, study = _two_homes_and_a_study(tmp_path, ct_files)
    kill_at = _kill_point(seed, study)
    why = f"seed {seed}, receiver killed after {kill_at} of {SLICES} instances"
    with processes() as procs:
        sending = _receiver_killed(procs, sender, receiver, study, kill_at, why, reoffer=False)
        procs.append(fetching := _fetch(receiver, sender))
        sent = _finished(fetching, sending, why)
    _all_stored_and_at_most_a_window_resent(receiver, study, sent, why)


def test_both_commands_run_again_after_a_receiver_kill_send_only_what_is_missing(
    tmp_path: Path, ct_files: list[bytes]
) -> None:
    """The operator's way today: `send` is stopped too, and both are run again."""
    seed, sender, receiver, study = _two_homes_and_a_study(tmp_path, ct_files)
    kill_at = _kill_point(seed, study)
    why = f"seed {seed}, receiver killed after {kill_at} of {SLICES} instances"
    with processes() as procs:
        sending = _receiver_killed(procs, sender, receiver, study, kill_at, why)
        sending.kill()
        first = sending.bulk_sent
        procs.append(fetching := _fetch(receiver, sender))
        procs.append(sending := _send(sender, receiver, study))
        sent = first + _finished(fetching, sending, why)
    _all_stored_and_at_most_a_window_resent(receiver, study, sent, why)


def test_sender_killed_mid_transfer_and_restarted_the_receiver_resumes(
    tmp_path: Path, ct_files: list[bytes]
) -> None:
    seed, sender, receiver, study = _two_homes_and_a_study(tmp_path, ct_files)
    kill_at = _kill_point(seed, study)
    # Killed by its own count of chunks sent (printed before each leaves), not by what the
    # receiver has stored: a receiver slower to store than the sender to send could
    # otherwise get every chunk before the kill, finish and exit, and the restarted
    # sender would find nobody to send to.
    kill_chunks = int(kill_at * study.chunks / SLICES)
    why = f"seed {seed}, sender killed after {kill_chunks} of {study.chunks} chunks"

    def sent_enough() -> bool:
        fetching.pump()  # keep the receiver's pipes drained meanwhile
        return sending.bulk_sent >= kill_chunks

    with processes() as procs:
        procs.append(fetching := _fetch(receiver, sender))
        procs.append(sending := _send(sender, receiver, study))
        sending.wait_until(sent_enough, 60, "partly sent")
        sending.kill()
        first = sending.bulk_sent
        assert first < study.chunks, why
        assert len(_stored(receiver, study)) < SLICES, why
        procs.append(sending := _send(sender, receiver, study))
        sent = first + _finished(fetching, sending, why)
    _all_stored_and_at_most_a_window_resent(receiver, study, sent, why)


class CountingLink(ChannelLink):
    """A ChannelLink that counts the chunks it sends."""

    def __init__(self, conn: PeerConnection) -> None:
        super().__init__(conn)
        self.bulk_sent = 0

    async def send_bulk(self, data: bytes) -> None:
        self.bulk_sent += 1
        await super().send_bulk(data)


async def _kill_link(conn: PeerConnection) -> None:
    """Fail the link under the session, as a failed link would close."""
    await kill_link(conn)


# Chunks in flight: a study of SERIES slices (three chunks each) spans three windows, and a
# chunk is answered well within the request timeout.
WINDOW = 4
SERIES = 4
REQUEST_TIMEOUT = 2.0


async def _transfer_killing_a_link(
    study: PreparedStudy, conns: tuple[PeerConnection, PeerConnection], kill_at: int,
    victim: PeerConnection, spool: Path,
) -> tuple[Progress, State, MemoryStore, int]:  # fmt: skip
    """One transfer from conns[0] to conns[1]; ``victim``'s link is killed when chunk
    ``kill_at`` reaches the receiver. Returns the outcome, the store and the chunks sent."""
    link_a, link_b = CountingLink(conns[0]), ChannelLink(conns[1])
    store = MemoryStore()
    receiver = StudyReceiver(link_b, spool, store, "peer-a", window=WINDOW, timeout=REQUEST_TIMEOUT)
    sender = StudySender(study, link_a)
    arrived = 0
    killed: list[asyncio.Task[None]] = []

    def on_bulk(data: bytes) -> None:
        nonlocal arrived
        receiver.on_bulk(data)
        arrived += 1
        if arrived == kill_at:
            killed.append(asyncio.create_task(_kill_link(victim)))

    link_a.attach(sender.on_control, lambda _d: None)
    link_b.attach(receiver.on_control, on_bulk)
    progress, state = await asyncio.wait_for(asyncio.gather(receiver.run(), sender.run()), 20)
    await asyncio.gather(*killed)
    assert killed, "the link was never killed"
    return progress, state, store, link_a.bulk_sent


async def test_connections_killed_at_random_points_every_study_completes_byte_exact(
    tmp_path: Path,
) -> None:
    seed = random.randrange(1 << 16)
    rng = random.Random(seed)
    transfers, sent, chunks = 5, 0, 0
    async with mesh() as m:
        a, b = await m.node(), await m.node()
        m.trust(a, b)
        conns = (await a.connect(b.identity.public_key), await b.accept(10))
        for n in range(transfers):
            files = ct_series(SERIES, seed=seed + n, size=512)
            study = await PreparedStudy.from_files(files, a.identity)
            total = sum(d.chunk_count(study.manifest.chunk_size) for d in study.declared.values())
            kill_at = rng.randint(1, total)
            side = rng.randrange(2)
            why = f"seed {seed}, transfer {n}: {('sender', 'receiver')[side]}'s link killed "
            why += f"when chunk {kill_at} of {total} arrived"
            try:
                progress, state, store, count = await _transfer_killing_a_link(
                    study, conns, kill_at, conns[side], tmp_path / f"spool{n}"
                )
            except TimeoutError:
                pytest.fail(f"{why}: the transfer did not finish in 20 s")
            assert state is State.COMPLETE, why
            assert progress.instances_done == len(files), why
            assert sorted(store.by_hash.values()) == sorted(files), why
            sent += count
            chunks += total
    # Each kill loses at most the window of chunks in flight.
    assert sent <= chunks + transfers * WINDOW, f"seed {seed}: {sent} chunks sent for {chunks}"
