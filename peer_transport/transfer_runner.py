"""Runs the sans-IO transfer protocol (:mod:`peer_transport.transfer`) over a link.

The link is anything with ``send_control(bytes)`` and ``send_bulk(bytes)``
coroutines (:class:`TransferLink`); ``send_bulk`` must wait while the bulk queue
is full, which is where backpressure comes from. Incoming messages are handed to
:meth:`StudySender.on_control` / :meth:`StudyReceiver.on_control` /
:meth:`StudyReceiver.on_bulk` by whoever dispatches the connection's events.
Requests travel on the control channel, chunks on the bulk channel.

Received chunks are verified and written to the spool as they arrive (nothing
queues in memory), and instances go to an :class:`InstanceStore`
(``node.dicom.store.Store`` fits: ``has_hash(hex)`` and ``add_bytes(data, source=...)``)
only after their hash is verified; decoding and storing run in one worker thread
so the event loop keeps receiving and at most one decoded instance is in memory.
The receiver's memory does not grow with the study.

The sender streams too: :meth:`PreparedStudy.from_source` reads, optionally
de-identifies, and encodes one instance at a time (a few in parallel worker
threads) into a :class:`SenderSpool` on disk, sealed with a key that only lives
in memory, and serves chunks from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
import secrets
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import nacl.bindings as sodium
import nacl.exceptions

from crypto.identity import Identity
from node.dicom import wirecodec
from node.dicom.store import InstanceConflict
from peer_transport import transfer as tr

log = logging.getLogger(__name__)

INBOX_LIMIT = 1024  # control messages queued from the link before new ones are dropped
POLL_INTERVAL = 0.05
REOFFER_AFTER = 2 * tr.DEFAULT_TIMEOUT  # seconds without a request before offering again
RESUME_ASKS = 6  # times a restarted receiver asks for its transfer before it only waits
ENCODE_AHEAD = max(2, os.cpu_count() or 2)  # instances encoded in parallel by the sender
_M_MMAP_THRESHOLD = -3


class TransferLink(Protocol):
    async def send_control(self, data: bytes) -> None: ...

    async def send_bulk(self, data: bytes) -> None: ...


class InstanceStore(Protocol):
    def has_hash(self, content_hash: str) -> bool: ...

    def add_bytes(self, data: bytes, *, source: str) -> Any: ...


class SenderSpool:
    """Wire encodings of one outgoing study on disk, each sealed (XChaCha20-Poly1305).

    The key is made here and never leaves memory, so whatever a crash leaves
    behind in the 0700 directory is unreadable (the files may hold PHI when the
    study is not de-identified); :meth:`close` deletes it. Directories left by
    a process that no longer runs are removed when the next spool is made.
    """

    def __init__(self, parent: Path | None = None) -> None:
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            _remove_orphans(parent)
        self.root = Path(tempfile.mkdtemp(prefix=f"send-{os.getpid()}-", dir=parent))
        self._key = secrets.token_bytes(sodium.crypto_aead_xchacha20poly1305_ietf_KEYBYTES)
        self._fd = os.open(self.root / "wires", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self._slots: list[tuple[int, int]] = []  # (offset, sealed length)
        self._end = 0

    @staticmethod
    def _nonce(slot: int) -> bytes:
        return struct.pack("<Q", slot).ljust(sodium.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES)

    def put(self, wire: bytes) -> int:
        """Append one wire encoding; returns its slot."""
        slot = len(self._slots)
        sealed = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(
            wire, None, self._nonce(slot), self._key
        )
        os.pwrite(self._fd, sealed, self._end)
        self._slots.append((self._end, len(sealed)))
        self._end += len(sealed)
        return slot

    def get(self, slot: int) -> bytes:
        offset, length = self._slots[slot]
        sealed = os.pread(self._fd, length, offset)
        try:
            wire: bytes = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
                sealed, None, self._nonce(slot), self._key
            )
        except nacl.exceptions.CryptoError as exc:
            raise tr.LocalTransferError(
                f"the outgoing spool in {self.root} was damaged on disk; send the study again"
            ) from exc
        return wire

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
        shutil.rmtree(self.root, ignore_errors=True)


def _remove_orphans(parent: Path) -> None:
    for path in parent.glob("send-*-*"):
        pid = path.name.split("-")[1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            pass


class PreparedStudy:
    """A study encoded for the wire and described by a signed manifest (sender side).

    ``wire(index)`` gives the wire encoding of manifest entry ``index``.
    """

    def __init__(
        self,
        manifest: tr.Manifest,
        signed: bytes,
        wire: Callable[[int], bytes],
        spool: SenderSpool | None = None,
    ) -> None:
        self.manifest = manifest
        self.signed = signed
        self.wire = wire
        self._spool = spool

    def close(self) -> None:
        """Delete the on-disk encodings (if any)."""
        if self._spool is not None:
            self._spool.close()

    @classmethod
    async def from_files(
        cls, files: Sequence[bytes], identity: Identity, deidentified: bool = False
    ) -> PreparedStudy:
        """Describe and encode every file in memory (small studies, tests)."""
        prepared = await asyncio.gather(*(asyncio.to_thread(tr.prepare_instance, f) for f in files))
        manifest = tr.build_manifest(
            [p[0] for p in prepared], _one_study(p[1] for p in prepared), deidentified
        )
        wire_of = {p[0].sop_instance_uid: p[2] for p in prepared}
        wires = [wire_of[e.sop_instance_uid] for e in manifest.entries]
        return cls(manifest, manifest.sign(identity), wires.__getitem__)

    @classmethod
    async def from_source(
        cls,
        files: Iterator[bytes],
        identity: Identity,
        spool: SenderSpool,
        deidentified: bool = False,
        ahead: int = ENCODE_AHEAD,
        cache: wirecodec.PixelCache | None = None,
    ) -> PreparedStudy:
        """Read, describe and encode one file at a time into ``spool``.

        ``files`` is advanced in a worker thread (reading and de-identifying may
        block); up to ``ahead`` instances are encoded in worker threads, so at
        most about ``2 * ahead`` files are in memory. Bad files raise BadInstance.
        ``cache`` (``node.dicom.wirecache.WireCache``) saves the pixel coding done before.
        """
        entries: list[tr.ManifestEntry] = []
        studies: list[str] = []
        slot_of: dict[str, int] = {}
        running: set[asyncio.Future[tuple[tr.ManifestEntry, str, bytes]]] = set()

        def collect(done: Iterable[asyncio.Future[tuple[tr.ManifestEntry, str, bytes]]]) -> None:
            for future in done:
                entry, study, wire = future.result()
                if entry.sop_instance_uid in slot_of:
                    raise wirecodec.BadInstance(
                        f"instance {entry.sop_instance_uid} appears twice in the study"
                    )
                slot_of[entry.sop_instance_uid] = spool.put(wire)
                entries.append(entry)
                studies.append(study)

        try:
            while True:
                data = await asyncio.to_thread(next, files, None)
                if data is None:
                    break
                running.add(
                    asyncio.ensure_future(asyncio.to_thread(tr.prepare_instance, data, cache))
                )
                del data
                if len(running) >= ahead:
                    done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                    collect(done)
            if running:
                done, running = await asyncio.wait(running)
                collect(done)
        finally:
            for future in running:
                future.cancel()
        manifest = tr.build_manifest(entries, _one_study(studies), deidentified)
        slots = [slot_of[e.sop_instance_uid] for e in manifest.entries]
        return cls(manifest, manifest.sign(identity), lambda i: spool.get(slots[i]), spool)


def _one_study(studies: Iterable[str]) -> str:
    found = set(studies)
    if len(found) != 1:
        raise wirecodec.BadInstance(
            f"the files belong to {len(found)} studies; share one study at a time"
        )
    return found.pop()


class StudySender:
    """Offers a prepared study and answers the receiver's chunk requests."""

    def __init__(self, study: PreparedStudy, link: TransferLink) -> None:
        self.study = study
        self.link = link
        self.protocol = tr.Sender(study.manifest, study.wire, study.signed)
        self._inbox: asyncio.Queue[tr.Message] = asyncio.Queue(INBOX_LIMIT)

    def on_control(self, data: bytes) -> None:
        message = tr.from_wire(data)
        with contextlib.suppress(asyncio.QueueFull):  # the receiver asks again on timeout
            self._inbox.put_nowait(message)

    async def _offer(self, parts: Sequence[tr.OfferPart]) -> None:
        for part in parts:
            await self.link.send_control(tr.to_wire(part))

    async def run(self) -> tr.State:
        """Offer, then serve requests until the receiver finishes or cancels.

        A restarted receiver asks for the offer again (ResumeRequest); for one that
        does not, the offer is repeated while no request comes (a running receiver
        ignores it).
        """
        loop = asyncio.get_running_loop()
        await self._offer(self.protocol.offer(loop.time()))
        while self.protocol.machine.state not in (tr.State.COMPLETE, tr.State.CANCELLED):
            try:
                async with asyncio.timeout(REOFFER_AFTER):
                    message = await self._inbox.get()
            except TimeoutError:
                await self._offer(self.protocol.offer(loop.time()))
                continue
            if isinstance(message, tr.ResumeRequest):
                await self._offer(self.protocol.resume(message, loop.time()))
                continue
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
        sender_key: bytes | None = None,
        expect_study: str | None = None,
        spool_key: bytes | None = None,
    ) -> None:
        self.link = link
        self.spool_dir = spool_dir
        self.spool_key = spool_key  # seals the spool (the node's, so a restart resumes)
        # Instances not stored because the store holds their UID with other bytes.
        self.conflicts: list[InstanceConflict] = []
        # Why the transfer failed, for run() to raise: a commit task's own exception may
        # be gone with the task (pending tasks drop out of their set when done).
        self._failure: tr.TransferError | None = None
        self.sender_key = sender_key  # the link's peer: asked at once for an unfinished spool
        # Take only an offer of this study (other transfers may share the connection).
        self.expect_study = expect_study
        self.store = store
        self.source = source
        self.on_progress = on_progress
        self.window = window
        self.timeout = timeout
        self.protocol: tr.Receiver | None = None
        self._offer = tr.OfferAssembler()
        self._manifest: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending: set[asyncio.Task[None]] = set()
        self._over = False  # run() has returned: chunks are no longer spooled
        self._stored: dict[int, asyncio.Event] = {}
        self._wake = asyncio.Event()
        self._started = asyncio.Event()
        # One worker: instances are decoded and stored one at a time, which bounds
        # memory and keeps the GIL mostly with the event loop that feeds SCTP.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="transfer-commit")
        _return_large_blocks()

    # link input

    def on_control(self, data: bytes) -> None:
        message = tr.from_wire(data)
        if isinstance(message, tr.OfferPart):
            signed = self._offer.add(message)
            if signed is not None and not self._manifest.done() and self._expected(signed):
                self._manifest.set_result(signed)
        elif isinstance(message, tr.Cancel) and self.protocol is not None:
            with contextlib.suppress(tr.IllegalTransition):
                self.protocol.machine.fire(tr.Event.CANCEL)
            self._wake.set()

    def _expected(self, signed: bytes) -> bool:
        if self.expect_study is None:
            return True
        with contextlib.suppress(tr.MalformedMessage):
            return tr.Manifest.open(signed)[1].study_instance_uid == self.expect_study
        return True  # a bad manifest is refused, with its reason, where it is opened

    def on_bulk(self, data: bytes) -> None:
        """Verify and spool a chunk at once: nothing waits in memory for the main loop."""
        chunk = tr.from_wire(data)
        if not isinstance(chunk, tr.Chunk):
            raise tr.MalformedMessage("only chunks travel on the bulk channel")
        receiver = self.protocol
        if receiver is None or not self._started.is_set() or self._over:
            return  # nothing was requested yet, or the run is over
        if receiver.state not in (tr.State.RUNNING, tr.State.PAUSED):
            return  # cancelled or failed: chunks still in flight are dropped
        loop = asyncio.get_running_loop()
        try:
            index = receiver.receive(chunk, loop.time())
        except tr.ChunkRejected as exc:
            log.info("%s", exc)
            return
        finally:
            self._wake.set()  # the window has room again
        if index is not None:
            self._commit_soon(receiver, index)

    def _commit_soon(self, receiver: tr.Receiver, index: int) -> None:
        task = asyncio.get_running_loop().create_task(self._commit(receiver, index))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

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
        spool = tr.Spool(self.spool_dir, self.spool_key)
        signed = await self._offered(spool)
        try:
            self.protocol = receiver = tr.Receiver(
                signed,
                spool,
                have=lambda h: self.store.has_hash(h.hex()),
                window=self.window,
                timeout=self.timeout,
            )
        except tr.RemoteTransferError as exc:  # over budget, hostile UIDs, bad signature
            self._drop(exc)
            raise
        receiver.accept()
        self._started.set()
        pending = self._pending
        for index in sorted(receiver.ready):  # fully received before a restart
            self._commit_soon(receiver, index)
        try:
            await self._loop(receiver, pending)
            for task in list(pending):
                await task
        finally:
            self._over = True
            for task in pending:  # cancelled or failed: stop touching the spool
                task.cancel()
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self._failure is not None:
            raise self._failure
        if receiver.state is tr.State.COMPLETE:
            await self.link.send_control(tr.to_wire(tr.Finished(receiver.manifest.transfer_id)))
        elif receiver.state is tr.State.CANCELLED:
            raise tr.TransferCancelled("the transfer was cancelled")
        return receiver.progress()

    async def _offered(self, spool: tr.Spool) -> bytes:
        """The signed manifest. A receiver restarted with an unfinished spool from the
        link's peer asks for it (every ``timeout``, RESUME_ASKS times) rather than wait
        for the sender to offer again on its own."""
        ask = None if self.sender_key is None else tr.resume_request(spool, self.sender_key)
        if ask is not None:
            for _ in range(RESUME_ASKS):
                await self.link.send_control(tr.to_wire(ask))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.timeout):
                        return await asyncio.shield(self._manifest)
        return await self._manifest

    async def _loop(self, receiver: tr.Receiver, pending: set[asyncio.Task[None]]) -> None:
        loop = asyncio.get_running_loop()
        while receiver.state in (tr.State.RUNNING, tr.State.PAUSED):
            self._wake.clear()
            for request in receiver.poll(loop.time()):
                await self.link.send_control(tr.to_wire(request))
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
        except (wirecodec.WireCodecError, OSError, tr.RemoteTransferError) as exc:
            return exc
        try:
            self.store.add_bytes(data, source=self.source)
        except InstanceConflict as exc:  # the stored instance stays; this one is reported
            return exc
        return None

    def _drop(self, error: tr.RemoteTransferError) -> None:
        """The sender misbehaved: it loses its connection (``ChannelLink.drop``)."""
        drop = getattr(self.link, "drop", None)
        if drop is not None:
            drop(error)

    async def _commit(self, receiver: tr.Receiver, index: int) -> None:
        loop = asyncio.get_running_loop()
        job = functools.partial(self._verify_and_store, receiver, index)
        failure = await loop.run_in_executor(self._executor, job)
        if isinstance(failure, tr.RemoteTransferError):
            self._failure = receiver.refuse_part(index, failure)
            self._drop(failure)
            self._wake.set()
            return
        if isinstance(failure, InstanceConflict):
            log.warning("instance %d of the transfer was not stored: %s", index, failure)
            self.conflicts.append(failure)
            failure = None  # counted as done: fetching it again would not change it
        if failure is not None:
            error = receiver.reject_part(index, failure)
            if isinstance(error, tr.ManifestMismatch):
                error.__cause__ = failure
                self._failure = error
                self._wake.set()
                return
            log.warning("%s", error)
            self._wake.set()
            return
        if receiver.state not in (tr.State.RUNNING, tr.State.PAUSED):
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
            else:
                self.protocol.resume_transfer()
        except tr.IllegalTransition:
            return False
        self._wake.set()
        return True

    def cancel(self) -> None:
        if self.protocol is not None:
            cancel = self.protocol.cancel()
            task = asyncio.get_running_loop().create_task(
                self.link.send_control(tr.to_wire(cancel))
            )
            task.add_done_callback(lambda _t: None)
        self._wake.set()


