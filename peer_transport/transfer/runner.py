"""Runs the sans-IO transfer protocol over a link: :class:`StudyReceiver` (and
:class:`~peer_transport.transfer.serving.StudySender`, re-exported here), and
:func:`send_study` / :func:`receive_study` that put a store and an audit log at each end.

The link is anything with ``send_control(bytes)`` and ``send_bulk(bytes)``
coroutines (:class:`TransferLink`); ``send_bulk`` must wait while the bulk queue
is full, which is where backpressure comes from. Incoming messages are handed to
:meth:`StudySender.on_control` / :meth:`StudyReceiver.on_control` /
:meth:`StudyReceiver.on_bulk` by whoever dispatches the connection's events.
Requests travel on the control channel, chunks on the bulk channel.

Received chunks are verified and written to the spool as they arrive (nothing
queues in memory), and instances go to an :class:`InstanceStore`
(``node.dicom.store.Store`` fits: ``has_hash(hex)`` and ``add_bytes(data, source=...,
warm=False)``: what arrives from a peer is not coded into the wire cache while the
receiver is busy) only after their hash is verified. Decoding runs in worker threads
(:func:`verify_threads`), storing (a sealed write, an fsync) in another: the event loop
keeps receiving, at most ``commit_depth`` decoded instances are in memory, however long
the study. Instances are stored as their decoding ends (each committed on its own; a
restart asks the store what it holds), not always in series order.

The sender streams too (:class:`~peer_transport.transfer.prepared.PreparedStudy`): it
offers the signed manifest before encoding anything, then encodes in series order
(``ahead`` at a time, into a sealed spool) while it serves, declaring each encoding as
it is made; the receiver fetches what is declared.

Why one module: the receiver's run loop, its commit pipeline (threads, memory bound,
failures) and the helpers that put a store and an audit log at each end are one flow.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from crypto.identity import Identity
from node.dicom import wirecodec
from node.dicom.store import InstanceConflict
from peer_transport.transfer.audit import AuditSink, ReceivedRecord, SentRecord
from peer_transport.transfer.errors import (
    ChunkRejected,
    IllegalTransition,
    LocalTransferError,
    MalformedMessage,
    ManifestMismatch,
    RemoteTransferError,
    TransferCancelled,
    TransferError,
)
from peer_transport.transfer.machine import ACTIVE, Event, State
from peer_transport.transfer.manifest import Manifest
from peer_transport.transfer.messages import (
    Cancel,
    Chunk,
    Declare,
    Finished,
    OfferAssembler,
    OfferPart,
    from_wire,
)
from peer_transport.transfer.prepared import (
    PreparedStudy,
)
from peer_transport.transfer.progress import Progress
from peer_transport.transfer.receiver import (
    DEFAULT_TIMEOUT,
    DEFAULT_WINDOW,
    Receiver,
    resume_request,
)
from peer_transport.transfer.serving import StudySender, TransferLink
from peer_transport.transfer.spool import SenderSpool, Spool

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.05
STATE_EVERY = 1.0  # seconds between rewrites of the spool's state file while storing
RESUME_ASKS = 6  # times a restarted receiver asks for its transfer before it only waits
_M_MMAP_THRESHOLD, LARGE_BLOCK = -3, 4 << 20  # blocks from 4 MiB on are mmapped by glibc
MAX_VERIFY_THREADS = 4  # past this the event loop feeding SCTP is the bound, not decoding
DECODE_NICE = 5  # decoding threads' niceness, added to the event loop's
COMMIT_BYTES = 64 << 20  # decoded bytes in memory past two instances (big ones: two at most)
# Bytes of wire declarations kept that come between the offer and the receiver's start
# (all of a 100,000-instance study declared at once is about 5 MiB); past it, dropped
# ones are recovered by hurries.
EARLY_DECLARATIONS = 8 << 20


def verify_threads() -> int:
    """Threads a receiver decodes on: one per core, at most MAX_VERIFY_THREADS (JPEG-LS,
    zstd, hashes and cipher release the GIL; one thread capped it near 20 wire MB/s)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(MAX_VERIFY_THREADS, cores or 1))


