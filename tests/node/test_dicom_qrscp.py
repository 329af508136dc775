"""The node as a Query/Retrieve SCP (node.dicom.qrscp), asked by real dcmtk findscu,
getscu and movescu on 127.0.0.1, and by the node's own SCU (node.dicom.qr)."""

from __future__ import annotations

import io
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from node.core.config import DicomConfig
from node.dicom import qrscp
from node.dicom.net import DicomListener
from node.dicom.qr import PacsAddress, StudyQuery, find_studies
from node.dicom.qrscp import QueryRetrieveError, find, parse_destinations, retrieve_uids
from node.dicom.store import Store
from tests.dcmtk import (
    LOOPBACK,
    TOOL_TIMEOUT,
    comparable,
    generated_ct,
    require_dcmtk,
    storescp,
)

NODE_AE = "RADMESH_QR"
CALLERS = ["FINDSCU", "GETSCU", "MOVESCU", "RADMESH"]


def _study(count: int, patient_id: str, date: str, accession: str) -> list[bytes]:
    out = []
    for data in generated_ct(count):
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.PatientID, ds.StudyDate, ds.AccessionNumber = patient_id, date, accession
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


@dataclass
class Archive:
    store: Store
    current: str  # study UIDs
    prior: str
    other: str


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Archive]:
    store = Store.open(tmp_path / "store", b"k" * 32)
    uids = []
    for patient, date, accession in (
        ("PAT-1", "20261120", "ACC-CUR"),
        ("PAT-1", "20250302", "ACC-PRI"),
        ("PAT-2", "20261101", "ACC-OTH"),
    ):
        results = [store.add_bytes(d, source="test") for d in _study(3, patient, date, accession)]
        uids.append(results[0].study_uid)
    try:
        yield Archive(store, *uids)
    finally:
        store.close()


def _listener(archive: Archive, destinations: list[str] = ()) -> DicomListener:  # type: ignore[assignment]
    config = DicomConfig(
        ae_title=NODE_AE,
        host=LOOPBACK,
        port=0,
        allowed_calling_aets=CALLERS,
        move_destinations=list(destinations),
    )
    events: list[tuple[str, dict[str, str]]] = []
    listener = DicomListener(
        config,
        lambda data, source: None,
        archive=archive.store,
        audit=lambda kind, details: events.append((kind, details)),
    )
    listener.events = events  # type: ignore[attr-defined]
    return listener


def _query(**keys: str) -> Dataset:
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


# -- matching, without the network -----------------------------------------------------


