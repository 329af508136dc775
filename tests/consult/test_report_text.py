"""The referrer reads the report: `radmesh consult show` and `radmesh consult report --out`,
through one pure formatter; peer text never drives the terminal or the HTML page."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import pytest

from consult import report_text
from consult.errors import BadReport
from consult.report import KeyImage, Mark, Measurement, Outline, Report, Unit
from consult.requests import Event, State
from consult.shared import AnnotationKind
from consult.store import DB_NAME, ConsultDB
from crypto.identity import Identity
from node.core.audit import open_audit
from node.core.config import NodeHome
from node.core.keystore import load_identity
from tests.consult.test_cli_consult import init, requested, run

AT = 1_800_000_000
CONSULT = "c0ffee00" * 4
HOSTILE = "Dr \x1b]52;c;cm0gLXJmIH4=\x07Evil\x1b[2J\u202eesrever <script>alert(1)</script>"


def image(number: int | None, frame: int | None = None) -> KeyImage:
    return KeyImage("2.25.1", "1.2.840.10008.5.1.4.1.1.2", "2.25.99887766554433", frame, number)


def make_report(
    author: Identity, consult_id: str = CONSULT, text: str = "", study: str = "2.25.5"
) -> Report:
    ellipse = Outline(AnnotationKind.ELLIPSE, ((30, 30), (5, 4)))
    return Report(
        consult_id=consult_id,
        study_uid=study,
        author=author.node_id,
        author_name="Martin^Claire",
        text=text,
        impression="Acute left subdural haematoma.\nNeurosurgical review.",
        measurements=(
            Measurement("length", 9.04, Unit.MM, "thickness", image(12), None, "a1"),
            Measurement("area", 62.8, Unit.MM2, "collection", image(12), ellipse, "a2"),
            Measurement("mean", 61.25, Unit.HU, "collection", image(12), ellipse, "a2"),
            Measurement("sd", 4.5, Unit.HU, "collection", image(12), ellipse, "a2"),
            Measurement("angle", 33.0, Unit.DEGREE, "", image(None, 3)),
        ),
        key_images=(image(12),),
        finalised_at=AT,
        marks=(Mark("midline", image(14), Outline(AnnotationKind.ARROW, ((1, 1), (5, 5)))),),
        author_institution="Neuro Consult Ltd",
    )


def test_the_formatter_lists_author_signature_time_text_and_measurements() -> None:
    author = Identity(bytes([3]) * 32)
    verified = report_text.Signature(True, "")
    text = report_text.as_text(report_text.report_sections(make_report(author), verified))
    assert f"Martin^Claire (node {author.node_id.short()}), Neuro Consult Ltd" in text
    assert "Signature:  verified" in text
    assert "2027-01-15 08:00 UTC" in text
    assert "Findings:\n  (none written)" in text  # an empty section says so, honestly
    assert "Impression:\n  Acute left subdural haematoma.\n  Neurosurgical review." in text
    assert "thickness: length 9.0 mm (image 12)" in text
    assert "collection: ellipse ROI: area 63 mm², mean 61.2 HU, SD 4.5 HU (image 12)" in text
    assert "angle: angle 33.0° (image …887766554433, frame 3)" in text  # no number: UID end
    assert "arrow “midline” (image 14)" in text
    assert "Key images:\n  image 12" in text
    assert "Critical" not in text
    critical = dataclasses.replace(make_report(author), critical=True)
    sections = report_text.report_sections(critical, verified)
    assert report_text.CRITICAL_LINE in report_text.as_text(sections)
    assert f'<p class="warn">{report_text.CRITICAL_LINE}</p>' in report_text.as_html(sections)


def test_peer_text_is_cleaned_of_terminal_controls_and_escaped_in_html() -> None:
    author = Identity(bytes([3]) * 32)
    report = make_report(author, text=HOSTILE)
    report = dataclasses.replace(report, author_name=HOSTILE)
    sections = report_text.report_sections(report, report_text.Signature(True, ""))
    text = report_text.as_text(sections)
    for bad in ("\x1b", "\x07", "\u202e"):
        assert bad not in text
    assert report_text.REPLACEMENT in text  # visibly replaced, not silently dropped
    page = report_text.as_html(sections)
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "\x1b" not in page
    assert "default-src 'none'" in page  # nothing loads from elsewhere


def _accepted_case(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, str]:
    hospital, specialist, consult_id, request_file = requested(tmp_path, capsys)
    response_file = tmp_path / "resp.bin"
    assert run(specialist, capsys, "import", str(request_file))[0] == 0
    assert run(specialist, capsys, "accept", consult_id, "--out", str(response_file))[0] == 0
    assert run(hospital, capsys, "import", str(response_file))[0] == 0
    with ConsultDB.in_data_dir(NodeHome(hospital).data_dir) as db:
        db.apply(consult_id, Event.BEGIN_REVIEW, AT)
    return hospital, consult_id


def _file(hospital: Path, consult_id: str, text: str, *, study: str | None = None) -> None:
    author = load_identity(NodeHome(hospital.parent / "specialist").key_path, None)
    with ConsultDB.in_data_dir(NodeHome(hospital).data_dir) as db:
        shared = db.get(consult_id).request.study_uid
        wire = make_report(author, consult_id, text, study or shared).sign(author)
        db.file_report(consult_id, wire, AT)


def _reported_case(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> tuple[Path, str]:
    hospital, consult_id = _accepted_case(tmp_path, capsys)
    _file(hospital, consult_id, text)
    return hospital, consult_id


def test_consult_show_prints_the_report_without_control_characters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hospital, consult_id = _reported_case(tmp_path, capsys, HOSTILE)
    code, out, _ = run(hospital, capsys, "show", consult_id[:8])
    assert code == 0
    assert "Signature:  verified" in out
    assert "Impression:\n  Acute left subdural haematoma." in out
    assert "thickness: length 9.0 mm (image 12)" in out
    assert "\x1b" not in out
    assert "\u202e" not in out


def test_consult_export_writes_text_and_escaped_html(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hospital, consult_id = _reported_case(tmp_path, capsys, HOSTILE)
    txt, page = tmp_path / "r.txt", tmp_path / "r.html"
    assert run(hospital, capsys, "export", consult_id[:8], "--out", str(txt))[0] == 0
    assert run(hospital, capsys, "export", consult_id[:8], "--out", str(page))[0] == 0
    plain = txt.read_text(encoding="utf-8")
    assert "collection: ellipse ROI: area 63 mm²" in plain
    assert "\x1b" not in plain
    home = NodeHome(hospital)
    with open_audit(home, load_identity(home.key_path, None)) as audit:
        exports = audit.records(kind="export")
    assert [(r.details["consult"], r.details["format"]) for r in exports] == [
        (consult_id, "text"),
        (consult_id, "html"),
    ]
    assert not any(str(tmp_path) in str(r.details) for r in exports)
    html = page.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    assert "&lt;script&gt;" in html
    assert "<script>" not in html
    assert "\x1b" not in html


def test_a_report_altered_in_the_database_is_shown_as_not_verified_and_never_exported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hospital, consult_id = _reported_case(tmp_path, capsys, "Normal.")
    path = NodeHome(hospital).data_dir / DB_NAME
    with sqlite3.connect(path) as db:
        (wire,) = db.execute("SELECT wire FROM reports").fetchone()
        db.execute("UPDATE reports SET wire = ?", (bytes(wire).replace(b"Acute", b"Chronic"),))
    code, out, _ = run(hospital, capsys, "show", consult_id[:8])
    assert code == 0
    assert "NOT VERIFIED" in out
    assert "Chronic" not in out  # nothing of an unverified report is shown
    code, _, err = run(hospital, capsys, "export", consult_id[:8], "--out", str(tmp_path / "r"))
    assert code == 1
    assert "no longer verifies" in err
    assert not (tmp_path / "r").exists()


def test_consult_export_without_a_report_says_where_to_look(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hospital = tmp_path / "h"
    init(hospital, capsys)
    _, out, _ = run(
        hospital, capsys, "request", "--study", "2.25.1", "--question", "?",
        "--subspecialty", "msk", "--jurisdiction", "FR", "--to", str(Identity.generate().node_id),
        "--out", str(tmp_path / "req.bin"),
    )  # fmt: skip
    code, _, err = run(hospital, capsys, "export", out.split()[1][:8], "--out", "x.txt")
    assert code == 1
    assert "no report on this node yet" in err


def test_a_report_naming_another_study_than_the_one_shared_is_not_filed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hospital, consult_id = _accepted_case(tmp_path, capsys)
    with pytest.raises(BadReport, match="another study"):
        _file(hospital, consult_id, "Normal.", study="2.25.424242")
    with ConsultDB.in_data_dir(NodeHome(hospital).data_dir) as db:
        assert db.report_wire(consult_id) is None
        assert db.get(consult_id).state is State.IN_REVIEW
    _file(hospital, consult_id, "Normal.")  # the right one still files
