"""The sans-IO transfer protocol delivers studies byte-exact over a bad link, and resumes."""

from __future__ import annotations

import dataclasses
import io
import itertools
import random
import shutil
from pathlib import Path

import msgpack
import pydicom
import pytest
from pydicom.data import get_testdata_file

from bench.bench_codec import ct_series
from crypto.identity import Identity
from node.dicom import wirecodec
from peer_transport.transfer.errors import (
    ChunkRejected,
    IllegalTransition,
    InstanceRejected,
    MalformedMessage,
    ManifestMismatch,
)
from peer_transport.transfer.instance import prepare_instance
from peer_transport.transfer.machine import State
from peer_transport.transfer.manifest import (
    Manifest,
    WireDeclaration,
    build_manifest,
    chunk_count,
    wire_digest,
)
from peer_transport.transfer.messages import (
    MAX_CHUNK_MESSAGE,
    MAX_OFFERS_ASSEMBLED,
    Cancel,
    Chunk,
    Finished,
    Hurry,
    Message,
    OfferAssembler,
    OfferPart,
    Request,
    ResumeRequest,
    chunk_digest,
    from_wire,
    to_wire,
)
from peer_transport.transfer.progress import Progress
from peer_transport.transfer.receiver import MAX_ACTIVE_INSTANCES, Receiver, resume_request
from peer_transport.transfer.sender import Sender
from peer_transport.transfer.spool import Spool
from tests.peer_transport.transfer_links import wire_sender

SMALL_CHUNK = 4096  # several chunks per small instance, so chunking is exercised


def _sample(name: str) -> bytes:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} ships with pydicom"
    return Path(str(path)).read_bytes()


def _in_study(data: bytes, study_uid: str) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.StudyInstanceUID = study_uid
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def _study(n_ct: int = 6, seed: int = 1) -> list[bytes]:
    # Generated CT (JPEG-LS path) plus shipped samples with other encodings, moved into
    # the CT's study: a receiver checks each instance's UIDs against the manifest.
    files = ct_series(n_ct, seed=seed, size=96)
    study = str(pydicom.dcmread(io.BytesIO(files[0])).StudyInstanceUID)
    samples = ("MR_small_bigendian.dcm", "JPEG2000.dcm", "CT_small.dcm")
    return files + [_in_study(_sample(name), study) for name in samples]


@dataclasses.dataclass
class Offer:
    signed: bytes
    manifest: Manifest
    wires: list[bytes]
    originals: list[bytes]
    identity: Identity

    def sender(self) -> Sender:
        """A sender that has encoded (declared) every instance."""
        sender = wire_sender(self.manifest, self.signed, self.wires, self.identity)
        for index, wire in enumerate(self.wires):
            entry = self.manifest.entries[index]
            sender.declare(WireDeclaration(index, len(wire), wire_digest(wire), entry))
        return sender


def _declare(receiver: Receiver, sender: Sender, now: float) -> None:
    """The sender's declarations due, taken by the receiver (the control channel is
    reliable and ordered; only requests and chunks cross the bad link here)."""
    for declaration in sender.declarations(now, flush=True):
        receiver.declare(declaration, now)


def _offer(files: list[bytes], identity: Identity, lie: int | None = None) -> Offer:
    prepared = [prepare_instance(f) for f in files]
    entries = [p[0] for p in prepared]
    if lie is not None:
        entries[lie] = dataclasses.replace(entries[lie], sha256=bytes(32))
    manifest = build_manifest(entries, prepared[0][1], chunk_size=SMALL_CHUNK)
    by_uid = {p[0].sop_instance_uid: (p[2], f) for p, f in zip(prepared, files, strict=True)}
    wires = [by_uid[e.sop_instance_uid][0] for e in manifest.entries]
    originals = [by_uid[e.sop_instance_uid][1] for e in manifest.entries]
    return Offer(manifest.sign(identity), manifest, wires, originals, identity)


