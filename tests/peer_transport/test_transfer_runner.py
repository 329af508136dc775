"""The transfer runner moves a study through a link into a store, byte-exact."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.uid import generate_uid

from bench import bench_transfer as rtc_link
from bench.bench_codec import ct_instance, ct_series
from crypto.identity import Identity
from node.dicom import wirecodec
from peer_transport.transfer import serving as transfer_serving
from peer_transport.transfer.machine import State
from peer_transport.transfer.prepared import PreparedStudy
from peer_transport.transfer.progress import Progress
from peer_transport.transfer.runner import StudyReceiver, StudySender, receive_study
from peer_transport.transfer.spool import SenderSpool
from tests.peer_transport.transfer_links import (
    MemoryLink,
    MemoryStore,
    attached,
    memory_pair,
    pumps_stopped,
)


async def test_in_memory_transfer_stores_every_instance_and_reports_progress(
    tmp_path: Path,
) -> None:
    files = ct_series(5, seed=11, size=128)
    study = await PreparedStudy.from_files(files, Identity.generate())
    a, b = memory_pair()
    store = MemoryStore()
    seen: list[Progress] = []
    sender, receiver = attached(study, a, b, tmp_path / "spool", store, on_progress=seen.append)
    with pumps_stopped(a, b):
        progress, state = await asyncio.wait_for(asyncio.gather(receiver.run(), sender.run()), 20)
    assert state is State.COMPLETE
    assert sorted(store.by_hash.values()) == sorted(files)
    assert progress.instances_done == 5
    assert [p.instances_done for p in seen] == [1, 2, 3, 4, 5]


class RecordingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.added: list[tuple[str, bool]] = []  # (source, warm)

    def add_bytes(self, data: bytes, *, source: str, warm: bool = True) -> str:
        self.added.append((source, warm))
        return super().add_bytes(data, source=source, warm=warm)


async def test_a_received_study_is_stored_unwarmed_under_its_peers_source(
    tmp_path: Path,
) -> None:
    # The receiver tells the store not to warm the wire cache (it is busy); the source
    # names the peer for audit and retention, and the store no longer reads it.
    files = ct_series(3, seed=12, size=64)
    study = await PreparedStudy.from_files(files, Identity.generate())
    a, b = memory_pair()
    store = RecordingStore()
    seen: list[StudyReceiver] = []
    receiving = asyncio.create_task(
        receive_study(b, store, tmp_path / "spool", peer="alice", on_receiver=seen.append)
    )
    await asyncio.sleep(0)  # attached before the offer goes out
    [receiver] = seen
    assert receiver.manifest is None
    assert receiver.progress() is None
    assert receiver.state is State.OFFERED
    sender = StudySender(study, a)
    a.on_control = sender.on_control
    try:
        progress, state = await asyncio.wait_for(asyncio.gather(receiving, sender.run()), 20)
    finally:
        assert b.pump is not None
        b.pump.cancel()
    assert (state, sender.state, receiver.state) == (State.COMPLETE,) * 3
    assert receiver.manifest == sender.manifest == study.manifest
    assert progress.instances_done == 3
    assert store.added == [("peer:alice", False)] * 3


async def test_files_from_two_studies_are_refused() -> None:
    files = ct_series(1, seed=1, size=32) + ct_series(1, seed=2, size=32)
    with pytest.raises(wirecodec.BadInstance, match="2 studies"):
        await PreparedStudy.from_files(files, Identity.generate())


@pytest.mark.slow
async def test_real_aiortc_loopback_transfers_a_ct_study_byte_exact(tmp_path: Path) -> None:
    files = ct_series(6, seed=21, size=512)  # 18 chunks
    study = await PreparedStudy.from_files(files, Identity.generate())
    pc_a, link_a, pc_b, link_b = await rtc_link.pair()
    store = MemoryStore()
    sender, receiver = attached(study, link_a, link_b, tmp_path / "spool", store)
    try:
        wanted = study.manifest.entries[-1].sop_instance_uid
        progress, state, _ = await asyncio.wait_for(
            asyncio.gather(receiver.run(), sender.run(), receiver.instance(wanted)), 60
        )
    finally:
        with contextlib.suppress(Exception):
            await pc_a.close()
            await pc_b.close()
    assert state is State.COMPLETE
    assert sorted(store.by_hash.values()) == sorted(files)
    assert progress.bytes_done == sum(len(f) for f in files)


async def test_receiver_crash_mid_transfer_resumes_and_resends_at_most_the_window(
    tmp_path: Path,
) -> None:
    files = ct_series(8, seed=31, size=512)  # about three chunks per instance
    study = await PreparedStudy.from_files(files, Identity.generate())
    total_chunks = sum(d.chunk_count(study.manifest.chunk_size) for d in study.declared.values())
    store = MemoryStore()
    window = 4
    sent = 0
    for attempt in range(2):
        a, b = memory_pair()
        halfway = asyncio.Event()

        def note(p: Progress, halfway: asyncio.Event = halfway) -> None:
            if p.instances_done >= 3:
                halfway.set()

        receiver = StudyReceiver(b, tmp_path / "spool", store, "peer-a", note, window=window)
        sender = StudySender(study, a)
        a.on_control, b.on_control, b.on_bulk = (
            sender.on_control,
            receiver.on_control,
            receiver.on_bulk,
        )
        b.start()
        tasks = [asyncio.create_task(receiver.run()), asyncio.create_task(sender.run())]
        try:
            if attempt == 0:
                await asyncio.wait_for(halfway.wait(), 20)  # then the receiver "crashes"
            else:
                await asyncio.wait_for(asyncio.gather(*tasks), 20)
        finally:
            for task in [*tasks, b.pump]:
                assert task is not None
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        sent += sender.protocol.chunks_sent
        if attempt == 0:
            assert 3 <= len(store.by_hash) < len(files)
    assert sorted(store.by_hash.values()) == sorted(files)
    assert sent <= total_chunks + window


@pytest.mark.parametrize("asks", [True, False], ids=["asks", "old-peer-waits-for-reoffer"])
async def test_restarted_receiver_gets_its_transfer_back_from_the_sender_still_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, asks: bool
) -> None:
    """A receiver that knows its sender asks for the transfer (here the sender never
    offers again on its own); one that does not (an older peer) gets the re-offer."""
    monkeypatch.setattr(transfer_serving, "REOFFER_AFTER", 3600.0 if asks else 0.2)
    identity = Identity.generate()
    files = ct_series(12, seed=51, size=256)
    study = await PreparedStudy.from_files(files, identity)
    key = identity.public_key if asks else None
    store = MemoryStore()
    halfway = asyncio.Event()

    def note(p: Progress) -> None:
        if p.instances_done >= 3 and not halfway.is_set():
            halfway.set()  # the receiving process dies now: nothing reaches it any more
            b.on_control = b.on_bulk = lambda _data: None
            receiving.cancel()

    a, b = memory_pair()
    first = StudyReceiver(b, tmp_path / "spool", store, "peer-a", note, window=4, sender_key=key)
    sender = StudySender(study, a)
    a.on_control, b.on_control, b.on_bulk = sender.on_control, first.on_control, first.on_bulk
    b.start()
    sending = asyncio.create_task(sender.run())
    receiving = asyncio.create_task(first.run())
    pumps = [b.pump]
    try:
        await asyncio.wait_for(halfway.wait(), 20)
        await asyncio.gather(receiving, return_exceptions=True)
        assert 3 <= len(store.by_hash) < len(files)  # killed mid-transfer

        again = MemoryLink()  # the restarted process on the same connection
        a.peer, again.peer = again, a
        second = StudyReceiver(again, tmp_path / "spool", store, "peer-a", window=4, sender_key=key)
        again.attach(second.on_control, second.on_bulk)
        pumps.append(again.pump)
        progress, state = await asyncio.wait_for(asyncio.gather(second.run(), sending), 20)
    finally:
        for task in [sending, *pumps]:
            assert task is not None
            task.cancel()
    assert state is State.COMPLETE
    assert progress.instances_done == len(files)
    assert sorted(store.by_hash.values()) == sorted(files)


async def test_study_moves_between_two_real_stores_and_both_audit_logs_record_it(
    tmp_path: Path,
) -> None:
    from node.core.audit import AuditLog
    from node.dicom.store import Store
    from peer_transport.transfer.runner import receive_study, send_study

    alice, bob = Identity.generate(), Identity.generate()
    files = ct_series(4, seed=41, size=128)
    with (
        Store.open(tmp_path / "a", bytes(32)) as store_a,
        Store.open(tmp_path / "b", bytes(range(32))) as store_b,
        AuditLog.open(tmp_path / "a.audit", alice) as audit_a,
        AuditLog.open(tmp_path / "b.audit", bob) as audit_b,
    ):
        study_uid = {store_a.add_bytes(f, source="test").study_uid for f in files}.pop()
        a, b = memory_pair()
        receiving = asyncio.create_task(
            receive_study(b, store_b, tmp_path / "spool", peer="alice", audit=audit_b)
        )
        await asyncio.sleep(0)
        sending = send_study(
            a, store_a, study_uid, alice, peer="bob", audit=audit_a, spool_dir=tmp_path / "outgoing"
        )
        sender_state = asyncio.create_task(sending)
        try:
            progress = await asyncio.wait_for(receiving, 20)
            assert not list((tmp_path / "outgoing").iterdir())  # sender spool deleted
            state = await asyncio.wait_for(sender_state, 20)
        finally:
            for pump in (a.pump, b.pump):
                if pump is not None:
                    pump.cancel()
        assert state is State.COMPLETE
        assert progress.instances_done == 4
        for row in store_a.instances(study_uid):
            uid = row.sop_instance_uid
            assert store_b.read_instance(uid) == store_a.read_instance(uid)
        sent = audit_a.records(kind="transfer")
        received = audit_b.records(kind="receive")
        assert [r.details["outcome"] for r in sent] == ["complete"]
        assert [(r.peer, r.details["instances"]) for r in received] == [("alice", 4)]
        assert audit_b.verify().ok


class HashStore:
    """Keeps only hashes: what the transfer itself holds in memory is what is measured."""

    def __init__(self) -> None:
        self.hashes: set[str] = set()

    def has_hash(self, content_hash: str) -> bool:
        return content_hash in self.hashes

    def add_bytes(self, data: bytes, *, source: str, warm: bool = True) -> None:
        self.hashes.add(hashlib.sha256(data).hexdigest())


def _slices(n: int) -> Iterator[bytes]:
    rng = np.random.default_rng(n)
    study, series = generate_uid(), generate_uid()
    return (ct_instance(rng, study, series, i, size=256) for i in range(n))


async def _peak_traced_transfer(tmp_path: Path, n: int) -> tuple[int, int]:
    """Python heap peak of a whole streamed transfer (sender spool, receiver, spool)."""
    spool = SenderSpool(tmp_path / f"out{n}")
    tracemalloc.start()
    try:
        study = await PreparedStudy.from_source(
            _slices(n), Identity.generate(), spool, count=n, total=n << 20, source=b""
        )
        a, b = memory_pair()
        store = HashStore()
        sender, receiver = attached(study, a, b, tmp_path / f"in{n}", store)
        with pumps_stopped(a, b):
            await asyncio.wait_for(asyncio.gather(receiver.run(), sender.run()), 60)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        spool.close()
    assert len(store.hashes) == n
    return peak, study.manifest.total_size


async def test_memory_of_a_streamed_transfer_does_not_grow_with_the_study(
    tmp_path: Path,
) -> None:
    await _peak_traced_transfer(tmp_path, 2)  # first use: imports and caches
    small, small_bytes = await _peak_traced_transfer(tmp_path, 8)
    large, large_bytes = await _peak_traced_transfer(tmp_path, 32)
    grown = large_bytes - small_bytes  # ~3 MB more study; holding it would show
    assert large - small < grown / 4, (small, large, grown)


def test_sender_spool_seals_what_it_keeps_and_leaves_nothing_behind(tmp_path: Path) -> None:
    wire = b"PATIENT^NAME " * 1000
    spool = SenderSpool(tmp_path)
    assert spool.root.parent == tmp_path
    assert spool.root.stat().st_mode & 0o077 == 0
    slots = [spool.put(wire), spool.put(wire[::-1])]
    assert [spool.get(s) for s in slots] == [wire, wire[::-1]]
    assert b"PATIENT" not in (spool.root / "wires").read_bytes()
    spool.close()
    assert list(tmp_path.iterdir()) == []
    # A spool left by a process that died is removed when the next one is made.
    orphan = tmp_path / "send-999999999-x"
    orphan.mkdir()
    SenderSpool(tmp_path).close()
    assert list(tmp_path.iterdir()) == []


def test_a_closed_sender_spool_is_not_written_through_a_reused_descriptor(
    tmp_path: Path,
) -> None:
    """A send cancelled while a worker thread still spools for it (cancelling a task does
    not stop its thread), then served again at once: the new spool is likely to get the
    old one's descriptor number. The old thread's late write must not land in it."""
    from peer_transport.transfer.errors import LocalTransferError

    old = SenderSpool(tmp_path)
    old.put(b"first " * 100)
    old.close()  # the cancelled send
    new = SenderSpool(tmp_path)  # the peer fetched again
    wire = b"the new transfer's encoding " * 50
    slot = new.put(wire)
    with contextlib.suppress(LocalTransferError):
        old.put(b"late " * 500)  # the old describe/encode thread, still running
    assert new.get(slot) == wire  # not overwritten
    with pytest.raises(LocalTransferError, match="closed"):
        old.put(b"late " * 500)
    with pytest.raises(LocalTransferError, match="closed"):
        old.get(0)
    new.close()


async def test_a_cancel_while_an_instance_is_read_back_does_not_fetch_it_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cancel drops the spool's parts, also the one a worker is reading back: that
    read fails, and it is the cancel's doing, not damage. The instance is not rejected
    (no "fetching it again", no journal rewritten into a spool that is going away)."""
    import logging
    import threading

    from peer_transport.transfer import TransferCancelled
    from peer_transport.transfer.receiver import JOURNAL_FILE

    reading, go_on = threading.Event(), threading.Event()
    verify = StudyReceiver._verify
    held: list[int] = []

    def held_verify(receiver: Any, index: int) -> bytes | Exception:
        held.append(index)
        reading.set()
        go_on.wait(20)  # bounded: released by the test right after its cancel
        return verify(receiver, index)

    monkeypatch.setattr(StudyReceiver, "_verify", staticmethod(held_verify))
    files = ct_series(4, seed=13, size=64)
    study = await PreparedStudy.from_files(files, Identity.generate())
    a, b = memory_pair()
    sender, receiver = attached(study, a, b, tmp_path / "spool", MemoryStore())
    caplog.set_level(logging.INFO, logger="peer_transport.transfer.runner")
    receiving = asyncio.create_task(receiver.run())
    serving = asyncio.create_task(sender.run())
    try:
        await asyncio.wait_for(asyncio.to_thread(reading.wait, 20), 20)
        assert receiver.protocol is not None
        assert receiver.protocol.spool.has_part(held[0])
        receiver.cancel()  # drops the part being read
        assert not receiver.protocol.spool.has_part(held[0])
        journal = (tmp_path / "spool" / JOURNAL_FILE).read_bytes()
        go_on.set()
        with pytest.raises(TransferCancelled):
            await asyncio.wait_for(receiving, 20)  # waits for the read's outcome first
        assert await asyncio.wait_for(serving, 20) is State.CANCELLED
    finally:
        go_on.set()
        for link in (a, b):
            assert link.pump is not None
            link.pump.cancel()
    assert receiver.protocol._attempts == {}
    assert not [r for r in caplog.records if "fetching it again" in r.getMessage()]
    assert (tmp_path / "spool" / JOURNAL_FILE).read_bytes() == journal
