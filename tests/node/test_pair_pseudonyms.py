"""Stable pseudonyms per hospital-consultant pair (issue 16, item 3): a follow-up of the
same patient to the same consultant gets the same pseudonymous patient ID and date shift;
another consultant, or another patient, never does."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import io
from pathlib import Path

import pydicom

from consult.requests import Event, Priority
from crypto.identity import Identity, NodeId
from node.app import cases, consults
from node.app.runtime import NodeRuntime
from node.demo.phantom import DemoStudy, generate_ct, random_study
from node.dicom import pseudonyms as pair_pseudonyms
from tests.node.test_runtime import make_home


def _days(date: str) -> dt.date:
    return dt.datetime.strptime(date, "%Y%m%d").date()


async def _share(
    rt: NodeRuntime, study_uid: str, consultant: Identity
) -> tuple[str, str, int, str]:
    """Record a consult of ``study_uid`` offered to ``consultant`` (not sent: no network
    needed), accepted by it, and de-identify it as a fetch by that consultant would; returns
    (pseudo patient id, pseudo study uid, date shift in days, original patient id)."""
    request, pseudonyms = await rt.consulting._new_request(
        study_uid,
        consults.Terms("follow-up", Priority.ROUTINE, "neuro", "IE"),
    )
    assert pseudonyms is not None
    pseudonyms.persist(cases.map_path(rt, request.id), cases.map_key(rt))
    now = rt.now()
    rt.consults.add(request, role="requester", now=now, wire=request.to_wire(rt.identity))
    rt.consults.offer(request.id, [consultant.node_id], now, str(rt.identity.node_id))
    rt.consults.answer_offer(request.id, consultant.node_id, Event.ACCEPT, now)
    assert rt.consults.info(request.id).peer_id == consultant.node_id
    files = [rt.store.read_instance(r.sop_instance_uid) for r in rt.store.instances(study_uid)]
    prepare = rt.consulting.studies._deidentifier(request.id)
    # As the transfer runs it: the de-identifier's generator in a worker thread.
    out = await asyncio.to_thread(lambda: list(prepare(files)))
    shared = [pydicom.dcmread(io.BytesIO(d)) for d in out]
    original = pydicom.dcmread(io.BytesIO(files[0]))
    shift = (_days(shared[0].StudyDate) - _days(original.StudyDate)).days
    assert {s.PatientID for s in shared} == {shared[0].PatientID}
    assert shared[0].PatientID != original.PatientID
    return str(shared[0].PatientID), str(shared[0].StudyInstanceUID), shift, original.PatientID


def _add(rt: NodeRuntime, tmp_path: Path, study: DemoStudy, name: str) -> str:
    for path in generate_ct(tmp_path / name, slices=2, rows=32, study=study):
        rt.store.add_file(path, source="test")
    return study.study_uid


async def test_same_patient_same_consultant_same_pseudonym_never_across(tmp_path: Path) -> None:
    home, identity = make_home(tmp_path, "rural", "", [])
    rt = NodeRuntime(home, identity)
    a, b = Identity.generate(), Identity.generate()
    first = random_study(1)
    follow_up = dataclasses.replace(
        first, study_uid=pydicom.uid.generate_uid(), date="20250102", accession="ACC777777"
    )
    other = random_study(2)
    assert other.patient.patient_id != first.patient.patient_id
    await rt.start()
    try:
        uid1 = _add(rt, tmp_path, first, "first")
        uid2 = _add(rt, tmp_path, follow_up, "follow")
        uid3 = _add(rt, tmp_path, other, "other")

        id1, study1, shift1, _ = await _share(rt, uid1, a)
        id2, study2, shift2, _ = await _share(rt, uid2, a)
        assert (id1, shift1) == (id2, shift2)  # the follow-up groups with the earlier case
        assert study1 != study2  # UIDs stay fresh per share
        assert study1 != uid1
        assert study2 != uid2
        assert -1094 <= shift1 <= -365

        id_b, _, shift_b, _ = await _share(rt, uid2, b)
        assert id_b != id1  # another consultant cannot link it
        id_other, _, _, _ = await _share(rt, uid3, a)
        assert id_other not in (id1, id_b)
        # A shift that matched by chance would be 1 in 730; two consultants, one patient: differ
        # for these fixed keys unless the key ignores the consultant.
        assert (id_b, shift_b) != (id1, shift1)
    finally:
        await rt.stop()


def test_pair_keys_differ_per_consultant_and_per_home(tmp_path: Path) -> None:
    box = b"k" * 32
    secret = pair_pseudonyms.linkage_secret(tmp_path / "one", box)
    assert pair_pseudonyms.linkage_secret(tmp_path / "one", box) == secret  # made once
    other_home = pair_pseudonyms.linkage_secret(tmp_path / "two", box)
    assert other_home != secret
    a = str(NodeId.from_public_key(Identity.generate().public_key))
    b = str(NodeId.from_public_key(Identity.generate().public_key))
    assert pair_pseudonyms.pair_key(secret, a) == pair_pseudonyms.pair_key(secret, a)
    assert pair_pseudonyms.pair_key(secret, a) != pair_pseudonyms.pair_key(secret, b)
    assert pair_pseudonyms.pair_key(secret, a) != pair_pseudonyms.pair_key(other_home, a)
    path = pair_pseudonyms.linkage_path(tmp_path / "one")
    assert path.stat().st_mode & 0o077 == 0
    assert secret not in path.read_bytes()  # stored sealed
    # Another identity (the home's was replaced): a new secret, the old file kept aside.
    replaced = pair_pseudonyms.linkage_secret(tmp_path / "one", b"x" * 32)
    assert replaced != secret
    assert pair_pseudonyms.linkage_secret(tmp_path / "one", b"x" * 32) == replaced
    assert len(list((tmp_path / "one").glob("pseudonym-linkage.key.unreadable-*"))) == 1


async def test_plain_send_to_the_same_peer_keeps_the_patient_pseudonym(tmp_path: Path) -> None:
    """`radmesh send` (no consult): a follow-up sent to the same peer groups with the first."""
    from node.app import sending

    home, identity = make_home(tmp_path, "rural", "", [])
    rt = NodeRuntime(home, identity)
    first = random_study(5)
    follow_up = dataclasses.replace(first, study_uid=pydicom.uid.generate_uid(), date="20250303")
    await rt.start()
    try:
        uid1 = _add(rt, tmp_path, first, "first")
        uid2 = _add(rt, tmp_path, follow_up, "follow")
        a = str(Identity.generate().node_id)
        b = str(Identity.generate().node_id)

        def sent(study_uid: str, peer: str) -> str:
            prepare = sending.prepare_share(rt, study_uid, peer, False, True)
            assert prepare is not None
            rows = rt.store.instances(study_uid)
            files = [rt.store.read_instance(r.sop_instance_uid) for r in rows]
            return str(pydicom.dcmread(io.BytesIO(next(iter(prepare(files))))).PatientID)

        assert sent(uid1, a) == sent(uid2, a)
        assert sent(uid2, b) != sent(uid2, a)
    finally:
        await rt.stop()
