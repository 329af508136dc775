"""Streamed offers: the sender signs the manifest before encoding, then declares each
wire encoding in signed "study-wire" envelopes as it is made.

A declaration is held to the receiver's budgets before any chunk of its instance is
requested; a declaration another key signed, for another transfer, or contradicting an
earlier one stops the transfer and drops the peer; the first slice is delivered while
the rest is still being encoded; a restarted receiver keeps a partial part only when
the sender encodes it the same way again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest

from bench.bench_codec import ct_series
from crypto.identity import Identity
from node.dicom import wirecodec
from peer_transport.errors import RemoteProtocolError
from peer_transport.transfer import prepared as prepared_module
from peer_transport.transfer import sender as sender_module
from peer_transport.transfer.errors import DecompressionBomb, MalformedMessage, ManifestMismatch
from peer_transport.transfer.instance import describe_entry, prepare_instance
from peer_transport.transfer.instance import encode_instance as real_encode
from peer_transport.transfer.machine import State
from peer_transport.transfer.manifest import (
    Manifest,
    ManifestEntry,
    WireDeclaration,
    build_manifest,
    chunk_count,
    open_wires,
    sign_wires,
    wire_digest,
)
from peer_transport.transfer.messages import Declare, Hurry, Request, from_wire
from peer_transport.transfer.prepared import PreparedStudy
from peer_transport.transfer.receiver import WIRES_FILE, Receiver
from peer_transport.transfer.sender import Sender
from peer_transport.transfer.spool import SenderSpool, Spool
from tests.peer_transport.transfer_links import (
    MemoryLink,
    MemoryStore,
    attached,
    joined,
    memory_pair,
    pumps_stopped,
    serving,
    wire_sender,
)

pytestmark = pytest.mark.timeout(90)

PEER = Identity.generate()
SMALL_CHUNK = 1024  # several chunks per instance: a restart lands inside one
_STUDY_OF: dict[bytes, str] = {}  # study UID of each manifest _study signed, by transfer id


def _study(n: int, seed: int, size: int = 64) -> tuple[bytes, list[bytes]]:
    """(signed manifest, wire encodings in manifest order) of ``n`` generated CT slices."""
    prepared = [prepare_instance(f) for f in ct_series(n, seed=seed, size=size)]
    manifest = build_manifest([p[0] for p in prepared], prepared[0][1], chunk_size=SMALL_CHUNK)
    _STUDY_OF[manifest.transfer_id] = manifest.study_instance_uid
    wire_of = {p[0].sop_instance_uid: p[2] for p in prepared}
    return manifest.sign(PEER), [wire_of[e.sop_instance_uid] for e in manifest.entries]


def _sender(
    signed: bytes, wires: list[bytes], identity: Identity = PEER, skip: int | None = None
) -> Sender:
    """A sender that has encoded and declares every instance (but ``skip``)."""
    manifest = Manifest.open(signed)[1]
    sender = wire_sender(manifest, signed, wires, identity)
    for index, wire in enumerate(wires):
        if index != skip:
            sender.declare(_declaration(index, wire))
    return sender


def _entry_of(wire: bytes) -> ManifestEntry:
    """The entry of an honest wire encoding (decoded and described again)."""
    data = wirecodec.decode(wirecodec.WireInstance.from_wire(wire, len(wire)))
    return describe_entry(data)[0]


def _declaration(index: int, wire: bytes) -> WireDeclaration:
    return WireDeclaration(index, len(wire), wire_digest(wire), _entry_of(wire))


def _signed_wires(
    tid: bytes, declarations: list[WireDeclaration], identity: Identity = PEER, study: str = ""
) -> Declare:
    """A "wire" message for transfer ``tid`` of the study in ``_study``'s manifests."""
    return Declare(tid, sign_wires(identity, tid, study or _STUDY_OF[tid], declarations))


def _declare(receiver: Receiver, sender: Sender, now: float) -> None:
    """The sender's declarations due at ``now``, taken by the receiver."""
    for declaration in sender.declarations(now, flush=True):
        receiver.declare(declaration, now)


def _exchange(receiver: Receiver, sender: Sender, now: float, stored: dict[int, bytes]) -> None:
    """The receiver's requests at ``now`` answered; each instance they complete stored."""
    for message in receiver.poll(now):
        for chunk in sender.receive(message):
            index = receiver.receive(chunk, now)
            if index is not None:
                stored[index] = receiver.assemble(index)
                receiver.stored(index, now)


