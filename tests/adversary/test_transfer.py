"""Attacks on the study transfer boundary, from a peer this node trusts.

A trusted peer is still a peer: the ids, UIDs and sizes it sends are data, checked when
parsed; nothing it names becomes a path; what it declares is held to the receiver's
budgets before anything is allocated; what it delivers must be what its manifest said;
and what it sent rests sealed in the spool.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import os
import shutil
import tempfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import zstandard
from pydicom.data import get_testdata_file

from bench.bench_codec import ct_instance, ct_series
from consult.errors import ConsultError
from consult.errors import MalformedMessage as ConsultMalformed
from consult.intake import take_in
from consult.requests import ConsultRequest, Event
from crypto.identity import Identity
from node.cli.store import _export
from node.dicom import wirecodec
from node.dicom.importer import import_paths
from node.dicom.store import InstanceConflict, Store
from peer_transport.mux import ChannelLink
from peer_transport.transfer.errors import (
    DecompressionBomb,
    MalformedMessage,
    ManifestMismatch,
    RemoteTransferError,
)
from peer_transport.transfer.instance import decode_part, prepare_instance
from peer_transport.transfer.machine import State
from peer_transport.transfer.manifest import (
    Manifest,
    ManifestEntry,
    WireDeclaration,
    build_manifest,
    sign_wires,
    wire_digest,
    within_budget,
)
from peer_transport.transfer.messages import CHUNK_SIZE, Declare
from peer_transport.transfer.prepared import PreparedStudy
from peer_transport.transfer.receiver import Receiver
from peer_transport.transfer.runner import StudyReceiver, StudySender, receive_study
from peer_transport.transfer.sender import Sender
from peer_transport.transfer.spool import SPOOL_KEY_PURPOSE, Spool
from tests.node.test_runtime import make_home, request_from, started
from tests.peer_transport.helpers import mesh
from tests.peer_transport.transfer_links import (
    MemoryStore,
    attached,
    memory_pair,
    serving,
    wire_sender,
)

pytestmark = pytest.mark.timeout(90)

KEY = bytes(range(32))
MiB = 1 << 20


def _file(data: bytes, **changes: object) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    for name, value in changes.items():
        setattr(ds, name, value)
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


PEER = Identity.generate()  # the trusted peer that signs what these tests send


_ENTRIES: dict[bytes, tuple[ManifestEntry, ...]] = {}  # what _sender declares, by transfer id


def _signed(entries: list[ManifestEntry], study: str, identity: Identity = PEER) -> bytes:
    manifest = build_manifest(entries, study, chunk_size=CHUNK_SIZE)
    _ENTRIES[manifest.transfer_id] = manifest.entries
    return manifest.sign(identity)


def _sender(signed: bytes, wires: list[bytes], identity: Identity = PEER) -> Sender:
    """A sender of ``signed`` that has encoded (and declares) every instance as ``wires``."""
    opened = Manifest.open(signed)[1]
    sender = wire_sender(opened, signed, wires, identity)
    entries = _ENTRIES[opened.transfer_id]
    for index, wire in enumerate(wires):
        sender.declare(WireDeclaration(index, len(wire), wire_digest(wire), entries[index]))
    return sender


def _drive(receiver: Receiver, sender: Sender, steps: int = 200) -> list[bytes]:
    """Run the sans-IO pair to the end; the assembled instances, in order. Raises what
    failed the transfer."""
    out = []
    receiver.accept()
    for step in range(steps):
        for declaration in sender.declarations(float(step), flush=True):
            receiver.declare(declaration, float(step))
        if receiver.failure is not None:
            raise receiver.failure
        for request in receiver.poll(float(step)):
            for chunk in sender.receive(request):
                index = receiver.receive(chunk, float(step))
                if index is not None:
                    out.append(receiver.assemble(index))
                    if receiver.stored(index, float(step)) is not None:
                        return out
    raise AssertionError("the transfer did not finish")


# -- Issue 13 item 2: a peer's id is never a path ----------------------------------------------


def _forged_request(hospital: Identity, consult_id: str, now: int) -> ConsultRequest:
    return dataclasses.replace(request_from(hospital, now), id=consult_id)


@pytest.mark.parametrize("kind", ["relative", "absolute"])
async def test_a_consult_id_that_is_a_path_is_refused_at_parse_and_never_deletes_a_directory(
    tmp_path: Path, kind: str
) -> None:
    home, identity = make_home(tmp_path, "neuro", "", ["neuro"])
    # ``data/transfers/<id>`` with this id is the victim directory, outside the home (an
    # absolute one short enough for the 64 characters an id could have).
    short = Path(tempfile.mkdtemp(prefix="rm-victim-", dir="/tmp"))
    victim = tmp_path / "victim" if kind == "relative" else short / "victim"
    hostile = "../../../victim" if kind == "relative" else str(victim)
    assert len(hostile) <= 64
    assert (home.data_dir / "transfers" / hostile).resolve() == victim.resolve()
    victim.mkdir(parents=True)
    (victim / "precious").write_text("keep me")
    hospital = Identity.generate()
    rt = await started(home, identity)
    try:
        rt.trust.mark_verified(hospital.node_id, rt.now())
        request = _forged_request(hospital, hostile, rt.now())
        wire = request.to_wire(hospital)
        with pytest.raises(ConsultMalformed, match="malformed consult id"):
            ConsultRequest.from_wire(wire)
        with pytest.raises(ConsultMalformed):
            take_in(rt.consults, wire, rt.now(), sender=hospital.node_id)
        assert not rt.consults.cases()

        # A case recorded under such an id by an older version is never loaded, so never
        # fetched, resumed or cleaned up; were it named, its spool is inside the home.
        rt.consults.add(request, role="consultant", now=rt.now(), wire=wire, peer="x")
        assert rt.consults.cases() == []
        assert rt.consulting.studies.unfinished() == []
        with pytest.raises(ConsultError):
            await rt.consulting.studies.fetch(hostile)
        assert rt.consulting.studies.spool_of(hostile).parent == rt.home.data_dir / "transfers"
        assert (victim / "precious").read_text() == "keep me"
    finally:
        await rt.stop()
        shutil.rmtree(short, ignore_errors=True)


def test_every_consult_message_refuses_an_id_that_is_not_one() -> None:
    from consult.errors import BadReport
    from consult.report import PeerReview, Report, Score, verify_report, verify_review
    from consult.requests import ConsultResponse

    node = Identity.generate()
    for hostile in ("../../../victim", "/etc", "a" * 32 + "/..", "ABCDEF" * 6, ""):
        response = ConsultResponse(hostile, node.node_id, Event.ACCEPT, 1, "")
        with pytest.raises(ConsultMalformed, match="consult id"):
            ConsultResponse.from_wire(response.to_wire(node))
        report = Report(hostile, "1.2.3", node.node_id, "Dr", "text", "impression", (), (), 1)
        with pytest.raises(BadReport, match="consult id"):
            verify_report(report.sign(node), consult_id=hostile)
        good = dataclasses.replace(report, consult_id="0" * 32).sign(node)
        review = PeerReview(hostile, PeerReview.digest(good), node.node_id, Score.AGREE, "", 1)
        with pytest.raises(BadReport, match="consult id"):
            verify_review(review.sign(node), report_wire=good)
    for uid in ("../x", "1.2.3/../../x", "1." * 40):
        report = Report("0" * 32, uid, node.node_id, "Dr", "text", "impression", (), (), 1)
        with pytest.raises(BadReport, match="not a DICOM UID"):
            verify_report(report.sign(node), consult_id="0" * 32)


def _hostile_entry(entry: ManifestEntry, **changes: str) -> ManifestEntry:
    return dataclasses.replace(entry, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "changes",
    [
        {"sop_instance_uid": "../../../victim"},
        {"sop_instance_uid": "/etc/passwd"},
        {"series_instance_uid": "1.2.3/../../x"},
        {"transfer_syntax": "../x"},
        {"study": "../../victim"},
    ],
)
def test_a_manifest_or_entry_with_hostile_uids_is_refused_when_opened(
    tmp_path: Path, changes: dict[str, str]
) -> None:
    sender = Identity.generate()
    files = ct_series(2, seed=3, size=64)
    entries = [prepare_instance(f)[0] for f in files]
    study = str(pydicom.dcmread(io.BytesIO(files[0])).StudyInstanceUID)
    hostile_study = "study" in changes
    study = changes.pop("study", study)
    entries[1] = _hostile_entry(entries[1], **changes)
    signed = _signed(entries, study, sender)
    if hostile_study:
        with pytest.raises(MalformedMessage, match="UID"):
            Receiver(signed, Spool(tmp_path / "spool"))
        assert not list((tmp_path / "spool").iterdir())  # nothing written, not even the manifest
        return
    # An entry comes signed with its wire declaration: refused there, the transfer
    # fails, and neither the declaration nor any byte of an instance is kept.
    receiver = Receiver(signed, Spool(tmp_path / "spool"))
    receiver.accept()
    [declare] = _sender(signed, [b"w" * 100] * 2, sender).declarations(0.0, flush=True)
    with pytest.raises(MalformedMessage, match="UID"):
        receiver.declare(declare, 0.0)
    assert receiver.state is State.FAILED
    assert receiver.poll(1.0) == []
    assert sorted(p.name for p in (tmp_path / "spool").iterdir()) == [
        "journal",
        "manifest",
        "state",
    ]


def test_an_export_never_writes_outside_its_folder_whatever_the_stored_uids(
    tmp_path: Path,
) -> None:
    [good] = ct_series(1, seed=4, size=64)
    hostile = _file(good, SeriesInstanceUID="../../escaped", SOPInstanceUID="../../../x")
    out = tmp_path / "export" / "here"
    with Store.open(tmp_path / "store", KEY) as store:
        added = store.add_bytes(hostile, source="peer:somebody")
        count, _ = _export(store, added.study_uid, out)
    assert count == 1
    written = [p for p in tmp_path.rglob("*.dcm")]
    assert written
    assert all(out in p.parents for p in written), written


def test_a_fetch_request_naming_a_prefix_or_a_path_is_not_resolved() -> None:
    from consult.requests import check_consult_id

    for hostile in ("a", "", "../x", "0" * 31, "0" * 33):
        with pytest.raises(ConsultMalformed):
            check_consult_id(hostile)
    assert check_consult_id("0123456789abcdef" * 2) == "0123456789abcdef" * 2


# -- Issue 13 item 11: decompression bombs ------------------------------------------------------


def _zstd_bomb(size: int) -> bytes:
    """A zstd frame of ``size`` zero bytes that declares its size (a few KB for 512 MiB)."""
    compressor = zstandard.ZstdCompressor(level=1).compressobj(size=size)
    zeros = bytes(MiB)
    parts = [compressor.compress(zeros) for _ in range(size // MiB)]
    return b"".join([*parts, compressor.flush()])


def _jpegls_bomb(data: bytes) -> tuple[ManifestEntry, str, bytes]:
    """A real instance's honest manifest entry and a wire encoding whose JPEG-LS frame
    header claims 65535 x 65535 (about 1 KB that made CharLS allocate 4 GiB)."""
    wire = wirecodec.encode(data)
    assert wire.encoding is wirecodec.Encoding.JPEGLS
    stream = bytearray(wire.frames[0])
    sof = stream.find(b"\xff\xf7")
    stream[sof + 5 : sof + 9] = (65535).to_bytes(2, "big") * 2
    bomb = dataclasses.replace(wire, frames=(bytes(stream),)).to_wire()
    entry, study, _ = prepare_instance(data)
    return entry, study, bomb


def _receive_one(tmp_path: Path, signed: bytes, wire: bytes) -> None:
    """A receiver taking the one instance ``signed`` offers, sent as ``wire``."""
    receiver = Receiver(signed, Spool(tmp_path / "spool"))
    _drive(receiver, _sender(signed, [wire]))


def _peak_while(run: object) -> tuple[int, BaseException | None]:
    tracemalloc.start()
    try:
        try:
            run()  # type: ignore[operator]
        except Exception as exc:  # the test asserts which one
            error: BaseException | None = exc
        else:
            error = None
        return tracemalloc.get_traced_memory()[1], error
    finally:
        tracemalloc.stop()


def test_a_zstd_bomb_is_refused_from_its_declaration_before_anything_is_allocated(
    tmp_path: Path,
) -> None:
    size = 512 * MiB
    body = _zstd_bomb(size)
    wire = wirecodec.WireInstance(wirecodec.Encoding.ZSTD, size, bytes(32), body).to_wire()
    entry = ManifestEntry("1.2.3.4", "1.2.3.5", 1, 1, "1.2.840.10008.1.2.1", size, bytes(32))
    signed = _signed([entry], "1.2.3")

    peak, error = _peak_while(lambda: _receive_one(tmp_path, signed, wire))
    assert peak < 32 * MiB, f"{peak / MiB:.0f} MiB allocated for a {len(wire)}-byte instance"
    assert isinstance(error, DecompressionBomb), error
    assert "limit" in str(error)
    assert not list((tmp_path / "spool").glob("*.part"))  # not one chunk was fetched


def test_a_declaration_padding_a_small_instance_to_a_huge_wire_encoding_is_refused(
    tmp_path: Path,
) -> None:
    # 2 GiB of chunks would be spooled, then read back whole to assemble a 4 KB file.
    entry = ManifestEntry("1.2.3.4", "1.2.3.5", 1, 1, "", 4096, bytes(32))
    signed = _signed([entry], "1.2.3")
    receiver = Receiver(signed, Spool(tmp_path / "spool"))
    receiver.accept()
    tid = receiver.manifest.transfer_id
    padded = Declare(
        tid, sign_wires(PEER, tid, "1.2.3", [WireDeclaration(0, 2 << 30, bytes(32), entry)])
    )
    [refused] = receiver.declare(padded, 0.0)
    assert "limits" in str(refused)
    assert receiver.poll(0.0) == []  # never requested
    assert receiver.state is State.FAILED  # nothing else to fetch: the refusal fails it
    assert isinstance(receiver.failure, DecompressionBomb)


def test_a_zstd_frame_declaring_more_than_its_manifest_entry_is_refused_before_decoding() -> None:
    [data] = ct_series(1, seed=5, size=64)
    entry, study, _ = prepare_instance(data)
    body = _zstd_bomb(64 * MiB)
    wire = wirecodec.WireInstance(wirecodec.Encoding.ZSTD, entry.size, entry.sha256, body)
    part = wire.to_wire()
    peak, error = _peak_while(lambda: decode_part(part, entry, study, len(part)))
    assert isinstance(error, DecompressionBomb), error
    assert peak < 16 * MiB


def test_a_jpegls_stream_claiming_65535_squared_is_refused_before_charls_allocates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    [data] = ct_series(1, seed=6, size=64)
    entry, study, bomb = _jpegls_bomb(data)
    signed = _signed([entry], study)

    peak, error = _peak_while(lambda: _receive_one(tmp_path, signed, bomb))
    assert peak < 16 * MiB, f"{peak / MiB:.0f} MiB allocated for a {len(bomb)}-byte instance"
    assert isinstance(error, DecompressionBomb), error
    assert "65535x65535" in str(error)


async def test_a_bomb_costs_the_sender_its_connection_not_the_receiver_its_memory(
    tmp_path: Path,
) -> None:
    [data] = ct_series(1, seed=7, size=64)
    entry, study, bomb = _jpegls_bomb(data)
    sender_identity = Identity.generate()
    manifest = build_manifest([entry], study)
    prepared = PreparedStudy(manifest, sender_identity, wires=[bomb])
    async with mesh() as m:
        a, b = await m.node(identity=sender_identity), await m.node()
        m.trust(a, b)
        conn_a = await a.connect(b.identity.public_key)
        conn_b = await b.accept(10)
        link_a, link_b = ChannelLink(conn_a), ChannelLink(conn_b)
        store = MemoryStore()
        sender, receiver = attached(prepared, link_a, link_b, tmp_path / "spool", store)
        async with serving(sender):
            with pytest.raises(RemoteTransferError, match="65535x65535"):
                await asyncio.wait_for(receiver.run(), 30)
            # The receiver dropped the peer, as it does for a malformed frame.
            assert conn_b.closed
            assert isinstance(conn_b.error, DecompressionBomb)
    assert not store.by_hash


def _refused_as_a_bomb(tmp_path: Path, data: bytes, match: str) -> Receiver:
    """``data`` sent alone, sans-IO: the receiver refuses it as a decompression bomb
    (``match`` in the reason) before storing it. Returns the receiver."""
    entry, study, wire = prepare_instance(data)
    signed = _signed([entry], study)
    receiver = Receiver(signed, Spool(tmp_path / "spool"))
    with pytest.raises(RemoteTransferError, match=match) as refused:
        _drive(receiver, _sender(signed, [wire]))
    assert type(refused.value).__name__ == "DecompressionBomb"
    return receiver


def _with_frame_header(name: str, marker: bytes, at: int, value: bytes) -> bytes:
    data = bytearray(_pydicom_sample(name).read_bytes())
    where = data.find(marker)
    assert where > 0, f"{name} has a {marker.hex()} frame header"
    data[where + at : where + at + len(value)] = value
    return bytes(data)


@pytest.mark.parametrize(
    ("name", "marker", "at", "value"),
    [  # frame headers claiming 65535 x 65535 in instances a viewer here would decode
        ("MR_small_jpeg_ls_lossless.dcm", b"\xff\xf7", 5, b"\xff\xff" * 2),
        ("JPEG2000.dcm", b"\xff\x4f\xff\x51", 8, (65535).to_bytes(4, "big") * 2),
    ],
)
def test_a_stored_format_frame_claiming_more_than_its_data_set_is_refused_before_storing(
    tmp_path: Path, name: str, marker: bytes, at: int, value: bytes
) -> None:
    data = _with_frame_header(name, marker, at, value)
    receiver = _refused_as_a_bomb(tmp_path, data, "65535x65535")
    assert receiver.state is State.FAILED


def test_a_data_set_declaring_gigapixel_frames_is_refused_before_storing(tmp_path: Path) -> None:
    # A few KB of JPEG 2000 whose data set says 65535 x 65535 x 100 frames: the viewer
    # would allocate 800 GiB to show it.
    data = _file(_pydicom_sample("JPEG2000.dcm").read_bytes(), NumberOfFrames=100)
    data = _file(data, Rows=65535, Columns=65535)
    _refused_as_a_bomb(tmp_path, data, "would decode to")


def test_an_honest_sender_of_a_blank_image_still_gets_through_the_expansion_limit(
    tmp_path: Path,
) -> None:
    # 32 MiB of zeros compresses beyond MAX_EXPANSION: the sender sends it as it is.
    rng = np.random.default_rng(8)
    data = ct_instance(rng, "1.2.3", "1.2.3.1", 0, size=64)
    blank = _file(data, Rows=2048, Columns=8192, PixelData=bytes(2048 * 8192 * 2))
    entry, study, wire = prepare_instance(blank)
    assert within_budget(entry.size, len(wire))
    signed = _signed([entry], study)
    receiver = Receiver(signed, Spool(tmp_path / "spool"))
    assert _drive(receiver, _sender(signed, [wire])) == [blank]


# -- Issue 13 item 12: an instance must be what its manifest says; no silent overwrite ----------


async def test_bytes_of_another_stored_study_sent_under_a_manifest_uid_are_refused(
    tmp_path: Path,
) -> None:
    [victim] = ct_series(1, seed=9, size=64)
    tampered = _file(victim, PatientName="Attacker^Swapped", SeriesDescription="OVERWRITTEN")
    [cover] = ct_series(1, seed=10, size=64)
    cover_entry, cover_study, _ = prepare_instance(cover)
    # The manifest names instance A of the attacker's study; the bytes are instance B of
    # the victim's study (already in the receiver's store), with other content.
    wire = wirecodec.encode(tampered).to_wire()
    entry = dataclasses.replace(
        cover_entry,
        size=len(tampered),
        sha256=hashlib.sha256(tampered).digest(),
    )
    manifest = build_manifest([entry], cover_study)
    sender_identity = Identity.generate()
    prepared = PreparedStudy(manifest, sender_identity, wires=[wire])
    with Store.open(tmp_path / "store", KEY) as store:
        original = store.add_bytes(victim, source="import")
        link_a, link_b = memory_pair()
        sender, receiver = attached(
            prepared, link_a, link_b, tmp_path / "spool", store, "peer:attacker"
        )
        async with serving(sender, link_a, link_b):
            with pytest.raises(ManifestMismatch, match="carry instance"):
                await asyncio.wait_for(receiver.run(), 30)
        kept = store.read_instance(original.sop_instance_uid)
        assert hashlib.sha256(kept).hexdigest() == original.content_hash
        assert not store.has_instance(cover_entry.sop_instance_uid)
        assert [s.study_uid for s in store.studies()] == [original.study_uid]


class _Audit:
    def __init__(self) -> None:
        self.records: list[tuple[object, dict[str, object]]] = []

    def append(self, kind: object, **fields: object) -> int:
        self.records.append((kind, fields))
        return len(self.records)


async def test_a_shared_instance_whose_uid_is_taken_here_is_reported_not_overwritten(
    tmp_path: Path,
) -> None:
    # An honest manifest (the bytes carry its UIDs) for an instance this node already
    # holds with other bytes: the transfer completes, the held one stays, it is reported.
    files = ct_series(3, seed=14, size=64)
    held = _file(files[1], ImageComments="the copy held here")
    sender_identity = Identity.generate()
    prepared = await PreparedStudy.from_files(files, sender_identity)
    audit = _Audit()
    with Store.open(tmp_path / "store", KEY) as store:
        original = store.add_bytes(held, source="import")
        link_a, link_b = memory_pair()
        sender = StudySender(prepared, link_a)
        link_a.attach(sender.on_control, lambda _d: None)
        receivers: list[StudyReceiver] = []
        receiving = asyncio.ensure_future(
            receive_study(
                link_b,
                store,
                tmp_path / "spool",
                peer="peer-a",
                audit=audit,
                on_receiver=receivers.append,
            )
        )
        await asyncio.sleep(0)  # the receiver is attached before the offer goes out
        async with serving(sender, link_a, link_b):
            progress = await asyncio.wait_for(receiving, 30)
        assert progress.instances_done == 3
        kept = store.read_instance(original.sop_instance_uid)
        assert hashlib.sha256(kept).hexdigest() == original.content_hash
        assert [c.sop_instance_uid for c in receivers[0].conflicts] == [original.sop_instance_uid]
        assert len(store.instances(original.study_uid)) == 3
    [(_, fields)] = audit.records
    assert fields["details"]["not_stored"] == 1  # type: ignore[index]


def test_a_peer_cannot_add_images_to_another_patients_study(tmp_path: Path) -> None:
    [victim, extra] = ct_series(2, seed=15, size=64)
    intruder = _file(extra, PatientName="Someone^Else", PatientID="OTHER-1")
    with Store.open(tmp_path / "store", KEY) as store:
        first = store.add_bytes(victim, source="import")
        with pytest.raises(InstanceConflict, match="another patient"):
            store.add_bytes(intruder, source="peer:ATTACKER")
        assert [r.sop_instance_uid for r in store.instances(first.study_uid)] == [
            first.sop_instance_uid
        ]


def test_the_store_refuses_other_bytes_under_a_stored_instance_uid(tmp_path: Path) -> None:
    [victim] = ct_series(1, seed=11, size=64)
    other = _file(victim, PatientName="Other^Bytes")
    with Store.open(tmp_path / "store", KEY) as store:
        first = store.add_bytes(victim, source="import")
        with pytest.raises(InstanceConflict, match="same instance UID, other bytes"):
            store.add_bytes(other, source="peer:x")
        assert hashlib.sha256(store.read_instance(first.sop_instance_uid)).digest() == (
            hashlib.sha256(victim).digest()
        )
        # Nor may an instance slip into a series the store keeps under another study.
        intruder = _file(victim, SOPInstanceUID="1.2.3.4.5.6", StudyInstanceUID="1.2.3.4.5.7")
        with pytest.raises(InstanceConflict, match="another study"):
            store.add_bytes(intruder, source="peer:x")
        assert [s.study_uid for s in store.studies()] == [first.study_uid]


async def test_a_cstore_of_other_bytes_under_a_stored_uid_is_refused_not_retried(
    tmp_path: Path,
) -> None:
    from node.core.config import DicomConfig, NetworkConfig, NodeConfig, NodeHome
    from node.core.keystore import save_identity
    from node.dicom.net import STATUS_CANNOT_UNDERSTAND, send_to_pacs

    home, identity = NodeHome(tmp_path / "node"), Identity.generate()
    save_identity(home.key_path, identity, None)
    dicom = DicomConfig(enabled=True, port=0, allowed_calling_aets=["PACS"])
    network = NetworkConfig(mdns=False, listen_host="127.0.0.1")
    home.save_config(NodeConfig(display_name="node", network=network, dicom=dicom))
    [victim] = ct_series(1, seed=13, size=64)
    other = _file(victim, PatientName="Other^Bytes")
    rt = await started(home, identity)
    try:
        first = rt.store.add_bytes(victim, source="import")
        assert rt.dicom is not None
        report = await asyncio.to_thread(
            send_to_pacs, [other], "127.0.0.1", rt.dicom.port, dicom.ae_title, "PACS"
        )
        # "cannot understand", not "out of resources": the PACS is not told to retry.
        assert [r.status for r in report.results] == [STATUS_CANNOT_UNDERSTAND]
        kept = rt.store.read_instance(first.sop_instance_uid)
        assert hashlib.sha256(kept).hexdigest() == first.content_hash
    finally:
        await rt.stop()


def _pydicom_sample(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} ships inside pydicom"
    return Path(str(path))


def test_import_says_which_files_were_not_stored_because_their_uid_was_taken(
    tmp_path: Path,
) -> None:
    # One MR image in three encodings, all with one SOP Instance UID (as 693_UNCR/_J2KR).
    names = ("MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm")
    folder = tmp_path / "in"
    folder.mkdir()
    for name in names:
        (folder / name).write_bytes(_pydicom_sample(name).read_bytes())
    with Store.open(tmp_path / "store", KEY) as store:
        summary = import_paths(store, [folder])
        listed = [r for s in store.studies() for r in store.instances(s.study_uid)]
    assert len(summary.imported) == len(listed) == 1
    assert [p.name for p, _ in summary.conflicts] == sorted(names)[1:]
    assert all(why.startswith("same instance UID, other bytes") for _, why in summary.conflicts)


def test_radmesh_import_prints_what_was_really_stored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    from node.cli.store import cmd_import

    home, _ = make_home(tmp_path, "home", "", [])
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("MR_small.dcm", "MR_small_RLE.dcm"):
        (folder / name).write_bytes(_pydicom_sample(name).read_bytes())
    args = argparse.Namespace(home=str(home.root), paths=[str(folder)], passphrase_env=None)
    assert cmd_import(args) == 0
    out = capsys.readouterr().out
    assert "imported 1 instance(s)" in out
    assert "1 not imported (same instance UID, other bytes: kept the first)" in out
    assert "not imported" in out
    assert "MR_small_RLE.dcm" in out


# -- Issue 14 item 7: the receive spool is sealed at rest ---------------------------------------

MARKER_NAME = "Zebediah^Spoolmarker"
MARKER_PIXELS = b"PIXEL-MARKER-0123456789-PIXEL-MARKER"


def _identified_instance() -> bytes:
    """An identified CT instance whose noise pixels do not compress: it travels (and is
    spooled) as raw bytes, so a plain spool would hold the name and pixels verbatim."""
    rng = np.random.default_rng(12)
    data = ct_instance(rng, "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2", 0, 256)
    noise = rng.integers(0, 1 << 16, 256 * 256, dtype=np.uint16).tobytes()
    pixels = MARKER_PIXELS + noise[len(MARKER_PIXELS) :]
    return _file(data, PatientName=MARKER_NAME, BitsStored=16, HighBit=15, PixelData=pixels)


def _spool_bytes(root: Path) -> Iterator[tuple[Path, bytes]]:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            yield path, path.read_bytes()


def test_an_interrupted_transfer_leaves_no_plaintext_in_the_receive_spool(tmp_path: Path) -> None:
    data = _identified_instance()
    entry, study, wire = prepare_instance(data)
    assert wirecodec.WireInstance.from_wire(wire).encoding is wirecodec.Encoding.RAW
    assert MARKER_PIXELS in wire
    assert MARKER_NAME.encode() in wire
    signed = _signed([entry], study)
    key = Identity.generate().derive_key(SPOOL_KEY_PURPOSE)
    receiver = Receiver(signed, Spool(tmp_path / "spool", key), window=2)
    sender = _sender(signed, [wire])
    receiver.accept()
    for declaration in sender.declarations(0.0, flush=True):
        receiver.declare(declaration, 0.0)
    for request in receiver.poll(0.0):  # two of the three chunks land; then the node stops
        for chunk in sender.receive(request):
            assert receiver.receive(chunk, 0.0) is None
    del receiver

    files = dict(_spool_bytes(tmp_path / "spool"))
    assert any(p.suffix == ".part" for p in files), files.keys()
    for path, content in files.items():
        for marker in (MARKER_NAME.encode(), MARKER_PIXELS, study.encode(), wire[:4096]):
            assert marker not in content, f"{marker[:24]!r} in clear in {path.name}"
        assert os.stat(path).st_mode & 0o077 == 0, path

    # The same node (same key) resumes from what was spooled and finishes byte-exact.
    revived = Receiver.resume(Spool(tmp_path / "spool", key), window=2)
    assert sum(len(p.verified) for p in revived._partials.values()) == 2
    assert _drive(revived, _sender(signed, [wire])) == [data]


def test_a_node_fetch_passes_its_own_spool_key(tmp_path: Path) -> None:
    # The node's spool key comes from its identity (a restart resumes), not the process.
    identity = Identity.generate()
    key = identity.derive_key(SPOOL_KEY_PURPOSE)
    Spool(tmp_path / "s", key).save("manifest", b"secret manifest")
    assert Spool(tmp_path / "s", identity.derive_key(SPOOL_KEY_PURPOSE)).load("manifest") == (
        b"secret manifest"
    )
    assert Spool(tmp_path / "s", Identity.generate().derive_key("x")).load("manifest") is None
    assert b"secret" not in (tmp_path / "s" / "manifest").read_bytes()
