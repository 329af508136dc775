"""Runs the sans-IO transfer protocol (:mod:`peer_transport.transfer`) over a link.

The link is anything with ``send_control(bytes)`` and ``send_bulk(bytes)``
coroutines (:class:`TransferLink`); ``send_bulk`` must wait while the bulk queue
is full, which is where backpressure comes from. Incoming messages are handed to
:meth:`StudySender.on_control` / :meth:`StudyReceiver.on_control` /
:meth:`StudyReceiver.on_bulk` by whoever dispatches the connection's events.
Requests travel on the control channel, chunks on the bulk channel.

Received instances go to an :class:`InstanceStore` (``node.store.Store`` fits:
``has_hash(hex)`` and ``add_bytes(data, source=...)``) only after their hash is
verified; decoding and storing run in one worker thread so the event loop keeps
receiving and at most one decoded instance is in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from crypto.identity import Identity
from node import wirecodec
from peer_transport import transfer as tr

log = logging.getLogger(__name__)

INBOX_LIMIT = 1024  # messages queued from the link before new ones are dropped
POLL_INTERVAL = 0.05


class TransferLink(Protocol):
    async def send_control(self, data: bytes) -> None: ...

    async def send_bulk(self, data: bytes) -> None: ...


class InstanceStore(Protocol):
    def has_hash(self, content_hash: str) -> bool: ...

    def add_bytes(self, data: bytes, *, source: str) -> Any: ...


class PreparedStudy:
    """A study encoded for the wire and described by a signed manifest (sender side)."""

    def __init__(self, manifest: tr.Manifest, signed: bytes, wires: Sequence[bytes]) -> None:
        self.manifest = manifest
        self.signed = signed
        self.wires = list(wires)

    @classmethod
    async def from_files(
        cls, files: Sequence[bytes], identity: Identity, deidentified: bool = False
    ) -> PreparedStudy:
        """Describe and encode every file (in worker threads); bad files raise BadInstance."""
        prepared = await asyncio.gather(*(asyncio.to_thread(tr.prepare_instance, f) for f in files))
        studies = {p[1] for p in prepared}
        if len(studies) != 1:
            raise wirecodec.BadInstance(
                f"the files belong to {len(studies)} studies; share one study at a time"
            )
        manifest = tr.build_manifest([p[0] for p in prepared], studies.pop(), deidentified)
        wire_of = {p[0].sop_instance_uid: p[2] for p in prepared}
        wires = [wire_of[e.sop_instance_uid] for e in manifest.entries]
        return cls(manifest, manifest.sign(identity), wires)


class StudySender:
    """Offers a prepared study and answers the receiver's chunk requests."""

    def __init__(self, study: PreparedStudy, link: TransferLink) -> None:
        self.study = study
        self.link = link
        self.protocol = tr.Sender(study.manifest, study.wires.__getitem__)
        self._inbox: asyncio.Queue[tr.Message] = asyncio.Queue(INBOX_LIMIT)

    def on_control(self, data: bytes) -> None:
        message = tr.from_wire(data)
        with contextlib.suppress(asyncio.QueueFull):  # the receiver asks again on timeout
            self._inbox.put_nowait(message)

    async def run(self) -> tr.State:
        """Offer, then serve requests until the receiver finishes or cancels."""
        for part in tr.offer_parts(self.study.signed, self.study.manifest.transfer_id):
            await self.link.send_control(tr.to_wire(part))
        while self.protocol.machine.state not in (tr.State.COMPLETE, tr.State.CANCELLED):
            message = await self._inbox.get()
            try:
                chunks = self.protocol.receive(message)
            except tr.RemoteTransferError as exc:
                log.warning("ignoring a bad transfer request: %s", exc)
                continue
            for chunk in chunks:
                await self.link.send_bulk(tr.to_wire(chunk))
        return self.protocol.machine.state


ProgressCallback = Callable[[tr.Progress], None]