def _run(
    receiver: Receiver,
    sender: Sender,
    now: float = 0.0,
    steps: int = 400,
    on_step: Callable[[], None] = lambda: None,
) -> dict[int, bytes]:
    """Drive the pair until the receiver stops being active; the instances stored."""
    stored: dict[int, bytes] = {}
    for _ in range(steps):
        _declare(receiver, sender, now)
        if receiver.state not in (State.RUNNING, State.PAUSED):
            return stored
        _exchange(receiver, sender, now, stored)
        on_step()
        now += 0.1
    raise AssertionError("the transfer did not end within the step budget")


# -- budgets per declaration ----------------------------------------------------------------


def test_a_declaration_over_budget_refuses_its_instance_before_any_chunk_and_the_rest_still_comes(
    tmp_path: Path,
) -> None:
    signed, wires = _study(3, seed=21)
    spool_dir = tmp_path / "spool"
    receiver = Receiver(signed, Spool(spool_dir), window=8, timeout=1.0)
    receiver.accept()
    tid = receiver.manifest.transfer_id
    # Instance 1 declared as 2 GiB on the wire for a file of a few KB: padding the
    # receiver would spool and read back whole. Signed by the manifest's own signer.
    padded = WireDeclaration(1, 2 << 30, bytes(32), _entry_of(wires[1]))
    declared = [_declaration(0, wires[0]), padded, _declaration(2, wires[2])]
    [refused] = receiver.declare(_signed_wires(tid, declared), 0.0)
    assert isinstance(refused, DecompressionBomb)
    assert padded.entry.sop_instance_uid in str(refused)

    honest = _sender(signed, wires, skip=1)
    asked: set[int] = set()
    real_poll = receiver.poll

    def poll(now: float) -> list[Request | Hurry]:
        requests = real_poll(now)
        asked.update(r.index for r in requests if isinstance(r, Request))
        return requests

    receiver.poll = poll  # type: ignore[method-assign]

    def nothing_of_instance_1() -> None:
        assert not (spool_dir / "1.part").exists()

    stored = _run(receiver, honest, on_step=nothing_of_instance_1)
    # The canary: instance 2, declared after the refused one, arrived byte-exact.
    assert sorted(stored) == [0, 2]
    assert 1 not in asked
    assert receiver.state is State.FAILED
    assert receiver.failure is refused  # the transfer ends on the refusal, once the rest is in


# -- forged, foreign and contradicting declarations -------------------------------------------


@pytest.mark.parametrize("forgery", ["another key", "another transfer", "contradicting"])
def test_a_forged_foreign_or_contradicting_declaration_fails_the_transfer(
    tmp_path: Path, forgery: str
) -> None:
    signed, wires = _study(2, seed=22)
    receiver = Receiver(signed, Spool(tmp_path / "spool"), window=8, timeout=1.0)
    receiver.accept()
    tid = receiver.manifest.transfer_id
    honest = [_declaration(0, wires[0])]
    if forgery == "another key":
        message = _signed_wires(tid, honest, identity=Identity.generate())
    elif forgery == "another transfer":
        study = receiver.manifest.study_instance_uid
        message = Declare(tid, sign_wires(PEER, bytes(16), study, honest))
    else:
        receiver.declare(_signed_wires(tid, honest), 0.0)
        other = dataclasses.replace(honest[0], digest=bytes(32))
        message = _signed_wires(tid, [other])
    with pytest.raises(ManifestMismatch):
        receiver.declare(message, 0.0)
    assert receiver.state is State.FAILED
    assert isinstance(receiver.failure, ManifestMismatch)
    assert receiver.poll(1.0) == []


# -- streamed entries: each one signed with its declaration, held to the manifest's word ------