class Link:
    """One direction of a bad link: drops, duplicates, corrupts, delays (so reorders)."""

    def __init__(
        self, rng: random.Random, loss: float, dup: float, corrupt: float, max_delay: float
    ) -> None:
        self.rng, self.loss, self.dup, self.corrupt, self.max_delay = (
            rng,
            loss,
            dup,
            corrupt,
            max_delay,
        )
        self.queue: list[tuple[float, int, bytes]] = []
        self.lost_units = 0  # chunks that will never arrive intact because of this link
        self.counter = 0

    def send(self, message: Message, now: float) -> None:
        units = len(message.seqs) if isinstance(message, Request) else 1
        if self.rng.random() < self.loss:
            self.lost_units += units if isinstance(message, Request | Chunk) else 0
            return
        copies = 2 if self.rng.random() < self.dup else 1
        for copy in range(copies):
            wire = bytearray(to_wire(message))
            if isinstance(message, Chunk) and self.rng.random() < self.corrupt:
                wire[-1 - self.rng.randrange(min(len(message.data), 64))] ^= 0x01
                self.lost_units += 1 if copy == 0 else 0
            self.counter += 1
            self.queue.append(
                (now + self.rng.uniform(0, self.max_delay), self.counter, bytes(wire))
            )

    def deliver(self, now: float) -> list[Message]:
        due = sorted(item for item in self.queue if item[0] <= now)
        self.queue = [item for item in self.queue if item[0] > now]
        return [from_wire(item[2]) for item in due]


@dataclasses.dataclass
class Outcome:
    stored: dict[int, bytes]
    order: list[int]
    rejected: int


def _drive(
    receiver: Receiver,
    sender: Sender,
    up: Link,
    down: Link,
    now: float = 0.0,
    max_steps: int = 5000,
    stop_after: int | None = None,
    on_step: object = None,
) -> tuple[Outcome, float]:
    outcome = Outcome({}, [], 0)
    for _ in range(max_steps):
        _declare(receiver, sender, now)
        for request in receiver.poll(now):
            up.send(request, now)
        for message in up.deliver(now):
            for chunk in sender.receive(message):
                down.send(chunk, now)
        for message in down.deliver(now):
            assert isinstance(message, Chunk)
            try:
                index = receiver.receive(message, now)
            except ChunkRejected:
                outcome.rejected += 1
                continue
            if index is not None:
                outcome.stored[index] = receiver.assemble(index)
                outcome.order.append(index)
                if receiver.stored(index, now) is not None:
                    return outcome, now
                if stop_after is not None and len(outcome.order) >= stop_after:
                    return outcome, now
        if callable(on_step):
            on_step(receiver, outcome)
        now += 0.05
    raise AssertionError("transfer did not finish within the step budget")


def _pair(offer: Offer, spool: Spool, **kwargs: object) -> tuple[Receiver, Sender]:
    receiver = Receiver(offer.signed, spool, window=8, timeout=1.0, **kwargs)  # type: ignore[arg-type]
    receiver.accept()
    sender = offer.sender()
    _declare(receiver, sender, 0.0)
    return receiver, sender


def _total_chunks(offer: Offer) -> int:
    return sum(chunk_count(len(w), offer.manifest.chunk_size) for w in offer.wires)


@pytest.fixture(scope="module")
def offer() -> Offer:
    return _offer(_study(), Identity.generate())


