"""Audit boundary: every record signed, cuts detected, every sensitive action recorded
(issue 14, items 9, 10 and 11).

A running node signs a checkpoint when it stops and on a timer; a signed
high-water mark outside the database catches a tail cut or a deleted log. Each
action that moves or shows patient data, or changes whom the node trusts, leaves
a record without PHI in it.
"""

from __future__ import annotations

import asyncio
import io
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest

from crypto.identity import Identity
from node.app.runtime import NodeRuntime
from node.cli import main
from node.core.audit import AUDIT_NAME, AuditError, AuditKind, open_audit
from node.core.config import DicomConfig, NodeHome
from node.core.keystore import load_identity
from node.dicom.net import DicomListener, send_to_pacs
from node.dicom.store import open_store
from tests.dcmtk import generated_ct
from tests.node.test_runtime import FAST, make_home, wait_for
from tui.node_facade import RuntimeNode

NODE_AE = "RADMESH_T"
PATIENT_NAME, PATIENT_ID = "Test^Patient", "P1"  # what generated_ct writes


async def _running_node_with_dicom(tmp_path: Path) -> tuple[NodeRuntime, NodeHome]:
    home, identity = make_home(tmp_path, "hospital", "", [])
    config = home.load_config()
    config.dicom = DicomConfig(
        ae_title=NODE_AE, host="127.0.0.1", port=0, enabled=True, allowed_calling_aets=["PACS"]
    )
    home.save_config(config)
    runtime = NodeRuntime(home, identity, transport_options=FAST)
    await runtime.start()
    return runtime, home


async def _three_dicom_receipts(runtime: NodeRuntime) -> list[bytes]:
    assert runtime.dicom is not None
    files = generated_ct(3)
    report = await asyncio.to_thread(
        send_to_pacs, files, "127.0.0.1", runtime.dicom.port, NODE_AE, "PACS"
    )
    assert report.ok, report.failed
    await wait_for(lambda: len(runtime.audit.records(kind="receive")) == 3)
    return files


def _home_with_one_import(tmp_path: Path) -> tuple[NodeHome, Identity]:
    """A home whose audit log holds one import record."""
    home, identity = make_home(tmp_path, "n", "", [])
    with open_audit(home, identity) as audit:
        audit.append("import", now=time.time(), study_uid="1.2.3")
    return home, identity


def _tamper(home: NodeHome, *statements: str) -> None:
    """``statements`` run on the home's audit database, as someone with its file would."""
    with sqlite3.connect(home.data_dir / AUDIT_NAME, isolation_level=None) as db:
        for statement in statements:
            db.execute(statement)


def _verify(home: NodeHome, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["--home", str(home.root), "audit", "verify"])
    return code, capsys.readouterr().out


def _no_phi(home: NodeHome) -> None:
    """No record of the log names the patient."""
    identity = load_identity(home.key_path)
    with open_audit(home, identity) as audit:
        for record in audit.records():
            text = repr(record)
            assert "Test" not in text, text
            assert PATIENT_ID not in text.replace("PACS", ""), text


@pytest.mark.timeout(60)
async def test_a_stopped_node_has_signed_every_record_and_a_cut_tail_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runtime, home = await _running_node_with_dicom(tmp_path)
    try:
        await _three_dicom_receipts(runtime)
    finally:
        await runtime.stop()
    code, out = _verify(home, capsys)
    assert code == 0, out
    assert "signed through record 3" in out
    assert "not signed" not in out
    _no_phi(home)

    # Cut the last record and the checkpoint that covered it: the chain alone still holds.
    _tamper(home, "DELETE FROM records WHERE seq = 3", "DELETE FROM checkpoints WHERE seq >= 3")
    code, out = _verify(home, capsys)
    assert code != 0
    assert "records 3 to 3 were cut from the tail" in out

    # Delete everything: rows, then the whole database file.
    _tamper(home, "DELETE FROM records", "DELETE FROM checkpoints")
    code, out = _verify(home, capsys)
    assert code != 0
    assert "all 3 record(s) were removed" in out
    for leftover in home.data_dir.glob(AUDIT_NAME + "*"):
        leftover.unlink()
    code, out = _verify(home, capsys)
    assert code != 0
    assert "all 3 record(s) were removed" in out