def _refused_entry(tmp_path: Path, forgery: str) -> tuple[Receiver, Exception]:
    """A receiver that took instance 0 honestly, then the ``forgery`` about instance 1."""
    signed, wires = _study(2, seed=40)
    if forgery == "over the total":  # the manifest signs 1 byte less than the entries
        manifest = Manifest.open(signed)[1]
        entries = [_entry_of(w) for w in wires]
        tight = dataclasses.replace(manifest, total_size=sum(e.size for e in entries) - 1)
        _STUDY_OF[tight.transfer_id] = tight.study_instance_uid
        signed = tight.sign(PEER)
    receiver = Receiver(signed, Spool(tmp_path / "spool"), window=8, timeout=1.0)
    receiver.accept()
    tid = receiver.manifest.transfer_id
    first, second = _declaration(0, wires[0]), _declaration(1, wires[1])
    assert receiver.declare(_signed_wires(tid, [first]), 0.0) == []
    if forgery == "repeated UID":  # instance 1 claims instance 0's UID
        entry = dataclasses.replace(second.entry, sop_instance_uid=first.entry.sop_instance_uid)
        second = dataclasses.replace(second, entry=entry)
    elif forgery == "another entry for index 0":  # same encoding, another file's hash
        second = dataclasses.replace(
            first, entry=dataclasses.replace(first.entry, sha256=bytes(32))
        )
    elif forgery == "past the count":
        second = dataclasses.replace(second, index=2)
    elif forgery == "encoded under another entry than announced":
        listed = WireDeclaration.announce(1, second.entry)
        assert receiver.declare(_signed_wires(tid, [listed]), 0.0) == []
        assert receiver.view().entries[1] == second.entry  # listed before it is encoded
        entry = dataclasses.replace(second.entry, instance_number=99)
        second = dataclasses.replace(second, entry=entry)
    if forgery == "another study":
        message = _signed_wires(tid, [second], study="1.2.3.4")
    else:
        message = _signed_wires(tid, [second])
    with pytest.raises((ManifestMismatch, MalformedMessage, DecompressionBomb)) as caught:
        receiver.declare(message, 0.0)
    return receiver, caught.value


@pytest.mark.parametrize(
    ("forgery", "error", "reason"),
    [
        ("another study", ManifestMismatch, "another study"),
        ("repeated UID", ManifestMismatch, "twice, as instances 0 and 1"),
        ("another entry for index 0", ManifestMismatch, "twice, differently"),
        ("encoded under another entry than announced", ManifestMismatch, "twice, differently"),
        ("past the count", MalformedMessage, "the manifest has 2"),
        ("over the total", DecompressionBomb, "bytes its manifest signed for"),
    ],
)
def test_an_entry_the_manifest_did_not_sign_for_fails_the_transfer(
    tmp_path: Path, forgery: str, error: type[Exception], reason: str
) -> None:
    receiver, refused = _refused_entry(tmp_path, forgery)
    assert isinstance(refused, error)
    assert reason in str(refused)
    assert receiver.state is State.FAILED
    assert receiver.failure is refused
    assert receiver.poll(1.0) == []  # instance 0, declared honestly before, is not fetched
    # Only the honest batches were kept for a resume; the refused one never reached the spool.
    honest = 2 if forgery.startswith("encoded under") else 1
    assert len(list(Spool(tmp_path / "spool").load_sealed(WIRES_FILE))) == honest


async def test_an_entry_repeating_a_uid_costs_the_sender_its_connection(tmp_path: Path) -> None:
    study = await PreparedStudy.from_files(ct_series(3, seed=41, size=64), PEER)

    class Repeating(MemoryLink):
        """Declares instance 1 under instance 0's UID (instead of the honest batch)."""

        async def send_control(self, data: bytes) -> None:
            message = from_wire(data)
            if isinstance(message, Declare):
                batch = open_wires(message.data)
                first, second = batch.declarations[0], batch.declarations[1]
                entry = dataclasses.replace(
                    second.entry, sop_instance_uid=first.entry.sop_instance_uid
                )
                forged = [first, dataclasses.replace(second, entry=entry)]
                tid = message.transfer_id
                data = Declare(tid, sign_wires(PEER, tid, batch.study_uid, forged)).to_wire()
            await super().send_control(data)

    a, b = joined(Repeating(), _DroppingLink())
    sender, receiver = attached(study, a, b, tmp_path / "spool", MemoryStore())
    async with serving(sender, a, b):
        with pytest.raises(ManifestMismatch, match="twice, as instances"):
            await asyncio.wait_for(receiver.run(), 30)
        assert [type(e) for e in b.dropped] == [ManifestMismatch]