def _yield_to_the_loop() -> None:
    """Run this decoding thread DECODE_NICE nicer than the loop (Linux: a thread's own), so
    the event loop feeding SCTP gets a core first: when decoders take its CPU, SACKs
    and window updates wait and the flow stalls (1.11-1.29x the rate over 14 rounds, in
    10 of them ahead); decoding then uses what the loop leaves."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            tid = threading.get_native_id()  # relative: a node run under nice stays lower
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + DECODE_NICE)


class InstanceStore(Protocol):
    def has_hash(self, content_hash: str) -> bool: ...

    def add_bytes(self, data: bytes, *, source: str, warm: bool) -> Any: ...


ProgressCallback = Callable[[Progress], None]


class StudyReceiver:
    """Fetches one offered study into a store, resuming from its spool directory."""

    def __init__(
        self,
        link: TransferLink,
        spool_dir: Path,
        store: InstanceStore,
        source: str,
        on_progress: ProgressCallback | None = None,
        window: int = DEFAULT_WINDOW,
        timeout: float = DEFAULT_TIMEOUT,
        sender_key: bytes | None = None,
        expect_study: str | None = None,
        spool_key: bytes | None = None,
        threads: int | None = None,
    ) -> None:
        self.link = link
        self.spool_dir = spool_dir
        self.spool_key = spool_key  # seals the spool (the node's, so a restart resumes)
        # Instances not stored because the store holds their UID with other bytes.
        self.conflicts: list[InstanceConflict] = []
        # Why the transfer failed, for run() to raise: a commit task's own exception may
        # be gone with the task (pending tasks drop out of their set when done).
        self._failure: TransferError | None = None
        self.sender_key = sender_key  # the link's peer: asked at once for an unfinished spool
        # Take only an offer of this study (other transfers may share the connection).
        self.expect_study = expect_study
        self.store = store
        self.source = source
        self.on_progress = on_progress
        self.window = window
        self.timeout = timeout
        self.protocol: Receiver | None = None
        self._offer = OfferAssembler()
        self._transfer_id: bytes | None = None  # of the offer taken
        self._early: list[Declare] = []  # its declarations that came before the receiver
        self._early_bytes = 0
        self._manifest: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending: set[asyncio.Task[None]] = set()
        self._over = False  # run() has returned: chunks are no longer spooled
        self._stored: dict[int, asyncio.Event] = {}
        self._declared = asyncio.Event()  # set at each declaration taken (and at the end)
        self._wake = asyncio.Event()
        self._started = asyncio.Event()
        # Instances decoding, decoded or being stored: one per decoder and one in the store.
        self.threads = verify_threads() if threads is None else max(1, threads)
        self.commit_depth = self.threads + 1
        self._executor = ThreadPoolExecutor(
            self.threads, thread_name_prefix="transfer-verify", initializer=_yield_to_the_loop
        )
        self._store_executor = ThreadPoolExecutor(1, thread_name_prefix="transfer-store")
        self._admit, self._freed, self._held = asyncio.Lock(), asyncio.Event(), (0, 0)
        _return_large_blocks()

    # what the screen reads

    @property
    def manifest(self) -> Manifest | None:
        """The signed manifest, once the offer is taken (None while waiting for it), with
        the entries declared so far (``Receiver.view``)."""
        return None if self.protocol is None else self.protocol.view()

    @property
    def state(self) -> State:
        """The transfer's state; OFFERED until the offer is taken and accepted."""
        return State.OFFERED if self.protocol is None else self.protocol.state

    def progress(self) -> Progress | None:
        """How far the study has come; None before the offer is taken."""
        return None if self.protocol is None else self.protocol.progress()

    # link input

    def on_control(self, data: bytes) -> None:
        message = from_wire(data)
        if isinstance(message, OfferPart):
            signed = self._offer.add(message)
            if signed is not None and not self._manifest.done() and self._expected(signed):
                self._transfer_id = message.transfer_id
                self._manifest.set_result(signed)
        elif isinstance(message, Declare):
            self._on_declare(message)
        elif isinstance(message, Cancel) and self.protocol is not None:
            with contextlib.suppress(IllegalTransition):
                self.protocol.machine.fire(Event.CANCEL)
            self._wake.set()

    def _on_declare(self, message: Declare) -> None:
        if message.transfer_id != self._transfer_id:
            return  # another transfer's on this connection, or before the offer: not ours
        receiver = self.protocol
        if receiver is None or not self._started.is_set():
            if self._early_bytes + len(message.data) <= EARLY_DECLARATIONS:
                self._early.append(message)
                self._early_bytes += len(message.data)
            return
        try:
            refused = receiver.declare(message, asyncio.get_running_loop().time())
        except RemoteTransferError as exc:  # forged, another transfer's, contradicting
            log.warning("transfer stopped: %s", exc)
            self._failure = self._failure or exc
            self._drop(exc)
        else:
            self._declared.set()
            for bomb in refused:
                log.warning("%s", bomb)
        self._wake.set()

    def _expected(self, signed: bytes) -> bool:
        if self.expect_study is None:
            return True
        with contextlib.suppress(MalformedMessage):
            return Manifest.open(signed)[1].study_instance_uid == self.expect_study
        return True  # a bad manifest is refused, with its reason, where it is opened

    def on_bulk(self, data: bytes) -> None:
        """Verify and spool a chunk at once: nothing waits in memory for the main loop."""
        chunk = from_wire(data)
        if not isinstance(chunk, Chunk):
            raise MalformedMessage("only chunks travel on the bulk channel")
        receiver = self.protocol
        if receiver is None or not self._started.is_set() or self._over:
            return  # nothing was requested yet, or the run is over
        if receiver.state not in ACTIVE:
            return  # cancelled or failed: chunks still in flight are dropped
        loop = asyncio.get_running_loop()
        try:
            index = receiver.receive(chunk, loop.time())
        except ChunkRejected as exc:
            log.info("%s", exc)
            return
        finally:
            self._wake.set()  # the window has room again
        if index is not None:
            self._commit_soon(receiver, index)

    def _commit_soon(self, receiver: Receiver, index: int) -> None:
        task = asyncio.get_running_loop().create_task(self._commit(receiver, index))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    # viewer

    async def instance(self, sop_instance_uid: str) -> None:
        """Move an instance to the front of the queue and wait until it is stored (its
        entry may not be declared yet: then it waits for that first).

        Raises LocalTransferError when the transfer ends without declaring it."""
        await self._started.wait()
        assert self.protocol is not None  # noqa: S101 -- set before _started
        while (index := self.protocol.find(sop_instance_uid)) is None:
            if self._over or self.protocol.state not in ACTIVE:
                raise LocalTransferError(f"instance {sop_instance_uid} is not in this study")
            self._declared.clear()
            await self._declared.wait()
        if index in self.protocol.done:
            return
        self.protocol.prioritise(index)
        self._wake.set()
        await self._stored.setdefault(index, asyncio.Event()).wait()

    # main loop

    async def run(self) -> Progress:
        """Fetch the whole study; return the final progress. Raises TransferError."""
        spool = Spool(self.spool_dir, self.spool_key)
        signed = await self._offered(spool)
        try:
            self.protocol = receiver = Receiver(
                signed,
                spool,
                have=lambda h: self.store.has_hash(h.hex()),
                window=self.window,
                timeout=self.timeout,
                # The store is asked again after a restart: no state rewrite per instance.
                state_every=STATE_EVERY,
            )
        except RemoteTransferError as exc:  # over budget, hostile UIDs, bad signature
            self._drop(exc)
            raise
        receiver.accept()
        self._started.set()
        for early in self._early:
            self._on_declare(early)
        self._early.clear()
        pending = self._pending
        for index in sorted(receiver.ready):  # fully received before a restart
            self._commit_soon(receiver, index)
        try:
            await self._loop(receiver, pending)
            for task in list(pending):
                await task
        finally:
            self._over = True
            self._declared.set()  # a viewer waiting for an entry learns it never came
            for task in pending:  # cancelled or failed: stop touching the spool
                task.cancel()
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._store_executor.shutdown(wait=False, cancel_futures=True)
            receiver.save_state()
            spool.close()  # the part files kept open for writing
        if self._failure is None and receiver.failure is not None:
            self._failure = receiver.failure  # an instance declared over budget
            self._drop(receiver.failure)
        if self._failure is not None:
            raise self._failure
        if receiver.state is State.COMPLETE:
            await self.link.send_control(Finished(receiver.manifest.transfer_id).to_wire())
        elif receiver.state is State.CANCELLED:
            raise TransferCancelled("the transfer was cancelled")
        return receiver.progress()

    async def _offered(self, spool: Spool) -> bytes:
        """The signed manifest. A receiver restarted with an unfinished spool from the
        link's peer asks for it (every ``timeout``, RESUME_ASKS times) rather than wait
        for the sender to offer again on its own."""
        ask = None if self.sender_key is None else resume_request(spool, self.sender_key)
        if ask is not None:
            for _ in range(RESUME_ASKS):
                await self.link.send_control(ask.to_wire())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.timeout):
                        return await asyncio.shield(self._manifest)
        return await self._manifest

    async def _loop(self, receiver: Receiver, pending: set[asyncio.Task[None]]) -> None:
        loop = asyncio.get_running_loop()
        while receiver.state in ACTIVE:
            self._wake.clear()
            for request in receiver.poll(loop.time()):
                await self.link.send_control(request.to_wire())
            if receiver.state in ACTIVE:
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL_INTERVAL):
                        await self._wake.wait()
            for task in [t for t in pending if t.done()]:
                task.result()  # re-raise a failed commit (ManifestMismatch)

    @staticmethod
    def _verify(receiver: Receiver, index: int) -> bytes | Exception:
        try:
            return receiver.verify_part(index)
        except (wirecodec.WireCodecError, OSError, RemoteTransferError) as exc:
            return exc

    def _store(self, data: bytes) -> Exception | None:
        try:
            self.store.add_bytes(data, source=self.source, warm=False)
        except InstanceConflict as exc:  # the stored instance stays; this one is reported
            return exc
        return None

    async def _verify_and_store(self, receiver: Receiver, index: int) -> Exception | None:
        # Decoded only when its turn to be stored is near, in the order taken: at most
        # commit_depth instances in memory however many are fully received, and past two
        # (one decoder's bound) only while their sizes add up to COMMIT_BYTES or less.
        loop = asyncio.get_running_loop()
        size = receiver.wires[index].entry.size
        async with self._admit:
            while self._held[0] >= 2 and (
                self._held[0] >= self.commit_depth or self._held[1] + size > COMMIT_BYTES
            ):
                self._freed.clear()
                await self._freed.wait()
            self._held = (self._held[0] + 1, self._held[1] + size)
        try:
            verify = functools.partial(self._verify, receiver, index)
            data = await loop.run_in_executor(self._executor, verify)
            if isinstance(data, Exception):
                return data
            return await loop.run_in_executor(
                self._store_executor, functools.partial(self._store, data)
            )
        finally:
            self._held = (self._held[0] - 1, self._held[1] - size)
            self._freed.set()

    def _drop(self, error: RemoteTransferError) -> None:
        """The sender misbehaved: it loses its connection (``ChannelLink.drop``)."""
        drop = getattr(self.link, "drop", None)
        if drop is not None:
            drop(error)

    async def _commit(self, receiver: Receiver, index: int) -> None:
        loop = asyncio.get_running_loop()
        failure = await self._verify_and_store(receiver, index)
        if isinstance(failure, RemoteTransferError):
            self._failure = receiver.refuse_part(index, failure)
            self._drop(failure)
            self._wake.set()
            return
        if isinstance(failure, InstanceConflict):
            log.warning("instance %d of the transfer was not stored: %s", index, failure)
            self.conflicts.append(failure)
            failure = None  # counted as done: fetching it again would not change it
        if failure is not None and receiver.state not in ACTIVE:
            # Cancelled while it was read: the cancel dropped its part under the reader.
            # Nothing is fetched again and the spool is not written: it is going away.
            return
        if failure is not None:
            error = receiver.reject_part(index, failure)
            if isinstance(error, ManifestMismatch):
                error.__cause__ = failure
                self._failure = error
                self._wake.set()
                return
            log.warning("%s", error)
            self._wake.set()
            return
        if receiver.state not in ACTIVE:
            return  # cancelled meanwhile: the instance is stored, the transfer is over
        receiver.stored(index, loop.time())
        waiting = self._stored.pop(index, None)  # only what the viewer waits for
        if waiting is not None:
            waiting.set()
        if self.on_progress is not None:
            self.on_progress(receiver.progress())
        self._wake.set()

    def pause(self, on: bool) -> bool:
        """Stop asking for chunks (those in flight still land), or go on; False if the
        transfer is not running (or not paused) now."""
        if self.protocol is None:
            return False
        try:
            if on:
                self.protocol.pause()
                self.protocol.save_state()
            else:
                self.protocol.resume_transfer()
        except IllegalTransition:
            return False
        self._wake.set()
        return True

    def cancel(self) -> None:
        if self.protocol is not None:
            cancel = self.protocol.cancel()
            task = asyncio.get_running_loop().create_task(self.link.send_control(cancel.to_wire()))
            task.add_done_callback(lambda _t: None)
        self._wake.set()