class StudyReceiver:
    """Fetches one offered study into a store, resuming from its spool directory."""

    def __init__(
        self,
        link: TransferLink,
        spool_dir: Path,
        store: InstanceStore,
        source: str,
        on_progress: ProgressCallback | None = None,
        window: int = tr.DEFAULT_WINDOW,
        timeout: float = tr.DEFAULT_TIMEOUT,
    ) -> None:
        self.link = link
        self.spool_dir = spool_dir
        self.store = store
        self.source = source
        self.on_progress = on_progress
        self.window = window
        self.timeout = timeout
        self.protocol: tr.Receiver | None = None
        self._offer = tr.OfferAssembler()
        self._manifest: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._chunks: asyncio.Queue[tr.Chunk] = asyncio.Queue(INBOX_LIMIT)
        self._stored: dict[int, asyncio.Event] = {}
        self._wake = asyncio.Event()
        self._started = asyncio.Event()
        # One worker: instances are decoded and stored one at a time, which bounds
        # memory and keeps the GIL mostly with the event loop that feeds SCTP.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="transfer-commit")

    # link input

    def on_control(self, data: bytes) -> None:
        message = tr.from_wire(data)
        if isinstance(message, tr.OfferPart):
            signed = self._offer.add(message)
            if signed is not None and not self._manifest.done():
                self._manifest.set_result(signed)
        elif isinstance(message, tr.Cancel) and self.protocol is not None:
            with contextlib.suppress(tr.IllegalTransition):
                self.protocol.machine.fire(tr.Event.CANCEL)
            self._wake.set()

    def on_bulk(self, data: bytes) -> None:
        chunk = tr.from_wire(data)
        if not isinstance(chunk, tr.Chunk):
            raise tr.MalformedMessage("only chunks travel on the bulk channel")
        with contextlib.suppress(asyncio.QueueFull):  # dropped chunks are requested again
            self._chunks.put_nowait(chunk)
        self._wake.set()

    # viewer

    async def instance(self, sop_instance_uid: str) -> None:
        """Move an instance to the front of the queue and wait until it is stored."""
        await self._started.wait()
        assert self.protocol is not None  # noqa: S101 -- set before _started
        index = self.protocol.index_of(sop_instance_uid)
        if index in self.protocol.done:
            return
        self.protocol.prioritise(index)
        self._wake.set()
        await self._stored.setdefault(index, asyncio.Event()).wait()

    # main loop

    async def run(self) -> tr.Progress:
        """Fetch the whole study; return the final progress. Raises TransferError."""
        signed = await self._manifest
        spool = tr.Spool(self.spool_dir)
        self.protocol = receiver = tr.Receiver(
            signed,
            spool,
            have=lambda h: self.store.has_hash(h.hex()),
            window=self.window,
            timeout=self.timeout,
        )
        receiver.accept()
        self._started.set()
        pending: set[asyncio.Task[None]] = set()

        def commit(index: int) -> None:
            task = asyncio.create_task(self._commit(receiver, index))
            pending.add(task)
            task.add_done_callback(pending.discard)

        for index in sorted(receiver.ready):  # fully received before a restart
            commit(index)
        try:
            await self._loop(receiver, commit, pending)
            for task in list(pending):
                await task
        finally:
            for task in pending:  # cancelled or failed: stop touching the spool
                task.cancel()
            self._executor.shutdown(wait=False, cancel_futures=True)
        if receiver.state is tr.State.COMPLETE:
            await self.link.send_control(tr.to_wire(tr.Finished(receiver.manifest.transfer_id)))
        elif receiver.state is tr.State.CANCELLED:
            raise tr.TransferError("the transfer was cancelled")
        return receiver.progress()

    async def _loop(
        self,
        receiver: tr.Receiver,
        commit: Callable[[int], None],
        pending: set[asyncio.Task[None]],
    ) -> None:
        loop = asyncio.get_running_loop()
        while receiver.state in (tr.State.RUNNING, tr.State.PAUSED):
            for request in receiver.poll(loop.time()):
                await self.link.send_control(tr.to_wire(request))
            self._wake.clear()
            while not self._chunks.empty():
                chunk = self._chunks.get_nowait()
                try:
                    index = receiver.receive(chunk, loop.time())
                except tr.ChunkRejected as exc:
                    log.info("%s", exc)
                    continue
                if index is not None:
                    commit(index)
            if receiver.state in (tr.State.RUNNING, tr.State.PAUSED):
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL_INTERVAL):
                        await self._wake.wait()
            for task in [t for t in pending if t.done()]:
                task.result()  # re-raise a failed commit (ManifestMismatch)

    def _verify_and_store(self, receiver: tr.Receiver, index: int) -> Exception | None:
        # One job per instance, so a decoded instance never waits in memory for its turn.
        try:
            data = receiver.verify_part(index)
        except (wirecodec.WireCodecError, OSError) as exc:
            return exc
        self.store.add_bytes(data, source=self.source)
        return None

    async def _commit(self, receiver: tr.Receiver, index: int) -> None:
        loop = asyncio.get_running_loop()
        job = functools.partial(self._verify_and_store, receiver, index)
        failure = await loop.run_in_executor(self._executor, job)
        if failure is not None:
            error = receiver.reject_part(index, failure)
            if isinstance(error, tr.ManifestMismatch):
                raise error from failure
            log.warning("%s", error)
            self._wake.set()
            return
        receiver.stored(index, loop.time())
        self._stored.setdefault(index, asyncio.Event()).set()
        if self.on_progress is not None:
            self.on_progress(receiver.progress())
        self._wake.set()

    def cancel(self) -> None:
        if self.protocol is not None:
            cancel = self.protocol.cancel()
            task = asyncio.get_running_loop().create_task(
                self.link.send_control(tr.to_wire(cancel))
            )
            task.add_done_callback(lambda _t: None)
        self._wake.set()