def test_progress_counts_the_signed_count_and_bound_until_the_entries_arrive(
    tmp_path: Path,
) -> None:
    signed, wires = _study(3, seed=42)
    manifest = Manifest.open(signed)[1]
    loose = dataclasses.replace(manifest, total_size=manifest.total_size + 5000)
    _STUDY_OF[loose.transfer_id] = loose.study_instance_uid
    receiver = Receiver(loose.sign(PEER), Spool(tmp_path / "spool"))
    receiver.accept()
    before = receiver.progress()
    assert (before.instances_total, before.bytes_total) == (3, manifest.total_size + 5000)
    tid = loose.transfer_id
    receiver.declare(_signed_wires(tid, [_declaration(i, w) for i, w in enumerate(wires)]), 0.0)
    after = receiver.progress()
    assert (after.instances_total, after.bytes_total) == (3, manifest.total_size)  # exact now
    assert [e.sop_instance_uid for e in receiver.view().entries] == [
        _entry_of(w).sop_instance_uid for w in wires
    ]


def test_a_declaration_out_of_the_manifest_or_malformed_fails_the_transfer(
    tmp_path: Path,
) -> None:
    signed, wires = _study(2, seed=23)
    receiver = Receiver(signed, Spool(tmp_path / "spool"), window=8, timeout=1.0)
    receiver.accept()
    tid = receiver.manifest.transfer_id
    with pytest.raises(MalformedMessage, match="the manifest has 2"):
        receiver.declare(_signed_wires(tid, [_declaration(2, wires[0])]), 0.0)
    assert receiver.state is State.FAILED
    with pytest.raises(MalformedMessage):
        Declare.from_wire(Declare(tid, b"x" * (17 * 1024)).to_wire())


class _DroppingLink(MemoryLink):
    def __init__(self) -> None:
        super().__init__()
        self.dropped: list[RemoteProtocolError] = []

    def drop(self, error: RemoteProtocolError) -> None:
        self.dropped.append(error)


class _Contradicting(MemoryLink):
    """The sender's side of the link, where the peer sends every honest declaration and
    then one more that says instance 0 is encoded otherwise."""

    async def send_control(self, data: bytes) -> None:
        await super().send_control(data)
        message = from_wire(data)
        if isinstance(message, Declare):
            batch = open_wires(message.data)
            other = dataclasses.replace(batch.declarations[0], index=0, digest=bytes(32))
            tid = message.transfer_id
            forged = Declare(tid, sign_wires(PEER, tid, batch.study_uid, [other]))
            await super().send_control(forged.to_wire())


async def test_a_contradicting_declaration_costs_the_sender_its_connection(tmp_path: Path) -> None:
    study = await PreparedStudy.from_files(ct_series(3, seed=24, size=64), PEER)
    a, b = joined(_Contradicting(), _DroppingLink())
    store = MemoryStore()
    sender, receiver = attached(study, a, b, tmp_path / "spool", store)
    async with serving(sender, a, b):
        with pytest.raises(ManifestMismatch, match="twice, differently"):
            await asyncio.wait_for(receiver.run(), 30)
        assert len(b.dropped) == 1
        assert isinstance(b.dropped[0], ManifestMismatch)
    assert not store.by_hash  # nothing was fetched on the word of a declaration it took back


def test_a_sender_refuses_a_request_for_an_instance_it_has_not_declared() -> None:
    signed, wires = _study(3, seed=25)
    manifest = Manifest.open(signed)[1]
    sender = wire_sender(manifest, signed, wires, PEER)
    sender.declare(_declaration(0, wires[0]))
    assert sender.receive(Request(manifest.transfer_id, 0, (0,)))  # declared: served
    with pytest.raises(MalformedMessage, match="not declared"):
        sender.receive(Request(manifest.transfer_id, 2, (0,)))


# -- the first slice leaves before the study is encoded --------------------------------------