@functools.cache  # find_library runs ldconfig: once per process is enough
def _return_large_blocks() -> None:
    """Have glibc give every large block (decoded instances) back to the system when freed.

    By default glibc raises its mmap threshold after the first large free, so the
    half-megabyte buffers of each decoded instance then come from the heaps of the
    worker thread and the event loop, which fragment and keep growing the RSS over
    a long study. A fixed threshold keeps them in mmap. No-op off glibc.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(name).mallopt(_M_MMAP_THRESHOLD, 128 * 1024)


# -- node-level helpers: a store and an audit log at each end ------------------------------


class StudySource(Protocol):
    """Where a sender reads a study from (``node.dicom.store.Store`` fits).

    A source with a ``wire_cache`` attribute (the store's) lends it to the encoder.
    """

    def instances(self, study_uid: str) -> Sequence[Any]: ...  # rows with .sop_instance_uid

    def read_instance(self, sop_instance_uid: str) -> bytes: ...


class AuditSink(Protocol):
    """``node.core.audit.AuditLog`` fits."""

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
    prepare: Callable[[Iterable[bytes]], Iterable[bytes]] | None = None,
    clock: Callable[[], float] = time.time,
    on_sender: Callable[[StudySender], None] | None = None,
    spool_dir: Path | None = None,
) -> tr.State:
    """Offer a stored study over ``link`` and serve it until the peer has it all.

    ``prepare`` may rewrite the files first (de-identification for sharing): it
    gets the files one at a time as an iterator and yields them rewritten (it runs
    in a worker thread). The wire encodings go to a sealed :class:`SenderSpool`
    under ``spool_dir`` (the system temp directory when None), deleted after.
    """
    rows = source.instances(study_uid)
    if not rows:
        raise tr.LocalTransferError(f"study {study_uid} is not in the store")
    files: Iterable[bytes] = (source.read_instance(r.sop_instance_uid) for r in rows)
    if prepare is not None:
        files = prepare(files)
    spool = SenderSpool(spool_dir)
    try:
        study = await PreparedStudy.from_source(
            iter(files),
            identity,
            spool,
            deidentified=prepare is not None,
            cache=getattr(source, "wire_cache", None),
        )
        manifest = study.manifest
        sender = StudySender(study, link)
        if on_sender is not None:  # lets a caller watch progress (node.app.transfers)
            on_sender(sender)
        attach = getattr(link, "attach", None)
        if attach is not None:  # connection.ChannelLink: route its incoming control to us
            attach(sender.on_control, lambda _data: None)
        state = await sender.run()
    finally:
        _detach(link)
        spool.close()
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


def _detach(link: TransferLink) -> None:
    detach = getattr(link, "detach", None)
    if detach is not None:  # connection.ChannelLink: this transfer's messages stop here
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
) -> tr.Progress:
    """Fetch the study ``link``'s peer offers into ``store``; audit the outcome.

    The caller routes the link's incoming control and bulk messages to the
    returned receiver, so this attaches when ``link`` has an ``attach`` method
    (``connection.ChannelLink`` does). ``sender_key`` is the link's peer: when
    ``spool_dir`` holds an unfinished transfer it signed, the receiver asks for it
    at once instead of waiting for the sender to offer again. ``spool_key`` seals the
    spool (a node passes ``identity.derive_key(transfer.SPOOL_KEY_PURPOSE)``; without
    one the spool is sealed with a key that lives only as long as this process).
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
    )
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
        _detach(link)
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
                    "not_stored": len(receiver.conflicts),
                },
            )
