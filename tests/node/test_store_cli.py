"""The store commands from the command line, on throwaway homes."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pydicom
import pytest

from node.cli import main
from node.demo.phantom import generate_ct


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    assert main(["--home", str(home), "init", "--no-passphrase"]) == 0
    return home


@pytest.fixture
def series(tmp_path: Path) -> list[Path]:
    return generate_ct(tmp_path / "in" / "ct", slices=4, rows=64, seed=3)


def test_import_studies_export_round_trip(
    home: Path, series: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (series[0].parent / "junk.txt").write_text("hello")
    capsys.readouterr()
    assert main(["--home", str(home), "import", str(series[0].parent.parent)]) == 0
    out = capsys.readouterr().out
    assert "imported 4 instance(s)" in out
    assert "1 rejected" in out
    assert "junk.txt: not DICOM" in out

    assert main(["--home", str(home), "import", str(series[0])]) == 0
    assert "1 duplicate(s)" in capsys.readouterr().out

    study_uid = pydicom.dcmread(series[0]).StudyInstanceUID
    assert main(["--home", str(home), "studies", "--series"]) == 0
    listing = capsys.readouterr().out
    assert study_uid in listing
    assert "AX HEAD" in listing
    assert "[patient hidden]" in listing

    out_dir = tmp_path / "out"
    assert main(["--home", str(home), "export", study_uid, "--to", str(out_dir)]) == 0
    exported = {p.read_bytes() for p in out_dir.rglob("*.dcm")}
    assert exported == {p.read_bytes() for p in series}


def test_import_of_nothing_usable_exits_1(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\x00" * 300)
    assert main(["--home", str(home), "import", str(bad)]) == 1
    assert "bad.dcm: not DICOM" in capsys.readouterr().out


def test_export_of_unknown_study_is_a_readable_error(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--home", str(home), "export", "1.2.3", "--to", str(tmp_path / "x")]) == 1
    assert "no study 1.2.3" in capsys.readouterr().err


def test_audit_records_import_and_export_and_detects_tampering(
    home: Path, series: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study_uid = pydicom.dcmread(series[0]).StudyInstanceUID
    assert main(["--home", str(home), "import", str(series[0].parent)]) == 0
    assert main(["--home", str(home), "export", study_uid, "--to", str(tmp_path / "o")]) == 0
    capsys.readouterr()
    assert main(["--home", str(home), "audit", "show", "--study", study_uid]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert [line.split()[3] for line in shown] == ["import", "export"]
    assert main(["--home", str(home), "audit", "verify"]) == 0
    assert "audit log intact" in capsys.readouterr().out

    with sqlite3.connect(home / "data" / "audit.sqlite") as db:
        db.execute("UPDATE records SET kind = 'view' WHERE seq = 1")
    assert main(["--home", str(home), "audit", "verify"]) == 1
    assert "PROBLEM: record 1" in capsys.readouterr().out


def test_demo_data_writes_and_imports_a_study(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    args = ["--ct-slices", "5", "--ct-rows", "64", "--mr-slices", "2", "--cr-rows", "128"]
    assert main(["--home", str(home), "demo-data", str(out), *args, "--import"]) == 0
    text = capsys.readouterr().out
    assert "wrote 8 DICOM file(s)" in text
    assert "imported 8 instance(s)" in text
    assert "in 2 study(ies)" in text


def test_delete_needs_confirmation_and_is_audited(
    home: Path, series: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    study_uid = pydicom.dcmread(series[0]).StudyInstanceUID
    assert main(["--home", str(home), "import", str(series[0].parent)]) == 0
    assert main(["--home", str(home), "delete", study_uid]) == 1
    assert "--yes" in capsys.readouterr().err
    assert main(["--home", str(home), "delete", study_uid, "--yes"]) == 0
    assert main(["--home", str(home), "studies"]) == 0
    assert "no studies yet" in capsys.readouterr().out
    assert main(["--home", str(home), "audit", "show", "--kind", "delete"]) == 0
    assert study_uid in capsys.readouterr().out
    assert list((home / "data" / "store" / "blobs").glob("??/*")) == []