async def test_the_first_slice_is_delivered_before_the_last_one_is_encoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = ct_series(6, seed=26, size=64)
    uids = [str(pydicom.dcmread(io.BytesIO(f)).SOPInstanceUID) for f in files]
    events: list[tuple[str, str]] = []
    first_stored = threading.Event()

    def slow_codec(data: bytes, entry: Any, study_uid: str, cache: Any = None) -> Any:
        # The codec of the last slice waits (bounded) until the first one is stored: a
        # sender that encodes everything before it offers never gets there in order.
        if entry.sop_instance_uid == uids[-1]:
            first_stored.wait(30)
        out = real_encode(data, entry, study_uid, cache)
        events.append(("encoded", entry.sop_instance_uid))
        return out

    monkeypatch.setattr(prepared_module, "encode_instance", slow_codec)

    class Store(MemoryStore):
        def add_bytes(self, data: bytes, *, source: str, warm: bool = True) -> str:
            digest = super().add_bytes(data, source=source, warm=warm)
            sop = str(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID)
            events.append(("stored", sop))
            if sop == uids[0]:
                first_stored.set()
            return digest

    spool = SenderSpool(tmp_path / "out")
    study = await PreparedStudy.from_source(
        iter(files), PEER, spool, count=len(files), total=1 << 30, source=b"", ahead=2
    )
    assert study.declared == {}  # signed and offered before anything is encoded
    a, b = memory_pair()
    store = Store()
    sender, receiver = attached(study, a, b, tmp_path / "in", store)
    with pumps_stopped(a, b):
        try:
            await asyncio.wait_for(asyncio.gather(receiver.run(), sender.run()), 60)
        finally:
            spool.close()
    assert len(store.by_hash) == len(files)
    assert events.index(("stored", uids[0])) < events.index(("encoded", uids[-1]))


async def test_the_encoder_takes_a_hurried_instance_next() -> None:
    signed, wires = _study(5, seed=27)
    manifest = Manifest.open(signed)[1]
    order: list[int] = []

    def encoder(index: int) -> tuple[bytes, WireDeclaration]:
        order.append(index)
        return wires[index], _declaration(0, wires[index])

    spool = SenderSpool()
    try:
        study = PreparedStudy(manifest, PEER, encoder=encoder, spool=spool, ahead=1)

        def declared(index: int) -> None:
            if index == 0:
                study.hurry(4)  # the viewer on the receiver waits for the last slice

        await study.encode(declared)
        assert order == [0, 4, 1, 2, 3]
        assert all(study.wire(i) == wires[i] for i in range(5))
    finally:
        spool.close()


def test_the_receiver_hurries_the_instance_on_screen_and_a_stalled_one(tmp_path: Path) -> None:
    signed, wires = _study(4, seed=28)
    receiver = Receiver(signed, Spool(tmp_path / "spool"), window=8, timeout=1.0)
    receiver.accept()
    sender = wire_sender(receiver.manifest, signed, wires, PEER)
    receiver.prioritise(3)
    assert Hurry(receiver.manifest.transfer_id, 3) in receiver.poll(0.0)
    assert not any(isinstance(m, Hurry) for m in receiver.poll(0.1))  # once per instance
    for message in receiver.poll(0.2):
        sender.receive(message)
    # Nothing declared for a timeout: the first undeclared instance is hurried (the
    # sender encodes it next, or declares it again when its declaration was lost).
    stalled = receiver.poll(5.0)
    assert Hurry(receiver.manifest.transfer_id, 0) in stalled
    sender.receive(Hurry(receiver.manifest.transfer_id, 3))
    assert sender.hurried == 3
    sender.declare(_declaration(0, wires[0]))
    assert sender.declarations(6.0)  # the first batch goes at once
    sender.receive(Hurry(receiver.manifest.transfer_id, 0))  # declared, yet asked: again
    [again] = sender.declarations(6.05, flush=True)
    receiver.declare(again, 6.05)
    assert any(isinstance(m, Request) and m.index == 0 for m in receiver.poll(6.1))


def test_a_flood_of_hurries_is_not_amplified_into_signed_batches(tmp_path: Path) -> None:
    """A hostile receiver hurries declared instances over and over: each re-declaration
    is a signed batch of up to 32, so the sender declares an instance again at most
    REDECLARE_LIMIT times, ignores hurries out of range, and still serves the study."""
    signed, wires = _study(4, seed=31)
    receiver = Receiver(signed, Spool(tmp_path / "spool"), window=8, timeout=1.0)
    receiver.accept()
    sender = _sender(signed, wires)
    tid = receiver.manifest.transfer_id
    _declare(receiver, sender, 0.0)
    resent = 0
    for round_ in range(200):
        for index in (0, 2, -1, 4, 10**9):
            sender.receive(Hurry(tid, index))
        resent += sum(len(d.data) for d in sender.declarations(1.0 + round_, flush=True))
    [first_again] = _sender(signed, wires).declarations(0.0, flush=True)
    assert 0 < resent <= sender_module.REDECLARE_LIMIT * len(first_again.data)
    # The rest carries on: the receiver's requests are served, the study arrives whole.
    for _ in range(50):
        requests = [m for m in receiver.poll(300.0) if isinstance(m, Request)]
        if not requests:
            break
        for request in requests:
            for chunk in sender.receive(request):
                receiver.receive(chunk, 300.0)
    assert sorted(receiver.ready | receiver.done) == [0, 1, 2, 3]


