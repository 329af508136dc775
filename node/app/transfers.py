"""Study transfers this node is running or ran lately, for the Home screen and the viewer.

The workflow registers each transfer (:meth:`TransferTracker.track`) and hands
the tracker the running :class:`~peer_transport.transfer.runner.StudyReceiver`
or :class:`~peer_transport.transfer.runner.StudySender`; numbers are read from
their public properties when asked, so nothing here runs on its own. A transfer's
state is the protocol's own :class:`~peer_transport.transfer.machine.State`
(OFFERED while connecting, preparing or waiting for the manifest). Labels name the
consult, never the patient. Finished and failed transfers stay listed for
:data:`KEEP_SECONDS`.

For a study still streaming in, :meth:`TransferTracker.manifest_of` gives every
instance of the study (the signed manifest) and :meth:`TransferTracker.request_first`
moves one instance to the front of the queue (the slice on screen).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from node.core.errors import NodeError
from peer_transport.errors import TransportError
from peer_transport.transfer.errors import IllegalTransition
from peer_transport.transfer.machine import State
from peer_transport.transfer.manifest import Manifest, WireDeclaration
from peer_transport.transfer.progress import Progress
from peer_transport.transfer.runner import StudyReceiver, StudySender

log = logging.getLogger(__name__)

KEEP_SECONDS = 600.0  # finished transfers stay on screen this long
MAX_KEPT = 50  # and at most this many of them
REQUEST_FIRST_TIMEOUT = 120.0


class TransferControlError(NodeError):
    """A pause or cancel that does not apply (no such transfer, or not in that state)."""


class Direction(StrEnum):
    IN = "in"
    OUT = "out"


@dataclass(frozen=True)
class TransferView:
    """One transfer as the screen shows it (plain numbers, no patient data)."""

    transfer_id: str
    consult_id: str
    peer: str  # short node id
    label: str
    direction: Direction
    state: State
    bytes_done: int
    bytes_total: int
    instances_done: int
    instances_total: int
    rate: float  # bytes per second
    eta: float | None  # seconds
    study_uid: str = ""
    error: str = ""


@dataclass
class Transfer:
    """A tracked transfer (mutable; owned by the tracker, fed by the workflow)."""

    key: str
    consult_id: str
    peer: str
    direction: Direction
    started: float
    state: State = State.OFFERED  # until it ends: the running state is read live
    ended: float | None = None
    error: str = ""
    progress: Progress | None = None
    receiver: StudyReceiver | None = None
    sender: StudySender | None = None
    _final: TransferView | None = field(default=None, repr=False)

    def attach_receiver(self, receiver: StudyReceiver) -> None:
        self.receiver = receiver

    def attach_sender(self, sender: StudySender) -> None:
        self.sender = sender

    def on_progress(self, progress: Progress) -> None:
        self.progress = progress

    def manifest(self) -> Manifest | None:
        if self.receiver is not None:
            return self.receiver.manifest
        if self.sender is not None:
            return self.sender.manifest
        return None

    def view(self, now: float) -> TransferView:
        if self._final is not None:
            return self._final
        manifest = self.manifest()
        progress = self._numbers(manifest, now)
        state = self.state
        if state is State.OFFERED and manifest is not None:
            state = State.RUNNING
        if self.receiver is not None and self.receiver.state is State.PAUSED:
            state = State.PAUSED
        return TransferView(
            manifest.transfer_id.hex()[:12] if manifest is not None else self.key,
            self.consult_id,
            self.peer,
            f"consult {self.consult_id[:8]}",
            self.direction,
            state,
            progress.bytes_done,
            progress.bytes_total,
            progress.instances_done,
            progress.instances_total,
            progress.rate,
            progress.eta,
            manifest.study_instance_uid if manifest is not None else "",
            self.error,
        )

    def _numbers(self, manifest: Manifest | None, now: float) -> Progress:
        received = self.receiver.progress() if self.receiver is not None else None
        if received is not None:
            return received
        if self.sender is not None and manifest is not None:
            declared = self.sender.protocol.declared
            return _sent(manifest, declared, self.sender.chunks_sent, now - self.started)
        return self.progress or Progress(0, 0, 0, 0, 0.0, None)

    def finish(self, state: State, now: float, error: str = "") -> None:
        self.state, self.ended, self.error = state, now, error
        self._final = self.view(now)  # keep the numbers, drop the protocol objects
        self.receiver = self.sender = None


def _sent(
    manifest: Manifest, declared: Mapping[int, WireDeclaration], chunks_sent: int, elapsed: float
) -> Progress:
    """Sender-side estimate: instances whose chunks were all sent, in manifest order."""
    budget = chunks_sent
    done_bytes = done = 0
    for index in range(manifest.count):
        if index not in declared:
            break
        count = declared[index].chunk_count(manifest.chunk_size)
        if budget < count:
            break
        budget -= count
        done += 1
        done_bytes += declared[index].entry.size
    total = manifest.total_size  # the signed bound until every entry is declared
    if len(declared) == manifest.count:
        total = sum(d.entry.size for d in declared.values())
    rate = done_bytes / elapsed if elapsed > 0 else 0.0
    eta = (total - done_bytes) / rate if rate > 0 else None
    return Progress(done_bytes, total, done, manifest.count, rate, eta)


class TransferTracker:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._transfers: list[Transfer] = []
        self._counter = 0
        self._steering: set[str] = set()

    @contextlib.contextmanager
    def track(self, consult_id: str, direction: Direction, peer: str) -> Iterator[Transfer]:
        """Register a transfer for the duration of the block: complete when it ends
        normally, failed when it raises (cancellation included)."""
        self._counter += 1
        transfer = Transfer(
            f"{consult_id[:8]}-{direction.value}-{self._counter}",
            consult_id,
            peer,
            direction,
            self._clock(),
        )
        self._transfers.append(transfer)
        try:
            yield transfer
        except BaseException as exc:
            transfer.finish(State.FAILED, self._clock(), str(exc) or type(exc).__name__)
            raise
        transfer.finish(State.COMPLETE, self._clock())

    def views(self) -> list[TransferView]:
        """Running transfers and recently finished ones, oldest first."""
        now = self._clock()
        finished = [t for t in self._transfers if t.ended is not None]
        keep = {id(t) for t in finished[-MAX_KEPT:] if now - (t.ended or now) <= KEEP_SECONDS}
        self._transfers = [t for t in self._transfers if t.ended is None or id(t) in keep]
        return [t.view(now) for t in self._transfers]

    def _incoming_for(self, consult_id: str) -> StudyReceiver:
        for t in self._transfers:
            if t.consult_id == consult_id and t.receiver is not None and t.ended is None:
                return t.receiver
        raise TransferControlError(
            f"no study of consult {consult_id[:8]} is arriving now: press f to fetch it"
        )

    def pause(self, consult_id: str) -> bool:
        """Pause the incoming study of a consult, or go on if it is paused; True if it is
        paused now. Chunks in flight still land; nothing more is asked for meanwhile."""
        receiver = self._incoming_for(consult_id)
        if receiver.pause(True):
            return True
        if receiver.pause(False):
            return False
        raise TransferControlError(f"the study of consult {consult_id[:8]} is not running yet")

    def cancel(self, consult_id: str) -> None:
        """Stop the incoming study of a consult and tell the sender; what arrived stays."""
        receiver = self._incoming_for(consult_id)
        try:
            receiver.cancel()
        except IllegalTransition as exc:
            raise TransferControlError(
                f"the study of consult {consult_id[:8]} cannot be cancelled now: {exc}"
            ) from exc

    def _receiving(self) -> Iterator[tuple[StudyReceiver, Manifest]]:
        for t in self._transfers:
            manifest = t.receiver.manifest if t.receiver is not None else None
            if t.receiver is not None and manifest is not None and t.ended is None:
                yield t.receiver, manifest

    def manifest_of(self, study_uid: str) -> Manifest | None:
        """The manifest of a study being received now, or None."""
        for _, manifest in self._receiving():
            if manifest.study_instance_uid == study_uid:
                return manifest
        return None

    def incoming(self) -> list[Manifest]:
        return [manifest for _, manifest in self._receiving()]

    def request_first(
        self, sop_uid: str, spawn: Callable[[Coroutine[Any, Any, None]], None]
    ) -> bool:
        """Fetch this instance next if a running transfer carries it; False if none does.

        ``spawn`` runs the wait in the background (the runtime's task set). A second
        call for an instance already being steered does nothing.
        """
        for receiver, manifest in self._receiving():
            if any(e.sop_instance_uid == sop_uid for e in manifest.entries):
                if sop_uid not in self._steering:
                    self._steering.add(sop_uid)
                    spawn(self._steer(receiver, sop_uid))
                return True
        return False

    async def _steer(self, receiver: StudyReceiver, sop_uid: str) -> None:
        try:
            async with asyncio.timeout(REQUEST_FIRST_TIMEOUT):
                await receiver.instance(sop_uid)
        except (TimeoutError, TransportError) as exc:
            log.info("instance %s was not fetched first: %s", sop_uid[-12:], exc)
        finally:
            self._steering.discard(sop_uid)