# -- node-level helpers: a store and an audit log at each end ------------------------------


class StudySource(Protocol):
    """Where a sender reads a study from (``node.store.Store`` fits)."""

    def instances(self, study_uid: str) -> Sequence[Any]: ...  # rows with .sop_instance_uid

    def read_instance(self, sop_instance_uid: str) -> bytes: ...


class AuditSink(Protocol):
    """``node.audit.AuditLog`` fits."""

    def append(
        self,
        kind: Any,
        *,
        now: float,
        study_uid: str | None = None,
        peer: str | None = None,
        details: Any = None,
        actor: str | None = None,
    ) -> int: ...


async def send_study(
    link: TransferLink,
    source: StudySource,
    study_uid: str,
    identity: Identity,
    *,
    peer: str,
    audit: AuditSink | None = None,
    prepare: Callable[[list[bytes]], list[bytes]] | None = None,
    clock: Callable[[], float] = time.time,
    on_sender: Callable[[StudySender], None] | None = None,
) -> tr.State:
    """Offer a stored study over ``link`` and serve it until the peer has it all.

    ``prepare`` may rewrite the files first (de-identification for sharing). Only
    the wire encodings stay in memory while the study is served.
    """
    rows = source.instances(study_uid)
    if not rows:
        raise tr.LocalTransferError(f"study {study_uid} is not in the store")
    files = [await asyncio.to_thread(source.read_instance, r.sop_instance_uid) for r in rows]
    if prepare is not None:
        files = prepare(files)
    study = await PreparedStudy.from_files(files, identity, deidentified=prepare is not None)
    del files
    manifest = study.manifest
    sender = StudySender(study, link)
    if on_sender is not None:  # lets a caller watch progress (node.transfers)
        on_sender(sender)
    attach = getattr(link, "attach", None)
    if attach is not None:  # connection.ChannelLink: route its incoming control to us
        attach(sender.on_control, lambda _data: None)
    state = await sender.run()
    if audit is not None:
        audit.append(
            "transfer",
            now=clock(),
            study_uid=manifest.study_instance_uid,
            peer=peer,
            details={
                "instances": len(manifest.entries),
                "bytes": manifest.total_size,
                "wire_bytes": sum(e.wire_size for e in manifest.entries),
                "outcome": state.value,
                "deidentified": manifest.deidentified,
            },
        )
    return state


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
) -> tr.Progress:
    """Fetch the study ``link``'s peer offers into ``store``; audit the outcome.

    The caller routes the link's incoming control and bulk messages to the
    returned receiver, so this attaches when ``link`` has an ``attach`` method
    (``connection.ChannelLink`` does).
    """
    receiver = StudyReceiver(link, spool_dir, store, f"peer:{peer}", on_progress)
    if on_receiver is not None:  # lets a caller read the manifest and steer (the viewer)
        on_receiver(receiver)
    attach = getattr(link, "attach", None)
    if attach is not None:
        attach(receiver.on_control, receiver.on_bulk)
    outcome = "failed"
    try:
        progress = await receiver.run()
        outcome = "complete"
        return progress
    finally:
        if audit is not None and receiver.protocol is not None:
            manifest = receiver.protocol.manifest
            done = receiver.protocol.progress()
            audit.append(
                "receive",
                now=clock(),
                study_uid=manifest.study_instance_uid,
                peer=peer,
                details={
                    "instances": done.instances_done,
                    "of": done.instances_total,
                    "bytes": done.bytes_done,
                    "outcome": outcome,
                    "deidentified": manifest.deidentified,
                    "resent_chunks": receiver.protocol.chunks_rerequested,
                },
            )