# -- resume: a partial part is kept only for the same encoding -------------------------------


def _partly_received(tmp_path: Path, signed: bytes, wires: list[bytes]) -> tuple[int, int]:
    """A receiver that got some chunks of instance 0, then was killed: (index, chunks kept)."""
    receiver = Receiver(signed, Spool(tmp_path / "spool"), window=4, timeout=1.0)
    receiver.accept()
    sender = _sender(signed, wires)
    for declaration in sender.declarations(0.0, flush=True):
        receiver.declare(declaration, 0.0)
    for request in receiver.poll(0.0):
        for chunk in sender.receive(request):
            assert receiver.receive(chunk, 0.0) is None
    kept = len(receiver._partials[0].verified)
    assert 0 < kept < chunk_count(len(wires[0]), SMALL_CHUNK)
    del receiver  # kill -9
    return 0, kept


def test_a_restarted_receiver_keeps_a_partial_part_the_sender_encodes_the_same_again(
    tmp_path: Path,
) -> None:
    signed, wires = _study(3, seed=29, size=96)
    index, kept = _partly_received(tmp_path, signed, wires)
    revived = Receiver.resume(Spool(tmp_path / "spool"), window=4, timeout=1.0)
    assert len(revived._partials[index].verified) == kept  # its size known before any offer
    revived.accept()
    assert revived.poll(0.0) == []  # nothing is fetched until the sender declares again
    stored = _run(revived, _sender(signed, wires))
    assert revived.state is State.COMPLETE
    assert revived.parts_redeclared == 0
    originals = [wirecodec.decode(wirecodec.WireInstance.from_wire(w)) for w in wires]
    assert stored == dict(enumerate(originals))
    total = sum(chunk_count(len(w), SMALL_CHUNK) for w in wires)
    assert revived.chunks_requested == total - kept  # the kept chunks were not fetched again


def test_a_restarted_receiver_drops_a_partial_part_the_sender_now_encodes_otherwise(
    tmp_path: Path,
) -> None:
    signed, wires = _study(3, seed=30, size=96)
    index, _kept = _partly_received(tmp_path, signed, wires)
    # The restarted sender's codec sends instance 0 as it is (another size and digest).
    original = wirecodec.decode(wirecodec.WireInstance.from_wire(wires[index]))
    raw = wirecodec.WireInstance(
        wirecodec.Encoding.RAW, len(original), hashlib.sha256(original).digest(), original
    ).to_wire()
    assert len(raw) != len(wires[index])
    changed = [raw, *wires[1:]]
    revived = Receiver.resume(Spool(tmp_path / "spool"), window=4, timeout=1.0)
    revived.accept()
    sender = _sender(signed, changed)
    for declaration in sender.declarations(0.0, flush=True):
        revived.declare(declaration, 0.0)
    assert revived.parts_redeclared == 1
    assert not (tmp_path / "spool" / f"{index}.part").exists()
    stored = _run(revived, sender, now=0.1)
    assert revived.state is State.COMPLETE
    assert stored[index] == original
    total = sum(chunk_count(len(w), SMALL_CHUNK) for w in changed)
    assert revived.chunks_requested == total  # instance 0 fetched whole, in its new encoding


# -- a stored file that cannot be sent, found while streaming ------------------------------


async def test_a_file_found_bad_while_encoding_cancels_the_transfer_and_says_why(
    tmp_path: Path,
) -> None:
    from node.dicom.store import Store
    from peer_transport.transfer.errors import TransferCancelled
    from peer_transport.transfer.runner import receive_study, send_study

    files = ct_series(4, seed=31, size=64)
    with Store.open(tmp_path / "store", bytes(range(32))) as store:
        study_uid = ""
        for data in files:
            study_uid = store.add_bytes(data, source="test").study_uid
        last = store.instances(study_uid)[-1].sop_instance_uid
        real_read = store.read_instance

        def read_instance(sop_instance_uid: str) -> bytes:
            data = real_read(sop_instance_uid)
            return data[:-1000] if sop_instance_uid == last else data  # changed on disk

        store.read_instance = read_instance  # type: ignore[method-assign]
        a, b = memory_pair()
        received = MemoryStore()
        receiving = asyncio.ensure_future(receive_study(b, received, tmp_path / "in", peer="a"))
        await asyncio.sleep(0)  # the receiver listens before the offer goes out
        with pumps_stopped(a, b):
            try:
                with pytest.raises(wirecodec.BadInstance, match="truncated"):
                    await asyncio.wait_for(
                        send_study(a, store, study_uid, PEER, peer="b", spool_dir=tmp_path / "out"),
                        30,
                    )
                with pytest.raises(TransferCancelled):
                    await asyncio.wait_for(receiving, 30)
            finally:
                receiving.cancel()
    assert last not in {
        str(pydicom.dcmread(io.BytesIO(d)).SOPInstanceUID) for d in received.by_hash.values()
    }