def test_clean_link_delivers_every_instance_byte_exact(offer: Offer, tmp_path: Path) -> None:
    receiver, sender = _pair(offer, Spool(tmp_path))
    rng = random.Random(0)
    outcome, _ = _drive(receiver, sender, Link(rng, 0, 0, 0, 0), Link(rng, 0, 0, 0, 0))
    assert outcome.stored == dict(enumerate(offer.originals))
    assert receiver.state is State.COMPLETE
    assert receiver.chunks_requested == _total_chunks(offer)
    assert outcome.order == sorted(outcome.order)  # series order on a clean link
    # Nothing left behind: a later offer of the same study (same transfer id) must
    # not find these instances called done.
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("seed", range(8))
def test_lossy_reordering_link_completes_with_bounded_resends(
    offer: Offer, tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    up = Link(rng, loss=0.1, dup=0.1, corrupt=0.0, max_delay=0.3)
    down = Link(rng, loss=0.1, dup=0.1, corrupt=0.1, max_delay=0.3)
    receiver, sender = _pair(offer, Spool(tmp_path))
    outcome, _ = _drive(receiver, sender, up, down)
    assert outcome.stored == dict(enumerate(offer.originals))
    lost = up.lost_units + down.lost_units
    assert lost > 0, "the fake link must actually lose something for this test to mean much"
    resent = receiver.chunks_requested + receiver.chunks_rerequested
    resent -= _total_chunks(offer)
    assert 0 <= resent <= lost  # one resend per chunk lost or damaged, never more


def test_instances_already_held_are_never_requested(offer: Offer, tmp_path: Path) -> None:
    held = {offer.manifest.entries[i].sha256 for i in (0, 2)}
    receiver, sender = _pair(offer, Spool(tmp_path), have=held.__contains__)
    requested: set[int] = set()
    real_poll = receiver.poll

    def spy(now: float) -> list[Request | Hurry]:
        requests = real_poll(now)
        requested.update(r.index for r in requests)
        return requests

    receiver.poll = spy  # type: ignore[method-assign]
    rng = random.Random(1)
    outcome, _ = _drive(receiver, sender, Link(rng, 0, 0, 0, 0), Link(rng, 0, 0, 0, 0))
    assert requested == set(range(len(offer.wires))) - {0, 2}
    assert set(outcome.stored) == requested
    assert receiver.progress().instances_done == len(offer.wires)


def test_prioritised_instance_overtakes_the_queue(tmp_path: Path) -> None:
    offer = _offer(ct_series(14, seed=3, size=96), Identity.generate())
    receiver, sender = _pair(offer, Spool(tmp_path))
    rng = random.Random(2)
    link_up, link_down = Link(rng, 0, 0, 0, 0), Link(rng, 0, 0, 0, 0)
    first, now = _drive(receiver, sender, link_up, link_down, stop_after=1)
    last = len(offer.wires) - 1
    receiver.prioritise(last)
    rest, _ = _drive(receiver, sender, link_up, link_down, now=now)
    # Only instances already in flight (window of 8 chunks) may finish before it.
    assert rest.order.index(last) <= 3
    assert rest.order.index(last) < rest.order.index(last - 1)
    assert {**first.stored, **rest.stored} == dict(enumerate(offer.originals))


def test_at_most_max_active_instances_are_begun_at_once_save_the_one_on_screen(
    tmp_path: Path,
) -> None:
    offer = _offer(ct_series(MAX_ACTIVE_INSTANCES + 4, seed=5, size=32), Identity.generate())
    receiver = Receiver(offer.signed, Spool(tmp_path), window=100_000, timeout=1.0)
    receiver.accept()
    _declare(receiver, offer.sender(), 0.0)
    begun = {r.index for r in receiver.poll(0.0) if isinstance(r, Request)}
    assert begun == set(range(MAX_ACTIVE_INSTANCES))  # the window has room for them all
    last = len(offer.wires) - 1
    receiver.prioritise(last)
    again = {r.index for r in receiver.poll(0.1) if isinstance(r, Request)}
    assert last in again
    assert again <= begun | {last}  # the rest of what was begun, and nothing else new


def test_receiver_killed_mid_transfer_resumes_from_its_spool(offer: Offer, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    receiver, sender = _pair(offer, spool)
    rng = random.Random(3)
    up, down = Link(rng, 0, 0, 0, 0.1), Link(rng, 0, 0, 0, 0.1)
    half = len(offer.wires) // 2
    first, now = _drive(receiver, sender, up, down, stop_after=half)
    # A few more steps so an instance is part-way through, then "kill -9": the
    # receiver object, the link contents and everything in flight are gone.
    for _ in range(2):
        for r in receiver.poll(now):
            for c in sender.receive(r):
                receiver.receive(c, now)
    before = receiver.chunks_requested
    in_flight = receiver._outstanding()
    partial_verified = sum(len(p.verified) for p in receiver._partials.values())
    assert partial_verified > 0, "the kill must land inside a partly received instance"
    del receiver

    revived = Receiver.resume(Spool(tmp_path / "spool"), window=8, timeout=1.0)
    assert revived.done == set(first.order)
    revived.accept()
    # Instances whose every chunk was spooled before the kill are committed first,
    # as StudyReceiver.run does.
    committed = {index: revived.assemble(index) for index in sorted(revived.ready)}
    for index in committed:
        revived.stored(index, now)
    fresh = offer.sender()
    rest, _ = _drive(revived, fresh, Link(rng, 0, 0, 0, 0), Link(rng, 0, 0, 0, 0), now=now)
    assert {**first.stored, **committed, **rest.stored} == dict(enumerate(offer.originals))
    total = _total_chunks(offer)
    assert before + revived.chunks_requested <= total + in_flight


def test_receiver_with_a_lagging_state_file_resumes_through_the_store(
    offer: Offer, tmp_path: Path
) -> None:
    # state_every: the state file is rewritten at most that often (the runner's way);
    # what was stored after the last rewrite is found again through the store.
    receiver, sender = _pair(offer, Spool(tmp_path / "spool"), state_every=3600.0)
    clean = Link(random.Random(5), 0, 0, 0, 0)
    first, now = _drive(receiver, sender, clean, Link(random.Random(6), 0, 0, 0, 0), stop_after=4)
    for _ in range(2):  # part-way into the next instance, then "kill -9"
        for r in receiver.poll(now):
            for c in sender.receive(r):
                receiver.receive(c, now)
    del receiver
    shutil.copytree(tmp_path / "spool", tmp_path / "copy")  # resuming rewrites the journal
    lagging = Receiver.resume(Spool(tmp_path / "copy"), window=8, timeout=1.0)
    assert lagging.done == {first.order[0]}, "only the first store rewrote the state file"
    held = {offer.manifest.entries[i].sha256 for i in first.stored}
    revived = Receiver.resume(
        Spool(tmp_path / "spool"), window=8, timeout=1.0, have=held.__contains__
    )
    assert revived.done == set(first.order)
    assert not revived._partials.keys() & revived.done  # no part left for a stored one
    revived.accept()
    committed = {index: revived.assemble(index) for index in sorted(revived.ready)}
    for index in committed:  # fully spooled before the kill: committed first, as run() does
        revived.stored(index, now)
    fresh = offer.sender()
    rest, _ = _drive(revived, fresh, Link(random.Random(7), 0, 0, 0, 0), clean, now=now)
    assert {**first.stored, **committed, **rest.stored} == dict(enumerate(offer.originals))
    assert not (set(rest.stored) | set(committed)) & set(first.stored)  # none fetched again


def test_restarted_receiver_asks_the_signer_for_its_unfinished_transfer_and_is_offered_it(
    offer: Offer, tmp_path: Path
) -> None:
    signer, _ = Manifest.open(offer.signed)
    assert resume_request(Spool(tmp_path / "spool"), signer) is None  # nothing spooled yet
    receiver, sender = _pair(offer, Spool(tmp_path / "spool"))
    sender.offer(0.0)
    rng = random.Random(4)
    first, now = _drive(
        receiver, sender, Link(rng, 0, 0, 0, 0), Link(rng, 0, 0, 0, 0), stop_after=2
    )
    del receiver  # kill -9

    ask = resume_request(Spool(tmp_path / "spool"), signer)
    assert ask == ResumeRequest(offer.manifest.transfer_id)
    # Another peer never learns which transfer this spool holds.
    assert resume_request(Spool(tmp_path / "spool"), Identity.generate().public_key) is None
    assembler = OfferAssembler()
    offered = [assembler.add(part) for part in sender.resume(ask, now + 5)]
    assert offered[-1] == offer.signed  # the same manifest, sent again at once

    revived = Receiver(offered[-1], Spool(tmp_path / "spool"), window=8, timeout=1.0)
    assert revived.done == set(first.order)
    revived.accept()
    committed = {index: revived.assemble(index) for index in sorted(revived.ready)}
    for index in committed:
        revived.stored(index, now)
    rest, _ = _drive(revived, sender, Link(rng, 0, 0, 0, 0), Link(rng, 0, 0, 0, 0), now=now)
    assert {**first.stored, **committed, **rest.stored} == dict(enumerate(offer.originals))
    # Finished: the spool has nothing left to ask for.
    assert resume_request(Spool(tmp_path / "spool"), signer) is None


def test_sender_offers_again_only_for_its_running_transfer_and_not_in_a_flood(
    offer: Offer,
) -> None:
    ask = ResumeRequest(offer.manifest.transfer_id)
    sender = offer.sender()
    assert sender.offer(10.0)
    assert sender.resume(ResumeRequest(bytes(16)), 20.0) == []  # not a transfer it serves
    assert sender.resume(ask, 10.5) == []  # an offer just went out, nobody used it yet
    assert [p.data for p in sender.resume(ask, 11.0)] == [p.data for p in sender.offer(11.0)]
    sender.receive(Request(offer.manifest.transfer_id, 0, (0,)))
    assert sender.resume(ask, 11.1)  # requests came since: a receiver that restarted since
    sender.receive(Finished(offer.manifest.transfer_id))
    assert sender.resume(ask, 60.0) == []  # a finished share is not served again
    cancelled = offer.sender()
    cancelled.receive(Cancel(offer.manifest.transfer_id, "withdrawn"))
    assert cancelled.resume(ask, 60.0) == []
    with pytest.raises(MalformedMessage):
        cancelled.receive(ask)  # resume requests are not chunk requests


def test_damaged_chunk_is_rejected_not_written_and_fetched_again(
    offer: Offer, tmp_path: Path
) -> None:
    receiver, sender = _pair(offer, Spool(tmp_path))
    request = receiver.poll(0.0)[0]
    chunk = sender.receive(request)[0]
    bad = dataclasses.replace(chunk, data=b"\xff" + chunk.data[1:])
    with pytest.raises(ChunkRejected, match="damaged"):
        receiver.receive(bad, 0.0)
    assert not (tmp_path / f"{chunk.index}.part").exists()
    again = [r for r in receiver.poll(0.1) if isinstance(r, Request) and r.index == chunk.index]
    assert any(chunk.seq in r.seqs for r in again)


def test_unrequested_or_duplicate_chunk_is_rejected(offer: Offer, tmp_path: Path) -> None:
    receiver, sender = _pair(offer, Spool(tmp_path))
    chunk = sender.receive(receiver.poll(0.0)[0])[0]
    receiver.receive(chunk, 0.0)
    with pytest.raises(ChunkRejected, match="not requested"):
        receiver.receive(chunk, 0.0)
    stray = sender.receive(Request(offer.manifest.transfer_id, len(offer.wires) - 1, (0,)))[0]
    with pytest.raises(ChunkRejected, match="not requested"):
        receiver.receive(stray, 0.0)


def test_instance_larger_than_declared_is_rejected(offer: Offer, tmp_path: Path) -> None:
    receiver, sender = _pair(offer, Spool(tmp_path))
    chunk = sender.receive(receiver.poll(0.0)[0])[0]
    longer = chunk.data + b"extra"
    bigger = dataclasses.replace(chunk, data=longer, digest=chunk_digest(longer))
    with pytest.raises(ChunkRejected, match="not the size the sender declared"):
        receiver.receive(bigger, 0.0)


def test_manifest_that_lies_about_a_hash_fails_the_transfer(tmp_path: Path) -> None:
    offer = _offer(ct_series(2, seed=5, size=64), Identity.generate(), lie=1)
    receiver, sender = _pair(offer, Spool(tmp_path))
    rng = random.Random(4)
    with pytest.raises(InstanceRejected, match="does not match the manifest"):
        _drive(receiver, sender, Link(rng, 0, 0, 0, 0), Link(rng, 0, 0, 0, 0))
    with pytest.raises(ManifestMismatch, match="share the study again"):
        _drive(receiver, sender, Link(rng, 0, 0, 0, 0), Link(rng, 0, 0, 0, 0))
    assert receiver.state is State.FAILED
    assert 1 not in receiver.done


def test_tampered_manifest_is_refused(offer: Offer, tmp_path: Path) -> None:
    signed = bytearray(offer.signed)
    signed[len(signed) // 2] ^= 0x01
    with pytest.raises(MalformedMessage):
        Receiver(bytes(signed), Spool(tmp_path))


def test_pause_stops_requests_and_cancel_tells_the_sender(offer: Offer, tmp_path: Path) -> None:
    receiver, sender = _pair(offer, Spool(tmp_path))
    assert receiver.poll(0.0)
    receiver.pause()
    assert receiver.poll(10.0) == []
    with pytest.raises(IllegalTransition, match="cannot pause a transfer that is paused"):
        receiver.pause()
    receiver.resume_transfer()
    assert receiver.poll(20.0)  # timed-out requests go out again
    cancel = receiver.cancel()
    sender.receive(from_wire(to_wire(cancel)))
    assert sender.machine.state is State.CANCELLED
    assert not list(tmp_path.glob("*.part"))
    with pytest.raises(IllegalTransition):
        receiver.accept()


def test_progress_reports_bytes_instances_rate_and_eta(offer: Offer, tmp_path: Path) -> None:
    receiver, sender = _pair(offer, Spool(tmp_path))
    seen: list[Progress] = []
    rng = random.Random(5)
    _drive(
        receiver,
        sender,
        Link(rng, 0, 0, 0, 0),
        Link(rng, 0, 0, 0, 0),
        on_step=lambda r, _o: seen.append(r.progress()),
    )
    middle = [p for p in seen if 0 < p.instances_done < p.instances_total]
    assert middle
    assert all(a.bytes_done <= b.bytes_done for a, b in itertools.pairwise(seen))
    assert any(p.rate > 0 and p.eta is not None and p.eta > 0 for p in middle)
    assert receiver.progress().fraction == 1.0


def test_message_wire_format_is_stable() -> None:
    tid = bytes(range(16))
    request = Request(tid, 3, (0, 1, 300))
    golden = bytes.fromhex(
        "94"  # array of 4
        "a3726571"  # "req"
        "c410" + tid.hex() +  # bin 16: transfer id
        "03"  # instance index 3
        "93" "00" "01" "cd012c"  # array of 3 seqs: 0, 1, 300 (uint16)
    )  # fmt: skip
    assert to_wire(request) == golden
    assert from_wire(golden) == request
    chunk = Chunk(tid, 1, 2, chunk_digest(b"abc"), b"abc")
    assert from_wire(to_wire(chunk)) == chunk
    with pytest.raises(MalformedMessage, match="over the limit"):
        from_wire(b"\x00" * (MAX_CHUNK_MESSAGE + 1))
    with pytest.raises(MalformedMessage):
        from_wire(b"\x93\xa3req\x01\x02")
    resume = ResumeRequest(tid)
    golden = bytes.fromhex("92" "a6726573756d65" "c410" + tid.hex())  # ["resume", id]  # fmt: skip
    assert to_wire(resume) == golden
    assert from_wire(golden) == resume
    for bad in (
        ["resume"],  # no transfer id
        ["resume", tid[:8]],  # short id
        ["resume", tid, 1],  # extra field
        ["resume", "0123456789abcdef"],  # id as text
    ):
        with pytest.raises(MalformedMessage):
            from_wire(msgpack.packb(bad, use_bin_type=True))


def test_truncated_file_is_reported_not_sent() -> None:
    with pytest.raises(wirecodec.BadInstance, match="truncated"):
        prepare_instance(_sample("MR_small.dcm")[:-1000])
    with pytest.raises(wirecodec.BadInstance):
        prepare_instance(b"not dicom at all" * 20)


def test_journalled_chunks_lost_with_the_page_cache_are_fetched_again_not_trusted(
    offer: Offer, tmp_path: Path
) -> None:
    # A power cut may keep the journal's records but lose the part's bytes (nothing
    # is fsynced on the hot path). Restore must check each record against the part.
    rng = random.Random(4)
    receiver, sender = _pair(offer, Spool(tmp_path / "spool2"))
    for r in receiver.poll(0.0)[:1]:
        for c in sender.receive(r):
            receiver.receive(c, 0.0)
    index, partial = next((i, p) for i, p in receiver._partials.items() if p.verified)
    kept = sorted(partial.verified)
    assert len(kept) >= 2, "the window must have landed two chunks of one part"
    size = offer.manifest.chunk_size
    path = tmp_path / "spool2" / f"{index}.part"
    data = bytearray(path.read_bytes())
    data[kept[0] * size] ^= 0xFF  # first chunk damaged on disk
    path.write_bytes(bytes(data[: kept[-1] * size]))  # last chunk never reached the disk
    del receiver

    revived = Receiver.resume(Spool(tmp_path / "spool2"), window=8, timeout=1.0)
    assert set(revived._partials[index].verified) == set(kept[1:-1])
    revived.accept()
    fresh = offer.sender()
    rest, _ = _drive(revived, fresh, Link(rng, 0, 0, 0, 0), Link(rng, 0, 0, 0, 0), now=1.0)
    assert rest.stored == dict(enumerate(offer.originals))
    assert revived.state is State.COMPLETE  # no instance failed its hash


def test_sender_finished_before_any_request_completes(offer: Offer) -> None:
    # A receiver that had every instance already (e.g. restarted after the last
    # chunk) finishes without asking for anything.
    sender = offer.sender()
    sender.receive(Finished(offer.manifest.transfer_id))
    assert sender.machine.state is State.COMPLETE


def test_interleaved_offers_of_several_transfers_each_assemble_and_the_oldest_gives_way() -> None:
    def parts(tag: int, total: int) -> list[OfferPart]:
        return [OfferPart(bytes([tag]) * 16, i, total, bytes([tag, i])) for i in range(total)]

    assembler = OfferAssembler()
    a, b = parts(1, 3), parts(2, 2)
    got = [assembler.add(p) for p in (a[0], b[0], a[1], b[1], a[2])]
    assert got == [None, None, None, bytes([2, 0, 2, 1]), bytes([1, 0, 1, 1, 1, 2])]
    # A bounded number of unfinished offers is kept: one more pushes out the oldest.
    unfinished = [parts(10 + n, 2)[0] for n in range(MAX_OFFERS_ASSEMBLED + 1)]
    for part in unfinished:
        assert assembler.add(part) is None
    assert assembler.add(parts(11, 2)[1]) == bytes([11, 0, 11, 1])
    assert assembler.add(parts(10, 2)[1]) is None  # the oldest was dropped