@pytest.mark.timeout(60)
async def test_a_running_node_signs_new_records_on_its_timer(tmp_path: Path) -> None:
    runtime, _home = await _running_node_with_dicom(tmp_path)
    runtime.audit_checkpoint_interval = 0.2  # 60 s in production
    try:
        await _three_dicom_receipts(runtime)
        await wait_for(lambda: runtime.audit.unsigned() == 0, 10)
        report = runtime.audit.verify()
        assert report.ok, report.problems
        assert report.last_signed_seq == report.records == 3
        assert report.high_water == 3
    finally:
        await runtime.stop()


def test_deleting_the_high_water_mark_is_detected_and_blocks_signing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home, identity = _home_with_one_import(tmp_path)
    assert _verify(home, capsys)[0] == 0
    (home.root / "audit.hwm").unlink()
    code, out = _verify(home, capsys)
    assert code != 0
    assert "high-water mark" in out
    assert "deleted" in out
    with open_audit(home, identity) as audit:  # nothing is signed over a cut log
        audit.append("import", now=time.time(), study_uid="1.2.4")
        with pytest.raises(AuditError, match="no checkpoint signed"):
            audit.checkpoint(time.time())
        assert audit.unsigned() == 1
    assert not (home.root / "audit.hwm").exists()


def test_a_forged_high_water_mark_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home, _ = _home_with_one_import(tmp_path)
    other = NodeHome(tmp_path / "other")
    with open_audit(other, Identity.generate()) as audit:
        audit.append("import", now=time.time(), study_uid="1.2.3")
    (home.root / "audit.hwm").write_bytes((other.root / "audit.hwm").read_bytes())
    code, out = _verify(home, capsys)
    assert code != 0
    assert "forged" in out


# -- item 10: every action that moves or shows patient data, or changes trust, is a record


def _records(home: NodeHome, kind: str) -> list[tuple[str | None, str | None, dict[str, object]]]:
    identity = load_identity(home.key_path)
    with open_audit(home, identity) as audit:
        return [(r.study_uid, r.peer, r.details) for r in audit.records(kind=kind)]


def _home_with_ct(tmp_path: Path) -> tuple[NodeHome, str]:
    home, identity = make_home(tmp_path, "hospital", "", [])
    with open_store(home, identity) as store:
        uids = {store.add_bytes(f, source="test").study_uid for f in generated_ct(2)}
    return home, uids.pop()