# -- a de-identified share streams too: its entries come as its files are rewritten ----------


def _stored_study(tmp_path: Path, n: int, seed: int) -> tuple[Any, str]:
    from node.dicom.store import Store

    store = Store.open(tmp_path / "store", bytes(range(32)))
    study_uid = ""
    for data in ct_series(n, seed=seed, size=64):
        study_uid = store.add_bytes(data, source="test").study_uid
    return store, study_uid


async def test_the_first_instance_of_a_deidentified_share_arrives_before_the_last_is_deidentified(
    tmp_path: Path,
) -> None:
    from node.dicom import sharing
    from node.dicom.deid import PseudonymMap
    from peer_transport.transfer.runner import receive_study, send_study

    store, study_uid = _stored_study(tmp_path, 6, seed=43)
    events: list[str] = []
    first_stored = threading.Event()
    pseudonyms = PseudonymMap()
    pseudonyms.burned_in_checked = True  # generated CT: nothing burned in
    real = sharing.deidentifier(pseudonyms, tmp_path / "map", bytes(32))

    def slow_deidentifier(files: Any) -> Any:
        # The last file waits (bounded) until the first instance is stored: a sender that
        # de-identifies the whole study before it offers never gets there in order.
        def counted() -> Any:
            for i, data in enumerate(files):
                if i == 5:
                    first_stored.wait(30)
                events.append(f"reading {i}")
                yield data

        for i, out in enumerate(real(counted())):
            events.append(f"deidentified {i}")
            yield out

    class Store(MemoryStore):
        def add_bytes(self, data: bytes, *, source: str, warm: bool = True) -> str:
            events.append("stored")
            first_stored.set()
            return super().add_bytes(data, source=source, warm=warm)

    a, b = memory_pair()
    received = Store()
    receiving = asyncio.ensure_future(receive_study(b, received, tmp_path / "in", peer="a"))
    await asyncio.sleep(0)  # the receiver listens before the offer goes out
    try:
        await asyncio.wait_for(
            send_study(
                a,
                store,
                study_uid,
                PEER,
                peer="b",
                prepare=slow_deidentifier,
                spool_dir=tmp_path / "out",
            ),
            60,
        )
        await asyncio.wait_for(receiving, 30)
    finally:
        receiving.cancel()
        store.close()
        for link in (a, b):
            if link.pump is not None:
                link.pump.cancel()
    assert len(received.by_hash) == 6
    assert events.index("stored") < events.index("deidentified 5")
    originals = {hashlib.sha256(d).hexdigest() for d in ct_series(6, seed=43, size=64)}
    assert not originals & received.by_hash.keys()  # what arrived is the de-identified copy
    for data in received.by_hash.values():
        assert pydicom.dcmread(io.BytesIO(data)).PatientIdentityRemoved == "YES"


async def test_a_restarted_deidentifying_sender_offers_the_same_transfer_and_entries(
    tmp_path: Path,
) -> None:
    from node.dicom import sharing
    from node.dicom.deid import PseudonymMap

    store, study_uid = _stored_study(tmp_path, 4, seed=44)
    pseudonyms = PseudonymMap()  # one consult's map: kept, so each run loads the same
    pseudonyms.burned_in_checked = True

    async def run() -> tuple[bytes, list[WireDeclaration]]:
        prepare = sharing.deidentifier(pseudonyms, tmp_path / "map", bytes(32))
        spool = SenderSpool(tmp_path / "out")
        try:
            study = await PreparedStudy.from_rewritten(store, study_uid, prepare, PEER, spool)
            await study.encode()
            manifest = study.manifest
            return manifest.transfer_id, [study.declared[i] for i in range(manifest.count)]
        finally:
            spool.close()

    first, again = await run(), await run()
    store.close()
    assert first[0] == again[0]  # the receiver resumes the transfer it has
    assert [d.entry for d in first[1]] == [d.entry for d in again[1]]  # UIDs, dates, hashes
    assert first[1] == again[1]


