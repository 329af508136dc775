"""A study transfer between two links in one test: an in-memory link pair and store, the
sender and receiver attached to them, and the sender served until the test is done; and
the sans-IO sender of a signed manifest."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from crypto.identity import Identity
from peer_transport.transfer.machine import State
from peer_transport.transfer.manifest import Manifest, sign_wires
from peer_transport.transfer.prepared import PreparedStudy
from peer_transport.transfer.progress import Progress
from peer_transport.transfer.runner import InstanceStore, ProgressCallback, StudyReceiver
from peer_transport.transfer.sender import Sender
from peer_transport.transfer.serving import StudySender, TransferLink


class MemoryStore:
    def __init__(self) -> None:
        self.by_hash: dict[str, bytes] = {}

    def has_hash(self, content_hash: str) -> bool:
        return content_hash in self.by_hash

    def add_bytes(self, data: bytes, *, source: str, warm: bool = True) -> str:
        digest = hashlib.sha256(data).hexdigest()
        self.by_hash[digest] = data
        return digest


class MemoryLink:
    """In-memory link with a bounded bulk queue: send_bulk waits when it is full."""

    def __init__(self) -> None:
        self.peer: MemoryLink | None = None
        self.on_control: Any = None
        self.on_bulk: Any = None
        self.bulk_queue: asyncio.Queue[bytes] = asyncio.Queue(8)
        self.pump: asyncio.Task[None] | None = None

    async def send_control(self, data: bytes) -> None:
        assert self.peer is not None
        self.peer.on_control(data)

    async def send_bulk(self, data: bytes) -> None:
        assert self.peer is not None
        await self.peer.bulk_queue.put(data)

    def attach(self, on_control: Any, on_bulk: Any) -> None:
        self.on_control, self.on_bulk = on_control, on_bulk
        if self.pump is None:
            self.start()

    def start(self) -> None:
        async def deliver() -> None:
            while True:
                self.on_bulk(await self.bulk_queue.get())

        self.pump = asyncio.create_task(deliver())


A = TypeVar("A", bound=MemoryLink)
B = TypeVar("B", bound=MemoryLink)


def joined(a: A, b: B) -> tuple[A, B]:
    """``a`` and ``b``, each now the other's peer."""
    a.peer, b.peer = b, a
    return a, b


def memory_pair() -> tuple[MemoryLink, MemoryLink]:
    return joined(MemoryLink(), MemoryLink())


class AttachableLink(TransferLink, Protocol):
    def attach(self, on_control: Any, on_bulk: Any) -> None: ...


def attached(
    study: PreparedStudy,
    sender_link: AttachableLink,
    receiver_link: AttachableLink,
    spool_dir: Path,
    store: InstanceStore,
    source: str = "peer-a",
    on_progress: ProgressCallback | None = None,
    **options: Any,
) -> tuple[StudySender, StudyReceiver]:
    """A sender of ``study`` and a receiver into ``store`` (with ``options``, such as its
    window), each attached to its link."""
    receiver = StudyReceiver(receiver_link, spool_dir, store, source, on_progress, **options)
    sender = StudySender(study, sender_link)
    sender_link.attach(sender.on_control, lambda _d: None)
    receiver_link.attach(receiver.on_control, receiver.on_bulk)
    return sender, receiver


# A fresh connection: its two links and how to close it.
Connect = Callable[
    [], Awaitable[tuple[AttachableLink, AttachableLink, Callable[[], Awaitable[None]]]]
]


async def crash_then_resume(
    tmp_path: Path, files: Sequence[bytes], connect: Connect, *, window: int = 4
) -> None:
    """``files`` as a study over a connection from ``connect()``: the receiver dies once
    three instances are stored; a second connection finishes the study, resending at
    most ``window`` chunks; the store then holds exactly ``files``."""
    study = await PreparedStudy.from_files(list(files), Identity.generate())
    total_chunks = sum(d.chunk_count(study.manifest.chunk_size) for d in study.declared.values())
    store, sent = MemoryStore(), 0
    for attempt in range(2):
        link_a, link_b, close = await connect()
        halfway = asyncio.Event()

        def note(p: Progress, halfway: asyncio.Event = halfway) -> None:
            if p.instances_done >= 3:
                halfway.set()

        sender, receiver = attached(
            study, link_a, link_b, tmp_path / "spool", store, "peer-a", note, window=window
        )
        tasks = [asyncio.create_task(receiver.run()), asyncio.create_task(sender.run())]
        try:
            if attempt == 0:
                await asyncio.wait_for(halfway.wait(), 60)  # then the receiver "crashes"
            else:
                progress, state = await asyncio.wait_for(asyncio.gather(*tasks), 60)
                assert state is State.COMPLETE
                assert isinstance(progress, Progress)
                assert progress.instances_done == len(files)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await close()
        sent += sender.protocol.chunks_sent
        if attempt == 0:
            assert 3 <= len(store.by_hash) < len(files)
    assert sorted(store.by_hash.values()) == sorted(files)
    assert sent <= total_chunks + window


@contextlib.contextmanager
def pumps_stopped(*links: object) -> Iterator[None]:
    """On the way out, stops the bulk pump of each memory link among ``links``."""
    try:
        yield
    finally:
        for link in links:
            pump = getattr(link, "pump", None)
            if pump is not None:
                pump.cancel()


@contextlib.asynccontextmanager
async def serving(sender: StudySender, *links: object) -> AsyncIterator[asyncio.Future[Any]]:
    """Runs ``sender`` meanwhile; on the way out it is cancelled, and the links' pumps."""
    task = asyncio.ensure_future(sender.run())
    with pumps_stopped(*links):
        try:
            yield task
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def wire_sender(
    manifest: Manifest, signed: bytes, wires: Sequence[bytes], identity: Identity
) -> Sender:
    """The sans-IO sender of ``signed`` (``manifest``, opened) whose wire encodings are
    ``wires``, its declarations signed by ``identity``; it has declared nothing yet."""
    return Sender(
        manifest,
        wires.__getitem__,
        signed,
        lambda ds: sign_wires(identity, manifest.transfer_id, manifest.study_instance_uid, ds),
    )
