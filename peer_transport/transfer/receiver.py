"""The receiving side of one study transfer, sans-IO: messages in, requests out, time
passed in.

The manifest names the study, the instance count and a bound on their bytes; each
instance's entry (UIDs, size, hash) and wire encoding come in the sender's signed
declarations (:meth:`Receiver.declare`: signed by the manifest's signer, for this
transfer and study, each within the expansion budget, the entries within ``count``
and ``total``, one index per UID, never contradicting an earlier one). The receiver
*pulls*: it skips instances it already has (same hash), then requests chunks of the
declared wire encodings, at most ``window`` chunks outstanding (the window is
the credit; a request is the application-level ack of what came before it). Every
chunk carries its own BLAKE2b hash; a damaged chunk is rejected and requested again,
never written. A chunk nobody asked for, or one that does not fit the declared size,
is rejected. When all chunks of an instance are verified the runner asks the receiver
to assemble it (the declared BLAKE2b-256 of the whole encoding first, then
:func:`~peer_transport.transfer.instance.decode_part`: sizes checked before anything
is allocated, then hash and UIDs against the manifest), and only then hands it to the
store. A declaration over budget refuses that instance before any of it is requested;
the others still come, and the transfer then fails with the refusal.

What the receiver has verified lives in a :class:`~peer_transport.transfer.spool.Spool`
directory, sealed at rest (it may hold an identified study): part files, a state file
(the instances stored, rewritten atomically after each, or at most every
``state_every`` seconds when ``have`` asks the store: a restart finds the instances
stored since through ``have``) and a journal with the receipt
(nonce and tag) of every chunk sealed into an unfinished part. Nothing here is fsynced,
on purpose: after a restart a journalled chunk counts only if its receipt still opens
the bytes in the part file, so a kill -9 or a power cut costs at most the chunks in
flight or lost with the page cache, never a wrong byte. An instance becomes visible
only through the store's own atomic, fsynced commit (``node.dicom.store.Store.add_bytes``),
which happens before the state file calls it done. The wire declarations are kept
too (sealed records in ``wires``), so a restarted receiver knows the sizes of its
partial parts; one the restarted sender declares differently (its codec changed) is
dropped and fetched again.

A receiver restarted with an unfinished spool does not wait for the sender to offer
again on its own (after ``serving.REOFFER_AFTER``): it sends a ResumeRequest for the
transfer in its spool as soon as it is connected to the manifest's signer
(:func:`resume_request`). The sender's own re-offer stays as the fallback.

Priority: :meth:`Receiver.prioritise` puts an instance (the slice on screen) ahead of
the queue (and, while it is not declared, :meth:`poll` sends a Hurry for it); the rest
follows in series order. A receiver that waits ``timeout`` with nothing declared to
fetch sends a Hurry for the first undeclared instance: the sender encodes it next, or
declares it again if its declaration was lost.

Why one module: the parts, the journal, the state file, the declarations and the
request window are one receiver's state; each check (a chunk's size, a part's extents,
what may be requested, what a restart keeps) reads several of them at once.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from crypto import canonical
from crypto.errors import CryptoError
from node.dicom import wirecodec
from peer_transport.transfer.errors import (
    ChunkRejected,
    DecompressionBomb,
    InstanceRejected,
    LocalTransferError,
    MalformedMessage,
    ManifestMismatch,
    RemoteTransferError,
    TransferError,
)
from peer_transport.transfer.instance import decode_part
from peer_transport.transfer.machine import TERMINAL, Event, Machine, State
from peer_transport.transfer.manifest import (
    Manifest,
    ManifestEntry,
    WireDeclaration,
    open_wires,
    wire_digest,
    within_budget,
)
from peer_transport.transfer.messages import (
    MAX_MANIFEST_SIZE,
    MAX_SEQS_PER_REQUEST,
    Cancel,
    Chunk,
    Declare,
    Finished,
    Hurry,
    Request,
    ResumeRequest,
    chunk_digest,
)
from peer_transport.transfer.progress import Progress
from peer_transport.transfer.spool import RECEIPT_SIZE, Spool

DEFAULT_WINDOW = 64  # chunks in flight: ~3.8 MiB, above the loopback bandwidth-delay product
DEFAULT_TIMEOUT = 5.0  # seconds before an unanswered chunk request is repeated
MAX_ACTIVE_INSTANCES = 16  # part files open at once on the receiver
MAX_INSTANCE_ATTEMPTS = 2  # an instance whose hash fails twice fails the transfer


@dataclass
class _Partial:
    count: int
    verified: dict[int, bytes] = field(default_factory=dict)  # seq -> spool receipt
    outstanding: dict[int, float] = field(default_factory=dict)  # seq -> requested at


STATE_FILE = "state"
JOURNAL_FILE = "journal"  # (index, seq, receipt) of each chunk written to an unfinished part
_JOURNAL_RECORD = struct.Struct(f"<II{RECEIPT_SIZE}s")  # (index, seq, receipt)
MANIFEST_FILE = "manifest"
WIRES_FILE = "wires"  # the wire declarations taken, sealed records (signed envelopes)


class Receiver:
    """Pulls one study. Drive it with :meth:`poll` (requests to send) and :meth:`receive`."""

    def __init__(
        self,
        signed_manifest: bytes,
        spool: Spool,
        have: Callable[[bytes], bool] = lambda _h: False,
        window: int = DEFAULT_WINDOW,
        timeout: float = DEFAULT_TIMEOUT,
        state_every: float = 0.0,
    ) -> None:
        self.sender_key, self.manifest = Manifest.open(signed_manifest)
        self._have = have
        self.spool = spool
        self.window = window
        self.timeout = timeout
        # Seconds between rewrites of the state file as instances are stored (0: after
        # each). Only for a receiver whose ``have`` knows the store: a restart then finds
        # the instances stored since the last rewrite through ``have``.
        self.state_every = state_every
        self._state_saved_at: float | None = None
        self._state_dirty = False
        self.machine = Machine()
        self.done: set[int] = set()
        self.ready: set[int] = set()  # every chunk verified, waiting to be assembled
        self._partials: dict[int, _Partial] = {}
        self._attempts: dict[int, int] = {}
        self._priority: list[int] = []
        self._first = 0  # every instance before this one is done
        # The encodings fetched and checked against: this run's declarations, or for a
        # part received before a restart, the declaration it was received under.
        self.wires: dict[int, WireDeclaration] = {}
        self._session: dict[int, WireDeclaration] = {}  # declared since this receiver began
        self._uids: dict[str, int] = {}  # SOP Instance UID -> index, as declared this run
        self._session_bytes = 0  # sum of the sizes declared this run: at most the total
        self._view: Manifest | None = None
        self._view_at = (0, 0)
        self.refused: dict[int, DecompressionBomb] = {}  # declared over budget: never fetched
        self.failure: RemoteTransferError | None = None  # why it failed, when it did here
        self.parts_redeclared = 0  # partial parts dropped: the sender encodes them otherwise
        self._hurried: int | None = None
        self._hurry_at = float("-inf")
        self._news_at: float | None = None  # last declaration or chunk
        self.chunks_received = 0
        self.chunks_requested = 0
        self.chunks_rerequested = 0
        self.chunks_rejected = 0
        self._rate = 0.0
        self._last: tuple[float, int] | None = None
        self._restore(signed_manifest)
        for i, d in self.wires.items():
            self._skip_if_held(i, d.entry)

    def _skip_if_held(self, index: int, entry: ManifestEntry) -> None:
        if index not in self.done and self._have(entry.sha256):
            self.done.add(index)  # already in the store: never requested
            self._partials.pop(index, None)  # stored after the last state rewrite
            self.ready.discard(index)
            self.spool.drop_part(index)

    @property
    def count(self) -> int:
        return self.manifest.count

    @property
    def entries(self) -> dict[int, ManifestEntry]:
        """The entries known: this run's declarations over those restored."""
        known = {i: d.entry for i, d in self.wires.items()}
        known.update((i, d.entry) for i, d in self._session.items())
        return known

    def view(self) -> Manifest:
        """The manifest with the entries declared so far (in index order), for display."""
        if self._view is None or self._view_at != (len(self.wires), len(self._session)):
            known = self.entries
            self._view = replace(self.manifest, entries=tuple(known[i] for i in sorted(known)))
            self._view_at = (len(self.wires), len(self._session))
        return self._view

    # persistence

    def _restore(self, signed_manifest: bytes) -> None:
        self.spool.save(MANIFEST_FILE, signed_manifest)
        raw = self.spool.load(STATE_FILE)
        try:
            if raw is None:
                raise ValueError("no state yet")
            state = canonical.decode(raw, MAX_MANIFEST_SIZE)
            if state["id"] != self.manifest.transfer_id:
                raise ValueError("state of another transfer")
            total = self.manifest.count
            self.done = {i for i in state["done"] if 0 <= i < total}
            self._restore_wires()
            journal = self.spool.load_clear(JOURNAL_FILE) or b""
            usable = len(journal) - len(journal) % _JOURNAL_RECORD.size  # torn last record
            claimed: dict[int, dict[int, bytes]] = {}
            for index, seq, receipt in _JOURNAL_RECORD.iter_unpack(journal[:usable]):
                claimed.setdefault(index, {})[seq] = receipt
            for index, seqs in claimed.items():
                if index in self.wires and index not in self.done:
                    self._restore_part(index, seqs)
                else:
                    self.spool.drop_part(index)
            self._persist()  # the journal now holds only what was found on disk
        except (CryptoError, KeyError, TypeError, ValueError, AttributeError):
            # No usable state (first start, another transfer, damage): start over, safely.
            self.done, self._partials, self.ready, self.wires = set(), {}, set(), {}
            self.spool.remove(WIRES_FILE)
            self._persist()

    def _restore_wires(self) -> None:
        """The declarations taken before a restart (later records win): the sizes of the
        partial parts. Each is checked again as when it came."""
        for record in self.spool.load_sealed(WIRES_FILE):
            try:
                batch = open_wires(record)
            except RemoteTransferError:
                continue
            if (
                batch.signer != self.sender_key
                or batch.transfer_id != self.manifest.transfer_id
                or batch.study_uid != self.manifest.study_instance_uid
            ):
                continue
            for d in batch.declarations:
                if (
                    d.encoded
                    and d.index < self.manifest.count
                    and within_budget(d.entry.size, d.wire_size)
                ):
                    self.wires[d.index] = d

    def _restore_part(self, index: int, claimed: dict[int, bytes]) -> None:
        """Keep the journalled chunks whose bytes really are in the part file (their
        receipt opens them: sealed, so damaged or missing bytes do not)."""
        count = self.wires[index].chunk_count(self.manifest.chunk_size)
        ok = {
            seq: receipt
            for seq, receipt in claimed.items()
            if 0 <= seq < count
            and self.spool.read_chunk(index, seq, *self._extent(index, seq), receipt) is not None
        }
        self._partials[index] = _Partial(count, ok)
        if len(ok) == count:
            self.ready.add(index)

    def _extent(self, index: int, seq: int) -> tuple[int, int]:
        """(offset, length) of chunk ``seq`` of instance ``index`` in its wire encoding."""
        size = self.manifest.chunk_size
        return seq * size, min(size, self.wires[index].wire_size - seq * size)

    def _save_state(self) -> None:
        state = {"id": self.manifest.transfer_id, "done": sorted(self.done)}
        self.spool.save(STATE_FILE, canonical.encode(state))
        self._state_dirty = False

    def save_state(self) -> None:
        """Rewrite the state file if instances were stored since it was last written
        (a receiver with ``state_every`` calls it when it stops)."""
        if self._state_dirty and self.state is not State.COMPLETE:
            self._save_state()

    def _persist(self) -> None:
        journal = b"".join(
            _JOURNAL_RECORD.pack(index, seq, receipt)
            for index, partial in self._partials.items()
            for seq, receipt in partial.verified.items()
        )
        # The journal first: a crash between the two leaves a state that is only older.
        self.spool.save_clear(JOURNAL_FILE, journal)
        self._save_state()

    @classmethod
    def resume(cls, spool: Spool, **kwargs: Any) -> Receiver:
        """Reopen a transfer from its spool after a restart."""
        signed = spool.load(MANIFEST_FILE)
        if signed is None:
            raise LocalTransferError(f"no transfer to resume in {spool.root}")
        return cls(signed, spool, **kwargs)

    # control

    @property
    def state(self) -> State:
        return self.machine.state

    def accept(self) -> None:
        self.machine.fire(Event.ACCEPT)
        if len(self.done) == self.manifest.count:
            self._finish()

    def _finish(self) -> None:
        # The same study offered again later has the same transfer id: a state left
        # here would call instances done that the store may no longer hold.
        self.machine.fire(Event.FINISH)
        for name in (STATE_FILE, JOURNAL_FILE, MANIFEST_FILE, WIRES_FILE):
            self.spool.remove(name)

    def pause(self) -> None:
        self.machine.fire(Event.PAUSE)

    def resume_transfer(self) -> None:
        self.machine.fire(Event.RESUME)
        if len(self.done) == self.manifest.count:
            self._finish()  # the last entries, declared while paused, were all held

    def cancel(self, reason: str = "cancelled by the receiver") -> Cancel:
        self.machine.fire(Event.CANCEL)
        for index in list(self._partials):
            self.spool.drop_part(index)
        return Cancel(self.manifest.transfer_id, reason)

    def prioritise(self, index: int) -> None:
        """Fetch this instance next (the slice on screen), ahead of the series order."""
        if not 0 <= index < self.manifest.count:
            raise LocalTransferError(f"instance {index} is not in this study")
        if index in self._priority:
            self._priority.remove(index)
        self._priority.insert(0, index)

    def find(self, sop_instance_uid: str) -> int | None:
        """The index of an instance declared so far (None: not declared, or not in it)."""
        index = self._uids.get(sop_instance_uid)
        if index is not None:
            return index
        for i, entry in self.entries.items():
            if entry.sop_instance_uid == sop_instance_uid:
                return i
        return None

    def index_of(self, sop_instance_uid: str) -> int:
        index = self.find(sop_instance_uid)
        if index is None:
            raise LocalTransferError(f"instance {sop_instance_uid} is not declared in this study")
        return index

    # declarations

    def declare(self, message: Declare, now: float) -> list[DecompressionBomb]:
        """Take a signed wire declaration; return the instances it refuses (over budget:
        never requested, the rest of the study still comes).

        Raises (after failing the transfer; the caller drops the peer)
        :class:`MalformedMessage` for a bad signature, shape or an index past ``count``,
        :class:`DecompressionBomb` for entries over ``total`` (or an instance over the
        per-instance cap), and :class:`ManifestMismatch` for a declaration signed by
        another key than the manifest, naming another transfer or study, repeating an
        instance UID under another index, or contradicting an earlier one.
        """
        try:
            return self._declare(message, now)
        except RemoteTransferError as exc:
            self._fail(exc)
            raise

    def _declare(self, message: Declare, now: float) -> list[DecompressionBomb]:
        if self.state in TERMINAL:
            return []
        batch = open_wires(message.data)
        if batch.signer != self.sender_key:
            raise ManifestMismatch(
                "a wire declaration is signed by another key than the study manifest: refused"
            )
        tid = self.manifest.transfer_id
        if batch.transfer_id != tid or message.transfer_id != tid:
            raise ManifestMismatch("a wire declaration names another transfer: refused")
        if batch.study_uid != self.manifest.study_instance_uid:
            raise ManifestMismatch("a wire declaration names another study: refused")
        refused: list[DecompressionBomb] = []
        fresh = False
        dropped = False
        for d in batch.declarations:
            if d.index >= self.manifest.count:
                raise MalformedMessage(
                    f"wire declaration for instance {d.index}: the manifest has "
                    f"{self.manifest.count}"
                )
            known = self._session.get(d.index)
            if known is not None:
                if known.entry != d.entry or (known.encoded and d.encoded and known != d):
                    raise ManifestMismatch(
                        f"the sender declared instance {d.index} twice, differently: its "
                        "entry or encoding changed under the transfer; refused"
                    )
                if known.encoded or not d.encoded:
                    continue  # nothing new
            else:
                self._take_entry(d)
            self._session[d.index] = d
            fresh = True
            saved = self.wires.get(d.index)
            if saved is not None and saved.entry != d.entry:
                # Received (or stored) before a restart under an entry the restarted
                # sender contradicts (its de-identification is not what it was): fetched
                # again as declared now, never taken as it was.
                self._forget(d.index)
                self.done.discard(d.index)
                self._first = min(self._first, d.index)
                del self.wires[d.index]
                saved, dropped = None, True
            self._skip_if_held(d.index, d.entry)
            if not d.encoded:
                continue  # listed; its encoding is declared later
            try:
                d.check_budget()
            except DecompressionBomb as exc:
                self.refused[d.index] = exc
                refused.append(exc)
                continue
            if saved is not None and saved != d and d.index not in self.ready:
                # Received in part under an earlier declaration (before a restart): the
                # sender encodes it otherwise now, so those bytes are of no use.
                self._forget(d.index)
                dropped = True
            if saved is None or d.index not in self.ready:
                self.wires[d.index] = d  # a complete part is checked as it was received
        self._news_at = now
        if fresh:
            self.spool.append_sealed(WIRES_FILE, message.data)
        if dropped:
            self._persist()
        if len(self.done) == self.manifest.count and self.state is State.RUNNING:
            self._finish()  # the last entries named instances the store already holds
            return refused
        self._check_end()
        return refused

    def _take_entry(self, d: WireDeclaration) -> None:
        """A first declaration of ``d.index`` this run: held to the manifest's word."""
        uid = d.entry.sop_instance_uid
        if self._uids.setdefault(uid, d.index) != d.index:
            raise ManifestMismatch(
                f"the sender declared instance {uid} twice, as instances "
                f"{self._uids[uid]} and {d.index}: refused"
            )
        self._session_bytes += d.entry.size
        if self._session_bytes > self.manifest.total_size:
            raise DecompressionBomb(
                f"the sender's declared instances add up to over the "
                f"{self.manifest.total_size} bytes its manifest signed for: refused"
            )

    def _forget(self, index: int) -> None:
        """Drop what was received of ``index``: it is fetched whole, as declared now."""
        self._partials.pop(index, None)
        self.ready.discard(index)
        self.spool.drop_part(index)
        self.parts_redeclared += 1

    def _fail(self, error: RemoteTransferError) -> None:
        if self.failure is None:
            self.failure = error
        if self.state in (State.RUNNING, State.PAUSED):
            self.machine.fire(Event.FAIL)

    def _check_end(self) -> None:
        """Everything not refused is stored: the transfer fails with the first refusal."""
        if self.refused and len(self.done) + len(self.refused.keys() - self.done) == (
            self.manifest.count
        ):
            self._fail(next(iter(self.refused.values())))

    def _encoded(self, index: int) -> bool:
        """The sender declared its encoding this run."""
        known = self._session.get(index)
        return known is not None and known.encoded

    def _fetchable(self, index: int) -> bool:
        return self._encoded(index) and index not in self.refused

    # requests

    def _order(self) -> Iterable[int]:
        seen = set()
        while self._first in self.done:  # instances before it are all done: skip them
            self._first += 1
        rest = range(self._first, self.manifest.count)
        for index in itertools.chain(self._priority, list(self._partials), rest):
            if index not in seen:
                seen.add(index)
                yield index

    def _outstanding(self) -> int:
        return sum(len(p.outstanding) for p in self._partials.values())

    def poll(self, now: float) -> list[Request | Hurry]:
        """The chunk requests to send now (new ones within the window, and timed-out
        ones), and a Hurry for an instance waited for but not declared."""
        if self.state is not State.RUNNING:
            return []
        requests: list[Request | Hurry] = []
        if self._news_at is None:
            self._news_at = now
        hurry = self._hurry(now)
        if hurry is not None:
            self._hurried, self._hurry_at = hurry, now
            requests.append(Hurry(self.manifest.transfer_id, hurry))
        budget = self.window - self._outstanding()
        for partial_index, active in self._partials.items():
            stale = [s for s, t in active.outstanding.items() if now - t >= self.timeout]
            if stale:
                for s in stale:
                    active.outstanding[s] = now
                self.chunks_rerequested += len(stale)
                requests.append(Request(self.manifest.transfer_id, partial_index, tuple(stale)))
        # Parts restored after a restart wait for their new declaration without a slot.
        busy = sum(1 for i in self._partials if self._fetchable(i))
        for index in self._order():
            if budget <= 0:
                break
            if index in self.done or index in self.ready or not self._fetchable(index):
                continue
            partial = self._partials.get(index)
            if partial is None:
                if busy >= MAX_ACTIVE_INSTANCES and index not in self._priority:
                    # Past the priorities and the parts begun: every later index is new
                    # too, so none can start (scanning on cost a pass over the study).
                    break
                partial = _Partial(self.wires[index].chunk_count(self.manifest.chunk_size))
                self._partials[index] = partial
                busy += 1
            wanted = [
                s
                for s in range(partial.count)
                if s not in partial.verified and s not in partial.outstanding
            ][: min(budget, MAX_SEQS_PER_REQUEST)]
            if not wanted:
                continue
            for s in wanted:
                partial.outstanding[s] = now
            budget -= len(wanted)
            self.chunks_requested += len(wanted)
            requests.append(Request(self.manifest.transfer_id, index, tuple(wanted)))
        return requests

    def _hurry(self, now: float) -> int | None:
        """The instance to hurry now: the one on screen when it is not declared (once),
        or, after ``timeout`` with nothing to fetch and nothing heard, the first one not
        declared (the sender encodes it next, or declares it again: a batch was lost)."""
        waiting = [i for i in self._priority if i not in self.done and not self._encoded(i)]
        if waiting and waiting[0] != self._hurried:
            return waiting[0]
        assert self._news_at is not None  # noqa: S101 -- set by poll
        if (
            self._outstanding() == 0
            and now - self._news_at >= self.timeout
            and now - self._hurry_at >= self.timeout
        ):
            for index in range(self._first, self.manifest.count):
                if index not in self.done and not self._encoded(index):
                    return index
        return None

    def receive(self, chunk: Chunk, now: float) -> int | None:
        """Verify and spool a chunk. Returns the instance index once all its chunks are in.

        Raises :class:`ChunkRejected` (the chunk is not written; it will be requested
        again when its request times out, or at once for a damaged one).
        """
        if self.state in TERMINAL:
            raise ChunkRejected(f"chunk arrived after the transfer was {self.state.value}")
        self.machine.fire(Event.DATA)
        if chunk.transfer_id != self.manifest.transfer_id:
            raise ChunkRejected("chunk belongs to another transfer")
        self._news_at = now
        partial = self._partials.get(chunk.index)
        if partial is None or chunk.seq not in partial.outstanding:
            self.chunks_rejected += 1
            raise ChunkRejected(
                f"chunk {chunk.seq} of instance {chunk.index} was not requested "
                "(duplicate, out of place or already verified); ignored"
            )
        entry = self.wires[chunk.index].entry
        size = self.manifest.chunk_size
        expected = min(size, self.wires[chunk.index].wire_size - chunk.seq * size)
        if len(chunk.data) != expected:
            self.chunks_rejected += 1
            raise ChunkRejected(
                f"chunk {chunk.seq} of instance {entry.sop_instance_uid} has {len(chunk.data)} "
                f"bytes where the manifest implies {expected}: the instance is not the size "
                "the sender declared"
            )
        if chunk_digest(chunk.data) != chunk.digest:
            self.chunks_rejected += 1
            del partial.outstanding[chunk.seq]  # ask again at the next poll
            raise ChunkRejected(
                f"chunk {chunk.seq} of instance {entry.sop_instance_uid} is damaged "
                "(hash mismatch); not written, requested again"
            )
        receipt = self.spool.write_chunk(chunk.index, chunk.seq, chunk.seq * size, chunk.data)
        del partial.outstanding[chunk.seq]
        partial.verified[chunk.seq] = receipt
        self.chunks_received += 1
        # Appending a record is far cheaper than rewriting the state for every chunk; it
        # is not fsynced: after a power cut, restore checks each record against the part.
        self.spool.append(JOURNAL_FILE, _JOURNAL_RECORD.pack(chunk.index, chunk.seq, receipt))
        if len(partial.verified) == partial.count:
            self.ready.add(chunk.index)
            return chunk.index
        return None

    def verify_part(self, index: int) -> bytes:
        """Decode a fully received instance and check it against the manifest.

        Reads only (safe in a worker thread: JPEG-LS decoding is the CPU-heavy part).
        Raises :class:`node.dicom.wirecodec.WireCodecError` or OSError (damage: pass it to
        :meth:`reject_part`), or :class:`DecompressionBomb` / :class:`ManifestMismatch`
        (the sender's doing: pass it to :meth:`refuse_part`).
        """
        partial = self._partials.get(index)
        if index not in self.ready or partial is None:
            raise LocalTransferError(f"instance {index} is not fully received")
        chunks = [
            (*self._extent(index, seq), partial.verified[seq]) for seq in range(partial.count)
        ]
        part = self.spool.read_part(index, chunks)
        declared = self.wires[index]
        if len(part) != declared.wire_size or wire_digest(part) != declared.digest:
            raise wirecodec.CorruptInstance("its wire bytes differ from the sender's declaration")
        return decode_part(
            part,
            declared.entry,
            self.manifest.study_instance_uid,
            declared.wire_size,
        )

    def reject_part(self, index: int, exc: Exception) -> TransferError:
        """Forget a received instance that failed :meth:`verify_part`; return the error.

        The instance is requested again from scratch; the second failure fails the
        transfer (:class:`ManifestMismatch`).
        """
        entry = self.wires[index].entry
        self.ready.discard(index)
        self._partials.pop(index, None)
        self.spool.drop_part(index)
        if self._encoded(index):  # fetched again as declared now
            self.wires[index] = self._session[index]
        self._attempts[index] = self._attempts.get(index, 0) + 1
        self._persist()
        if self._attempts[index] >= MAX_INSTANCE_ATTEMPTS:
            self.machine.fire(Event.FAIL)
            return ManifestMismatch(
                f"instance {entry.sop_instance_uid} arrived twice but never matched the "
                f"signed manifest ({exc}). The sender's copy changed or the peer is "
                "misbehaving: ask them to share the study again."
            )
        return InstanceRejected(
            f"instance {entry.sop_instance_uid} does not match the manifest ({exc}); "
            "fetching it again"
        )

    def refuse_part(self, index: int, error: RemoteTransferError) -> RemoteTransferError:
        """Fail the transfer for an instance the sender misrepresented (a bomb, another
        instance than the manifest names): its part is dropped, nothing is stored, and
        ``error`` is returned for the caller to raise (and to drop the peer)."""
        self.ready.discard(index)
        self._partials.pop(index, None)
        self.spool.drop_part(index)
        self._persist()
        self._fail(error)
        return error

    def assemble(self, index: int) -> bytes:
        """:meth:`verify_part`, raising the transfer error of :meth:`reject_part` or
        :meth:`refuse_part`."""
        try:
            return self.verify_part(index)
        except RemoteTransferError as exc:
            raise self.refuse_part(index, exc) from exc
        except (wirecodec.WireCodecError, OSError) as exc:
            raise self.reject_part(index, exc) from exc

    def stored(self, index: int, now: float) -> Finished | None:
        """The instance is committed to the store. Returns Finished when the study is."""
        self.machine.fire(Event.DATA)
        self.ready.discard(index)
        self._partials.pop(index, None)
        if index in self._priority:
            self._priority.remove(index)
        self.done.add(index)
        self.spool.drop_part(index)
        # The state only: the instance's journal records are ignored once it is done.
        self._state_dirty = True
        if self._state_saved_at is None or now - self._state_saved_at >= self.state_every:
            self.save_state()
            self._state_saved_at = now
        size = self.wires[index].entry.size
        if self._last is not None and now > self._last[0]:
            instant = size / (now - self._last[0])
            self._rate = instant if self._rate == 0 else 0.8 * self._rate + 0.2 * instant
        self._last = (now, size)
        if len(self.done) == self.manifest.count:
            self._finish()
            return Finished(self.manifest.transfer_id)
        self._check_end()
        return None

    def progress(self) -> Progress:
        """Bytes against the signed bound until every entry is declared, then exact."""
        known = self.entries
        done_bytes = sum(known[i].size for i in self.done if i in known)
        total = self.manifest.total_size
        if len(known) == self.manifest.count:
            total = sum(e.size for e in known.values())
        eta = (total - done_bytes) / self._rate if self._rate > 0 else None
        count = self.manifest.count
        return Progress(done_bytes, total, len(self.done), count, self._rate, eta)

    def missing(self) -> Sequence[int]:
        return [i for i in range(self.manifest.count) if i not in self.done]


def resume_request(spool: Spool, sender_key: bytes) -> ResumeRequest | None:
    """What a (re)started receiver asks ``sender_key`` for: the unfinished transfer in
    its spool, if that peer signed its manifest. None when there is nothing to ask
    (a finished transfer leaves no manifest; a damaged one is replaced by the next offer).
    """
    signed = spool.load(MANIFEST_FILE)
    if signed is None:
        return None
    try:
        signer, manifest = Manifest.open(signed)
    except MalformedMessage:
        return None
    return ResumeRequest(manifest.transfer_id) if signer == sender_key else None