def test_a_restarted_receiver_fetches_again_an_instance_the_sender_now_describes_otherwise(
    tmp_path: Path,
) -> None:
    # A sender whose de-identification is not the same after a restart (a date shifted
    # otherwise) declares another entry for an instance the receiver stored before: it
    # is fetched again as declared now, never taken as it was.
    signed, wires = _study(2, seed=45)
    loose = dataclasses.replace(Manifest.open(signed)[1], total_size=1 << 20)  # a bound
    _STUDY_OF[loose.transfer_id] = loose.study_instance_uid
    signed = loose.sign(PEER)
    receiver = Receiver(signed, Spool(tmp_path / "spool"), window=64, timeout=1.0)
    receiver.accept()
    sender = _sender(signed, wires, skip=1)
    stored = _run_until(receiver, sender, lambda: 0 in receiver.done)
    assert 0 in stored  # then the receiver is killed (-9): nothing more is called on it

    ds = pydicom.dcmread(io.BytesIO(wirecodec.decode(wirecodec.WireInstance.from_wire(wires[0]))))
    ds.StudyDate = "19990101"
    out = io.BytesIO()
    ds.save_as(out)
    changed = prepare_instance(out.getvalue())[2]
    revived = Receiver.resume(Spool(tmp_path / "spool"), window=64, timeout=1.0)
    revived.accept()
    assert 0 in revived.done
    again = _run(revived, _sender(signed, [changed, wires[1]]))
    assert revived.state is State.COMPLETE
    assert sorted(again) == [0, 1]  # instance 0 came again, in its new form
    assert hashlib.sha256(again[0]).digest() == _entry_of(changed).sha256


def _run_until(
    receiver: Receiver, sender: Sender, done: Callable[[], bool], steps: int = 200
) -> dict[int, bytes]:
    stored: dict[int, bytes] = {}
    now = 0.0
    for _ in range(steps):
        _declare(receiver, sender, now)
        _exchange(receiver, sender, now, stored)
        if done():
            return stored
        now += 0.1
    raise AssertionError("the condition never held within the step budget")


@pytest.mark.parametrize(
    ("count", "total", "reason"),
    [
        (3, 1 << 30, "gave 2 files where 3 were offered"),
        (1, 1 << 30, "more than the 1 files offered"),
        (2, 100, "over the 100 bytes offered"),
    ],
)
async def test_a_sender_whose_files_break_what_it_signed_for_fails_the_share(
    count: int, total: int, reason: str
) -> None:
    files = ct_series(2, seed=46, size=64)
    spool = SenderSpool()
    try:

        async def share() -> None:
            study = await PreparedStudy.from_source(
                iter(files), PEER, spool, count=count, total=total, source=b""
            )
            await study.encode()

        with pytest.raises(wirecodec.BadInstance, match=reason):
            await share()
    finally:
        spool.close()


def test_a_study_the_store_already_holds_completes_at_its_declarations(tmp_path: Path) -> None:
    # The entries come after the offer: instances the store holds are known only then,
    # and when they are the last ones the transfer ends there (nothing is requested).
    signed, wires = _study(3, seed=47)
    held = {_entry_of(w).sha256 for w in wires[1:]}
    receiver = Receiver(signed, Spool(tmp_path / "spool"), have=held.__contains__, window=8)
    receiver.accept()
    stored = _run(receiver, _sender(signed, wires))
    assert sorted(stored) == [0]  # only the one the store lacked was fetched
    assert receiver.state is State.COMPLETE
    assert receiver.chunks_requested == chunk_count(len(wires[0]), SMALL_CHUNK)
    everything = {_entry_of(w).sha256 for w in wires}
    again = Receiver(signed, Spool(tmp_path / "again"), have=everything.__contains__)
    again.accept()
    tid = again.manifest.transfer_id
    again.declare(_signed_wires(tid, [_declaration(i, w) for i, w in enumerate(wires)]), 0.0)
    assert again.state is State.COMPLETE
    assert again.chunks_requested == 0
