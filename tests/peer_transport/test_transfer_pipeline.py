"""The receiver's decode/store pipeline holds at most ``commit_depth`` decoded instances.

Decoding runs in worker threads (one or more) and storing in another (instances decode
while the one before is sealed and fsynced). Between the two, decoded instances are
whole files in memory: this is where the receiver's memory could grow with the study if
the store fell behind, so the bound is checked here with a store that does not return,
with one decoding thread and with three, and in bytes for big instances.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from pathlib import Path

import pytest

from bench.bench_codec import ct_series
from crypto.identity import Identity
from peer_transport.transfer import runner
from peer_transport.transfer.machine import State
from peer_transport.transfer.prepared import PreparedStudy
from peer_transport.transfer.receiver import Receiver
from peer_transport.transfer.runner import StudyReceiver, StudySender, verify_threads
from tests.peer_transport.transfer_links import MemoryStore, memory_pair

INSTANCES = 8


class HeldStore(MemoryStore):
    """A store that holds its first add until released; counts what reached it."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.adds = 0
        self.lock = threading.Lock()

    def add_bytes(self, data: bytes, *, source: str, warm: bool = True) -> str:
        with self.lock:
            self.adds += 1
        self.release.wait(30)  # bounded: a broken test must not hang the run
        return super().add_bytes(data, source=source, warm=warm)


class Held:
    """Decoded instances not yet stored, counted from the decode and store threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.decoded = 0
        self.now = 0
        self.most = 0

    def one_more(self) -> None:
        with self.lock:
            self.decoded += 1
            self.now += 1
            self.most = max(self.most, self.now)

    def one_less(self) -> None:
        with self.lock:
            self.now -= 1


def test_a_receiver_decodes_on_a_thread_per_core_within_bounds() -> None:
    assert 1 <= verify_threads() <= 4


@pytest.mark.parametrize(("threads", "big"), [(1, False), (3, False), (3, True)])
async def test_a_stalled_store_holds_the_decoders_at_commit_depth_instances(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int, big: bool
) -> None:
    if big:  # instances too big to hold more than two of at once, whatever the threads
        monkeypatch.setattr(runner, "COMMIT_BYTES", 1)
    held = Held()
    verify, store_one = StudyReceiver._verify, StudyReceiver._store

    def counting_verify(receiver: Receiver, index: int) -> bytes | Exception:
        data = verify(receiver, index)
        held.one_more()
        return data

    def counting_store(self: StudyReceiver, data: bytes) -> Exception | None:
        try:
            return store_one(self, data)
        finally:
            held.one_less()

    monkeypatch.setattr(StudyReceiver, "_verify", staticmethod(counting_verify))
    monkeypatch.setattr(StudyReceiver, "_store", counting_store)

    files = ct_series(INSTANCES, seed=21, size=64)
    study = await PreparedStudy.from_files(files, Identity.generate())
    a, b = memory_pair()
    store = HeldStore()
    receiver = StudyReceiver(b, tmp_path / "spool", store, "peer-a", threads=threads)
    assert receiver.commit_depth == threads + 1  # one per decoder, and the one being stored
    depth = 2 if big else receiver.commit_depth
    sender = StudySender(study, a)
    a.on_control, b.on_control, b.on_bulk = sender.on_control, receiver.on_control, receiver.on_bulk
    b.start()
    run = asyncio.gather(receiver.run(), sender.run())
    try:
        # Every instance arrives (chunks go to the spool, not memory) while the store
        # holds the first one.
        for _ in range(2000):
            if receiver.protocol is not None and len(receiver.protocol.ready) == INSTANCES:
                break
            await asyncio.sleep(0.01)
        assert receiver.protocol is not None
        assert len(receiver.protocol.ready) == INSTANCES
        await asyncio.sleep(0)  # the last commit tasks take their first step
        # A canary on every decode thread at once (each waits for all the others, so each
        # thread holds one): every decode handed to them before it is done.
        loop = asyncio.get_running_loop()
        barrier = threading.Barrier(threads)
        await asyncio.gather(
            *(loop.run_in_executor(receiver._executor, barrier.wait, 10) for _ in range(threads))
        )

        # The first instance is in the store, the next ones decoded behind it (the
        # overlap), and no other instance was decoded into memory.
        assert store.adds == 1
        assert held.decoded == depth
        assert held.now == depth
    finally:
        store.release.set()
        progress, state = await asyncio.wait_for(run, 30)
        assert b.pump is not None
        b.pump.cancel()
    assert state is State.COMPLETE
    assert progress.instances_done == INSTANCES
    assert sorted(store.by_hash.values()) == sorted(files)
    assert held.most == depth


@pytest.mark.skipif(sys.platform != "linux", reason="a thread's own priority is Linux's")
async def test_decoding_threads_run_below_the_event_loop(tmp_path: Path) -> None:
    _a, b = memory_pair()
    receiver = StudyReceiver(b, tmp_path / "spool", MemoryStore(), "peer-a", threads=2)
    loop_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def own_nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    try:
        decoder = await asyncio.get_running_loop().run_in_executor(receiver._executor, own_nice)
    finally:
        receiver._executor.shutdown()
    assert decoder == min(19, loop_nice + runner.DECODE_NICE)
    assert own_nice() == loop_nice  # the event loop's thread is left as it was
