"""Query/retrieve from a real Orthanc PACS on loopback (issue 16, item 1): C-FIND by
patient, modality and date; C-MOVE to the node's listener and C-GET into the store,
each instance's data set byte-exact."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom import _config

from node.app.runtime import NodeRuntime
from node.cli import main
from node.core.audit import open_audit
from node.core.config import NodeHome
from node.core.keystore import load_identity
from node.demo.phantom import generate_ct, generate_mr, random_study
from node.dicom.store import open_store
from tests.dcmtk import dataset_part
from tests.node.test_runtime import make_home
from tests.orthanc import Orthanc, orthanc_server
from tests.ports import free_port

pytestmark = [pytest.mark.system, pytest.mark.slow]

NODE_AE = "RADMESH_QR"


@dataclasses.dataclass
class Site:
    home: NodeHome
    orthanc: Orthanc
    first: str  # CT, 2024-03-15, the patient
    follow_up: str  # MR, 2025-01-02, the same patient
    other: str  # CT, 2024-03-15, another patient
    patient_id: str
    patient_name: str
    files: dict[str, list[bytes]]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    home, _ = make_home(tmp_path, "rural", "", [])
    port = free_port()
    modalities = {"radmesh": (NODE_AE, "127.0.0.1", port)}
    with orthanc_server(tmp_path / "orthanc", modalities=modalities) as orthanc:
        config = home.load_config()
        config.dicom = dataclasses.replace(
            config.dicom,
            ae_title=NODE_AE,
            port=port,
            allowed=[f"{orthanc.ae_title}@127.0.0.1"],
            pacs_host="127.0.0.1",
            pacs_port=orthanc.dicom_port,
            pacs_ae_title=orthanc.ae_title,
        )
        home.save_config(config)
        first = random_study(3)
        follow_up = dataclasses.replace(
            first, study_uid=generate_uid(), date="20250102", description="MR BRAIN"
        )
        other = random_study(4)
        files = {
            first.study_uid: generate_ct(tmp_path / "a", slices=3, rows=32, study=first),
            follow_up.study_uid: generate_mr(tmp_path / "b", slices=2, rows=32, study=follow_up),
            other.study_uid: generate_ct(tmp_path / "c", slices=2, rows=32, study=other),
        }
        data = {uid: [p.read_bytes() for p in paths] for uid, paths in files.items()}
        for parts in data.values():
            for part in parts:
                orthanc.upload(part)
        yield Site(
            home,
            orthanc,
            first.study_uid,
            follow_up.study_uid,
            other.study_uid,
            first.patient.patient_id,
            first.patient.name,
            data,
        )


def _run(site: Site, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["--home", str(site.home.root), "dicom", *argv])
    return code, capsys.readouterr().out


def _listed(out: str) -> set[str]:
    return {line.split()[0] for line in out.splitlines() if line[:1].isdigit()}


def test_query_finds_both_studies_of_a_patient_and_filters(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _run(site, capsys, "query", "--patient-id", site.patient_id)
    assert code == 0
    assert _listed(out) == {site.first, site.follow_up}
    assert site.patient_name.split("^")[0] not in out  # no PHI without --phi
    assert "3 inst" in out
    assert "CT HEAD" in out

    _, out = _run(site, capsys, "query", "--modality", "MR", "--since", "20250101")
    assert _listed(out) == {site.follow_up}
    _, out = _run(site, capsys, "query", "--modality", "ct", "--since", "20240101")
    assert _listed(out) == {site.first, site.other}
    _, out = _run(site, capsys, "query", "--since", "20250101")
    assert _listed(out) == {site.follow_up}


def test_query_phi_only_on_request_and_audited(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _run(site, capsys, "query", "--patient-id", site.patient_id, "--phi")
    assert code == 0
    assert site.patient_name.split("^")[0] in out
    assert site.patient_id in out
    with open_audit(site.home, load_identity(site.home.key_path)) as audit:
        views = [r for r in audit.records() if r.kind == "view"]
    assert [r.details["by"] for r in views] == ["dicom query --phi"]
    assert site.patient_id not in str(views[0].details)


def test_query_is_capped_and_says_so(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _run(site, capsys, "query", "--since", "20000101", "--max", "2")
    assert code == 0
    assert len(_listed(out)) == 2
    assert "more than 2 studies matched" in out


def test_query_refuses_wildcards(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["--home", str(site.home.root), "dicom", "query", "--patient-id", "*"]) != 0
    printed = capsys.readouterr()
    assert not _listed(printed.out)
    assert "one exact value" in printed.err


def _stored(site: Site, study_uid: str) -> dict[str, bytes]:
    with open_store(site.home, load_identity(site.home.key_path)) as store:
        return {
            row.sop_instance_uid: store.read_instance(row.sop_instance_uid)
            for row in store.instances(study_uid)
        }


def _assert_byte_exact(site: Site, study_uid: str) -> None:
    stored = _stored(site, study_uid)
    assert len(stored) == len(site.files[study_uid])
    assert sorted(dataset_part(d) for d in stored.values()) == sorted(
        dataset_part(d) for d in site.files[study_uid]
    )


def test_retrieve_by_move_lands_byte_exact(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _run(site, capsys, "retrieve", site.first)
    assert code == 0, out
    assert "3 received, 0 failed, 0 duplicate" in out
    assert "done" in out  # progress lines
    _assert_byte_exact(site, site.first)
    assert not _stored(site, site.follow_up)  # only the study asked for

    code, out = _run(site, capsys, "retrieve", site.first)
    assert code == 0, out
    assert "0 received, 0 failed, 3 duplicate" in out


def test_retrieve_by_get_lands_byte_exact(
    site: Site, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # As in a fresh `radmesh dicom retrieve --get` process: no listener in this process
    # put pynetdicom in its write-received-data-sets-to-files mode (get_study refuses then).
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", False)
    code, out = _run(site, capsys, "retrieve", site.follow_up, "--get")
    assert code == 0, out
    assert "2 received, 0 failed, 0 duplicate" in out
    _assert_byte_exact(site, site.follow_up)


async def test_retrieve_moves_to_the_running_nodes_listener(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    config = site.home.load_config()
    config.dicom = dataclasses.replace(config.dicom, enabled=True)
    site.home.save_config(config)
    node = NodeRuntime(site.home, load_identity(site.home.key_path), control=True)
    await node.start()
    try:
        assert node.dicom is not None  # the node's own listener, on the port the PACS knows
        argv = ["--home", str(site.home.root), "dicom", "retrieve", site.other]
        capsys.readouterr()
        assert await asyncio.to_thread(main, argv) == 0
        out = capsys.readouterr().out
        assert "2 received, 0 failed, 0 duplicate" in out
        assert "done" in out  # progress relayed through the control socket
        stored = {
            row.sop_instance_uid: node.store.read_instance(row.sop_instance_uid)
            for row in node.store.instances(site.other)
        }
        assert sorted(dataset_part(d) for d in stored.values()) == sorted(
            dataset_part(d) for d in site.files[site.other]
        )
        imports = [r for r in node.audit.records(study_uid=site.other) if r.kind == "import"]
        assert imports[-1].details["via"] == "dicom retrieve (move to the running node)"
    finally:
        await node.stop()