@functools.cache  # find_library runs ldconfig: once per process is enough
def _return_large_blocks() -> None:
    """Have glibc give every block of LARGE_BLOCK or more back to the system when freed.

    By default glibc raises its mmap threshold after each large free (to 32 MiB), and
    big instances come from the threads' heaps, which fragment and grow the RSS over a
    long study. At 128 KiB (before) a CT slice's buffers were mmapped and zero-filled
    anew: 300 page faults per slice, a tenth of the receiver's CPU. No-op off glibc.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(name).mallopt(_M_MMAP_THRESHOLD, LARGE_BLOCK)


# -- node-level helpers: a store and an audit log at each end ------------------------------


class StudySource(Protocol):
    """Where a sender reads a study from (``node.dicom.store.Store`` fits).

    A source with a ``wire_cache`` attribute (the store's) lends it to the encoder.
    """

    def instances(self, study_uid: str) -> Sequence[Any]: ...  # rows with .sop_instance_uid

    def read_instance(self, sop_instance_uid: str) -> bytes: ...


async def send_study(
    link: TransferLink,
    source: StudySource,
    study_uid: str,
    identity: Identity,
    *,
    peer: str,
    audit: AuditSink | None = None,
    prepare: Callable[[Iterable[bytes]], Iterable[bytes]] | None = None,
    clock: Callable[[], float] = time.time,
    on_sender: Callable[[StudySender], None] | None = None,
    spool_dir: Path | None = None,
) -> State:
    """Offer a stored study over ``link`` and serve it until the peer has it all.

    ``prepare`` may rewrite the files first (de-identification for sharing): it
    gets the files one at a time, in series order, as an iterator and yields them
    rewritten (it runs in worker threads, one file at a time); the offer waits for the
    first one only (its study UID), the rest are rewritten as they are encoded and
    their entries declared with their encodings. Without it the entries come from
    the store's records. The wire encodings
    are made while the study is served, into a sealed :class:`SenderSpool` under
    ``spool_dir`` (the system temp directory when None), deleted after.
    """
    rows = source.instances(study_uid)
    if not rows:
        raise LocalTransferError(f"study {study_uid} is not in the store")
    spool = SenderSpool(spool_dir)
    cache = getattr(source, "wire_cache", None)
    try:
        if prepare is None:
            study = PreparedStudy.from_store(source, study_uid, identity, spool, cache=cache)
        else:
            study = await PreparedStudy.from_rewritten(
                source, study_uid, prepare, identity, spool, cache=cache
            )
        manifest = study.manifest
        sender = StudySender(study, link)
        if on_sender is not None:  # lets a caller watch progress (node.app.transfers)
            on_sender(sender)
        attach = getattr(link, "attach", None)
        if attach is not None:  # mux.ChannelLink: route its incoming control to us
            attach(sender.on_control, lambda _data: None)
        state = await sender.run()
    finally:
        _detach(link)
        spool.close()
    if audit is not None:
        wire_bytes = sum(d.wire_size for d in study.declared.values())
        # The bytes sent as: exact once every entry was declared, else the signed bound.
        sent = dataclasses.replace(manifest, total_size=study.total_size)
        SentRecord(sent, state, wire_bytes).write(audit, peer=peer, now=clock())
    return state


def _detach(link: TransferLink) -> None:
    detach = getattr(link, "detach", None)
    if detach is not None:  # mux.ChannelLink: this transfer's messages stop here
        detach()


async def receive_study(
    link: TransferLink,
    store: InstanceStore,
    spool_dir: Path,
    *,
    peer: str,
    audit: AuditSink | None = None,
    on_progress: ProgressCallback | None = None,
    clock: Callable[[], float] = time.time,
    on_receiver: Callable[[StudyReceiver], None] | None = None,
    sender_key: bytes | None = None,
    expect_study: str | None = None,
    spool_key: bytes | None = None,
    window: int = DEFAULT_WINDOW,
) -> Progress:
    """Fetch the study ``link``'s peer offers into ``store``; audit the outcome.

    The caller routes the link's incoming control and bulk messages to the
    returned receiver, so this attaches when ``link`` has an ``attach`` method
    (``mux.ChannelLink`` does). ``sender_key`` is the link's peer: when
    ``spool_dir`` holds an unfinished transfer it signed, the receiver asks for it
    at once instead of waiting for the sender to offer again. ``spool_key`` seals the
    spool (a node passes ``identity.derive_key(transfer.SPOOL_KEY_PURPOSE)``; without
    one the spool is sealed with a key that lives only as long as this process).
    ``window`` is the chunks in flight (tests set it small, so a small study spans many).
    """
    receiver = StudyReceiver(
        link,
        spool_dir,
        store,
        f"peer:{peer}",
        on_progress,
        sender_key=sender_key,
        expect_study=expect_study,
        spool_key=spool_key,
        window=window,
    )
    if on_receiver is not None:  # lets a caller read the manifest and steer (the viewer)
        on_receiver(receiver)
    attach = getattr(link, "attach", None)
    if attach is not None:
        attach(receiver.on_control, receiver.on_bulk)
    complete = False
    try:
        progress = await receiver.run()
        complete = True
        return progress
    finally:
        _detach(link)
        if audit is not None and receiver.protocol is not None:
            ReceivedRecord(
                receiver.protocol.manifest,
                receiver.protocol.progress(),
                complete,
                resent_chunks=receiver.protocol.chunks_rerequested,
                not_stored=len(receiver.conflicts),
            ).write(audit, peer=peer, now=clock())


__all__ = [
    "InstanceStore",
    "StudyReceiver",
    "StudySender",
    "StudySource",
    "TransferLink",
    "receive_study",
    "send_study",
]