def test_study_level_matches_patient_id_date_range_and_wildcards(archive: Archive) -> None:
    def studies(**keys: str) -> set[str]:
        query = _query(**{"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "", **keys})
        return {str(a.StudyInstanceUID) for a in find(archive.store, query)}

    assert studies(PatientID="PAT-1") == {archive.current, archive.prior}
    assert studies(PatientID="PAT-1", StudyDate="20260101-") == {archive.current}
    assert studies(PatientID="PAT-1", StudyDate="-20251231") == {archive.prior}
    assert studies(PatientID="PAT-*") == {archive.current, archive.prior, archive.other}
    assert studies(AccessionNumber="ACC-OTH") == {archive.other}
    assert studies(PatientID="NOBODY") == set()
    both = f"{archive.current}\\{archive.other}"
    assert studies(StudyInstanceUID=both) == {archive.current, archive.other}


def test_answers_carry_the_keys_asked_for_and_no_others(archive: Archive) -> None:
    query = _query(QueryRetrieveLevel="STUDY", PatientID="PAT-2", StudyDate="", PatientName="")
    [answer] = list(find(archive.store, query))
    assert answer.PatientID == "PAT-2"
    assert answer.StudyDate == "20261101"
    assert str(answer.PatientName) == "Test^Patient"
    assert answer.StudyInstanceUID == archive.other
    assert "AccessionNumber" not in answer  # not asked for


def test_series_and_image_levels_list_what_is_below_the_study(archive: Archive) -> None:
    series = list(
        find(
            archive.store,
            _query(
                QueryRetrieveLevel="SERIES",
                StudyInstanceUID=archive.prior,
                SeriesInstanceUID="",
                Modality="",
            ),
        )
    )
    assert [s.Modality for s in series] == ["CT"]
    images = list(
        find(
            archive.store,
            _query(QueryRetrieveLevel="IMAGE", StudyInstanceUID=archive.prior, SOPInstanceUID=""),
        )
    )
    assert len(images) == 3


@pytest.mark.filterwarnings("ignore:The PN component length")  # the hostile value itself
def test_a_query_without_a_known_level_is_refused(archive: Archive) -> None:
    with pytest.raises(ValueError, match="query level"):
        list(find(archive.store, _query(QueryRetrieveLevel="PATIENTS", PatientID="PAT-1")))
    with pytest.raises(ValueError, match="longer than"):
        list(find(archive.store, _query(QueryRetrieveLevel="STUDY", PatientName="x" * 1000)))


def test_retrieve_names_instances_by_unique_keys_only(archive: Archive) -> None:
    assert (
        len(
            retrieve_uids(
                archive.store, _query(QueryRetrieveLevel="STUDY", StudyInstanceUID=archive.prior)
            )
        )
        == 3
    )
    assert (
        retrieve_uids(archive.store, _query(QueryRetrieveLevel="STUDY", StudyInstanceUID="1.2.3"))
        == []
    )
    with pytest.raises(ValueError, match="Study Instance UID"):
        retrieve_uids(archive.store, _query(QueryRetrieveLevel="STUDY", PatientID="PAT-1"))


def test_move_destinations_must_be_ae_at_host_port() -> None:
    assert parse_destinations(["WS1@10.0.0.5:11112"])["WS1"] == qrscp.Destination(
        "WS1", "10.0.0.5", 11112
    )
    for bad in ("WS1@10.0.0.5", "10.0.0.5:104", "WS1@host:0", "WS1@host:99999", "@h:1"):
        with pytest.raises(QueryRetrieveError, match="AE@host:port"):
            parse_destinations([bad])


# -- real dcmtk tools and our own SCU ------------------------------------------------------


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False
    )


@pytest.mark.system
def test_findscu_lists_the_patients_studies(archive: Archive) -> None:
    require_dcmtk("findscu")
    with _listener(archive) as listener:
        result = _run(
            "findscu", "-S", "-aet", "FINDSCU", "-aec", NODE_AE,
            "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=PAT-1",
            "-k", "StudyInstanceUID", "-k", "StudyDate",
            LOOPBACK, str(listener.port),
        )  # fmt: skip
        events = listener.events  # type: ignore[attr-defined]
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert archive.current in output
    assert archive.prior in output
    assert archive.other not in output
    assert ("dicom.find", {"calling_ae": "FINDSCU", "matches": "2"}) in events
    assert all("PAT-1" not in str(details) for _, details in events)  # keys are not audited


@pytest.mark.system
def test_getscu_retrieves_the_prior_intact(archive: Archive, tmp_path: Path) -> None:
    require_dcmtk("getscu")
    out = tmp_path / "got"
    out.mkdir()
    with _listener(archive) as listener:
        result = _run(
            "getscu", "-S", "-aet", "GETSCU", "-aec", NODE_AE, "-od", str(out),
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={archive.prior}",
            LOOPBACK, str(listener.port),
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    got = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p) for p in out.iterdir()}
    stored = {row.sop_instance_uid for row in archive.store.instances(archive.prior)}
    assert set(got) == stored
    for uid, ds in got.items():
        original = pydicom.dcmread(io.BytesIO(archive.store.read_instance(uid)))
        assert comparable(ds) == comparable(original)


@pytest.mark.system
def test_movescu_sends_to_a_listed_destination_and_never_to_another(
    archive: Archive, tmp_path: Path
) -> None:
    require_dcmtk("movescu", "storescp")
    with storescp(tmp_path / "ws", ae_title="WS1") as workstation:
        destinations = [f"WS1@{LOOPBACK}:{workstation.port}"]
        with _listener(archive, destinations) as listener:
            refused = _run(
                "movescu", "-S", "-aet", "MOVESCU", "-aec", NODE_AE, "-aem", "EVIL",
                "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={archive.current}",
                LOOPBACK, str(listener.port),
            )  # fmt: skip
            nothing = _run(
                "movescu", "-S", "-aet", "MOVESCU", "-aec", NODE_AE, "-aem", "WS1",
                "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=1.2.3.4",
                LOOPBACK, str(listener.port),
            )  # fmt: skip
            moved = _run(
                "movescu", "-S", "-aet", "MOVESCU", "-aec", NODE_AE, "-aem", "WS1",
                "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={archive.prior}",
                LOOPBACK, str(listener.port),
            )  # fmt: skip
            events = listener.events  # type: ignore[attr-defined]
        assert moved.returncode == 0, moved.stderr
        assert nothing.returncode == 0, nothing.stderr  # an unknown study: zero sub-operations
        received = {str(pydicom.dcmread(p).StudyInstanceUID) for p in workstation.files()}
    # The refused move sent nothing; the one after it (same association order) did.
    assert received == {archive.prior}
    assert "A801" in (refused.stdout + refused.stderr).upper() or refused.returncode != 0
    kinds = [(kind, details.get("status", details.get("instances"))) for kind, details in events]
    assert ("dicom.move", "unknown destination") in kinds
    assert ("dicom.move", "3") in kinds


@pytest.mark.system
def test_our_own_scu_finds_on_another_node(archive: Archive) -> None:
    """One node querying another: node.dicom.qr against node.dicom.qrscp. (Its C-GET
    refuses to run beside a listener in the same process: getscu covers C-GET.)"""
    with _listener(archive) as listener:
        pacs = PacsAddress(LOOPBACK, listener.port, NODE_AE, "RADMESH")
        result = find_studies(pacs, StudyQuery(patient_id="PAT-1"))
    assert {m.study_uid for m in result.matches} == {archive.current, archive.prior}