class _Pacs:
    """A real C-STORE SCP on loopback standing in for the hospital PACS."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        config = DicomConfig(ae_title="PACS", port=0, allowed_calling_aets=["RADMESH"])
        self.listener = DicomListener(config, lambda data, _ae: self.received.append(data))


def test_dicom_send_to_the_pacs_is_an_export_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home, study_uid = _home_with_ct(tmp_path)
    pacs = _Pacs()
    with pacs.listener:
        args = ["--host", "127.0.0.1", "--port", str(pacs.listener.port), "--aet", "PACS"]
        assert main(["--home", str(home.root), "dicom", "send", study_uid, *args]) == 0
    assert len(pacs.received) == 2
    exports = _records(home, "export")
    assert exports == [
        (study_uid, None, {"to": "pacs:PACS", "via": "dicom send", "instances": 2, "sent": 2})
    ]
    _no_phi(home)
    assert _verify(home, capsys)[0] == 0


def test_dicom_listen_receipts_are_records(tmp_path: Path) -> None:
    home, _ = _home_with_ct(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "--home", str(home.root), "dicom", "listen",
         "--port", "0", "--allow", "PACS"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # "DICOM listener RADMESH on 127.0.0.1:PORT; ..."
        port = int(first.split(" on ", 1)[1].split(";", 1)[0].rsplit(":", 1)[1])
        files = generated_ct(3)
        report = send_to_pacs(files, "127.0.0.1", port, "RADMESH", "PACS")
        assert report.ok, report.failed
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    receipts = _records(home, "receive")
    sops = {str(pydicom.dcmread(io.BytesIO(f)).SOPInstanceUID) for f in files}
    assert {details["sop"] for _, _, details in receipts} == sops
    assert {details["from"] for _, _, details in receipts} == {"dicom:PACS"}
    _no_phi(home)


def test_export_to_a_folder_is_a_record(tmp_path: Path) -> None:
    home, study_uid = _home_with_ct(tmp_path)
    out = tmp_path / "out"
    assert main(["--home", str(home.root), "export", study_uid, "--to", str(out)]) == 0
    assert [(s, d["instances"]) for s, _, d in _records(home, "export")] == [(study_uid, 2)]
    _no_phi(home)


def test_trust_changes_are_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home, _ = make_home(tmp_path, "hospital", "", [])
    peer = str(Identity.generate().node_id)
    org = Identity.generate().public_key.hex()
    root = ["--home", str(home.root), "trust"]
    assert main([*root, "verify", peer, "--yes"]) == 0
    assert main([*root, "allow", peer]) == 0
    assert main([*root, "revoke", peer]) == 0
    assert main([*root, "org", "add", org]) == 0
    capsys.readouterr()
    assert [(p, d["event"]) for _, p, d in _records(home, "trust")] == [
        (peer, "verify"),
        (peer, "verify"),
        (peer, "revoke"),
        (None, "org-add"),
    ]
    assert _verify(home, capsys)[0] == 0  # each command signed what it appended


@pytest.mark.timeout(60)
async def test_viewing_in_the_tui_and_verifying_there_are_records(tmp_path: Path) -> None:
    home, identity = make_home(tmp_path, "hospital", "", [])
    runtime = NodeRuntime(home, identity, transport_options=FAST)
    await runtime.start()
    try:
        study_uid = {runtime.store.add_bytes(f, source="t").study_uid for f in generated_ct(1)}
        facade = RuntimeNode(runtime)
        facade.record_view(study_uid.pop(), live=False)
        peer = str(Identity.generate().node_id)
        facade.mark_verified(peer)
        assert [r.kind for r in runtime.audit.records()] == ["view", "trust"]
        assert runtime.audit.records(kind="trust")[0].peer == peer
    finally:
        await runtime.stop()
    _no_phi(home)


def test_doctor_reports_the_audit_state_and_a_cut_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home, identity = make_home(tmp_path, "n", "", [])
    with open_audit(home, identity) as audit:
        for i in range(3):
            audit.append("import", now=time.time(), study_uid=f"1.2.{i}")
    main(["--home", str(home.root), "doctor"])
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "audit log" in x)
    assert line.startswith("[ok  ]")
    assert "3 record(s), last checkpoint 0 min ago, high-water mark at record 3" in line
    _tamper(home, "DELETE FROM records WHERE seq = 3", "DELETE FROM checkpoints")
    assert main(["--home", str(home.root), "doctor"]) == 1
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "audit log" in x)
    assert line.startswith("[FAIL]")
    assert "records 3 to 3 were cut from the tail" in line


def test_listing_patient_names_is_a_view_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home, _ = _home_with_ct(tmp_path)
    assert main(["--home", str(home.root), "studies"]) == 0
    assert _records(home, "view") == []  # names hidden: nothing shown, nothing to record
    assert main(["--home", str(home.root), "studies", "--phi"]) == 0
    assert PATIENT_NAME in capsys.readouterr().out
    assert _records(home, "view") == [(None, None, {"by": "studies --phi", "studies": 1})]
    _no_phi(home)


def test_a_writer_between_anothers_commit_and_its_mark_waits_for_the_mark(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer's COMMIT notes that a high-water mark exists before the mark file is
    written; another process that read the log in between took the mark for deleted and
    refused to sign (two `radmesh import` runs on a new home: one exited 1). Now the mark
    is raised under its lock, taken before the COMMIT, and read under it."""
    from node.core import audit as audit_module
    from node.core.private import write_private as write

    home, identity = make_home(tmp_path, "node", "", [])
    first, second = open_audit(home, identity), open_audit(home, identity)
    between, go_on = threading.Event(), threading.Event()

    def held_after_commit(path: Path, data: bytes) -> None:
        if not between.is_set():  # the first writer: committed, its mark not yet written
            between.set()
            go_on.wait(10)
        write(path, data)

    monkeypatch.setattr(audit_module, "write_private", held_after_commit)
    first.append(AuditKind.IMPORT, now=time.time(), details={"n": 1})
    signer = threading.Thread(target=first.checkpoint, args=(time.time(),))
    signer.start()
    assert between.wait(10)
    outcome: dict[str, object] = {}

    def sign_second() -> None:
        try:
            second.append(AuditKind.IMPORT, now=time.time(), details={"n": 2})
            outcome["signed"] = second.checkpoint(time.time())
        except AuditError as exc:
            outcome["error"] = str(exc)

    other = threading.Thread(target=sign_second)
    other.start()
    other.join(2)  # the old code refused at once; the new one waits for the mark
    go_on.set()
    signer.join(10)
    other.join(10)
    first.close()
    second.close()
    assert outcome == {"signed": 2}
