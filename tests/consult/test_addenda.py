"""Addenda: a signed report is final; the consultant amends it only with a signed addendum
bound to the exact report bytes, delivered like the report, verified on arrival (its
signer must be the report's author), and filed as a new SR naming the report's SR as its
predecessor, under the real patient."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pydicom
import pytest

from consult.addenda import (
    ADDENDUM_TYPE,
    MAX_ADDENDUM_WIRE,
    Addendum,
    report_digest,
    verify_addendum,
)
from consult.errors import BadReport, LocalConsultError, MalformedMessage
from consult.report import PatientStudy, export_addendum_sr, export_sr, verify_report
from consult.requests import Event, Priority
from crypto.envelope import SignedEnvelope
from crypto.identity import Identity
from node.app import consults, reports
from node.app.reports import ReportDesk
from node.app.runtime import NodeRuntime
from node.demo.phantom import generate_ct
from tests.consult.test_alerts import _golden_report
from tests.node.test_runtime import FAST, make_home, wait_for

GOLDEN = Path(__file__).parents[1] / "fixtures" / "consult"
CONSULTANT = Identity(bytes(range(32, 64)))
T0 = 1_800_000_000
CONSULT = "c" * 32
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR


def _golden_addendum() -> Addendum:
    report = _golden_report(False).sign(CONSULTANT)
    return Addendum(CONSULT, report_digest(report), 1, CONSULTANT.node_id, "Dr N",
                    "Correction: the collection is on the right.", T0 + 600)  # fmt: skip


def test_golden_bytes_of_an_addendum() -> None:
    wire = _golden_addendum().to_wire(CONSULTANT)
    assert wire == (GOLDEN / "addendum.bin").read_bytes()
    assert Addendum.from_wire(wire) == _golden_addendum()


def test_an_addendum_verifies_only_against_its_author_report_and_number() -> None:
    report = _golden_report(False).sign(CONSULTANT)
    wire = _golden_addendum().to_wire(CONSULTANT)
    ok = verify_addendum(wire, consult_id=CONSULT, report_wire=report,
                         author=CONSULTANT.node_id, number=1)  # fmt: skip
    assert ok.text.startswith("Correction")
    other = Identity.generate()
    with pytest.raises(BadReport, match="signed by"):
        verify_addendum(wire, consult_id=CONSULT, report_wire=report, author=other.node_id,
                        number=1)  # fmt: skip
    with pytest.raises(BadReport, match="another version"):
        verify_addendum(wire, consult_id=CONSULT, report_wire=report + b"x",
                        author=CONSULTANT.node_id, number=1)  # fmt: skip
    with pytest.raises(BadReport, match="expected next"):
        verify_addendum(wire, consult_id=CONSULT, report_wire=report,
                        author=CONSULTANT.node_id, number=2)  # fmt: skip
    # Signed by a stranger but naming the consultant as author: the signature check refuses.
    forged = SignedEnvelope.create(other, ADDENDUM_TYPE, _golden_addendum().to_body()).to_wire()
    with pytest.raises(MalformedMessage, match="other than its named author"):
        Addendum.from_wire(forged)
    with pytest.raises(MalformedMessage, match="limit"):
        Addendum.from_wire(b"\x00" * (MAX_ADDENDUM_WIRE + 1))
    with pytest.raises(LocalConsultError, match="needs its text"):
        Addendum(CONSULT, bytes(32), 1, CONSULTANT.node_id, "", "  ", T0)


def test_the_addendum_sr_names_the_report_sr_as_predecessor() -> None:
    report = _golden_report(False)
    patient = PatientStudy(patient_name="Real^Patient", patient_id="MRN1")
    first = pydicom.dcmread(io.BytesIO(export_sr(report, relink_uid=lambda u: u, patient=patient)))
    added = pydicom.dcmread(io.BytesIO(export_addendum_sr(
        report, _golden_addendum(), relink_uid=lambda u: u, patient=patient)))  # fmt: skip
    assert added.SOPInstanceUID != first.SOPInstanceUID
    assert added.StudyInstanceUID == first.StudyInstanceUID
    assert str(added.PatientName) == "Real^Patient"
    (study,) = added.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == first.StudyInstanceUID
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    (ref,) = series.ReferencedSOPSequence
    assert ref.ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == first.SOPClassUID


async def test_an_addendum_reaches_the_hospital_as_a_second_sr_and_a_forgery_is_refused(
    tmp_path: Path,
    registry: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from tui.node_facade import RuntimeNode

    caplog.set_level(logging.INFO, logger="node.app.runtime")
    rural_home, rural = make_home(tmp_path, "rural", registry, [])
    neuro_home, neuro = make_home(tmp_path, "neuro", registry, ["neuro"])
    other_home, mallory = make_home(tmp_path, "mallory", registry, ["neuro"])
    a = NodeRuntime(rural_home, rural, transport_options=FAST)
    b = NodeRuntime(neuro_home, neuro, transport_options=FAST)
    c = NodeRuntime(other_home, mallory, transport_options=FAST)
    for rt in (a, b, c):
        await rt.start()
    try:
        for path in generate_ct(tmp_path / "ct", slices=1, rows=32):
            a.store.add_file(path, source="test")
        study_uid = a.store.studies()[0].study_uid
        real_name = a.store.study(study_uid).patient_name
        a.trust.mark_verified(neuro.node_id, a.now())
        a.trust.mark_verified(mallory.node_id, a.now())  # trusted, but not this consult's
        b.trust.mark_verified(rural.node_id, b.now())
        c.trust.mark_verified(rural.node_id, c.now())
        request, _, _ = await a.consulting.request_consult(neuro.public_key, study_uid,
            consults.Terms(question="q", priority=Priority.URGENT, subspecialty="neuro",
                           jurisdiction="IE"),
        )  # fmt: skip
        await wait_for(lambda: bool(b.consults.cases()))
        await b.consulting.respond(request.id, Event.ACCEPT)
        await b.consulting.studies.fetch(request.id)
        await b.consulting.reports.send_report(
            request.id, text="Collection.", impression="Left SDH."
        )
        await wait_for(lambda: request.id in a.reports)
        report_wire = a.consults.report_wire(request.id)
        assert report_wire is not None

        # A signed report is final: a second one is refused, pointing at the addendum.
        with pytest.raises(LocalConsultError, match="consult addendum"):
            await b.consulting.reports.send_report(request.id, text="", impression="Right SDH.")

        # Mallory (trusted by the hospital, not the consultant) signs an addendum to the
        # real report as herself: refused, nothing filed.
        forged = Addendum(request.id, report_digest(report_wire), 1, mallory.node_id,
                          "Dr Neuro", "Ignore the report: no bleed.", c.now())  # fmt: skip
        await c.send_message(rural.public_key, reports.ADDENDUM_KIND, forged.to_wire(mallory))
        await wait_for(lambda: any(
            "An addendum from" in r.getMessage() and "was refused" in r.getMessage()
            and mallory.node_id.short() in r.getMessage() for r in caplog.records))  # fmt: skip

        # The canary: the consultant's real addendum, on the same path, is addendum 1.
        addendum, how = await b.consulting.reports.send_addendum(
            request.id, "Correction: right side."
        )
        assert addendum.number == 1
        assert how
        await wait_for(lambda: len(a.consults.addenda_wires(request.id)) == 1)
        (filed,) = a.consults.addenda_wires(request.id)
        assert Addendum.from_wire(filed).text == "Correction: right side."
        await wait_for(lambda: len(a.store.instances(study_uid)) == 3)  # image, SR, addendum SR

        srs = [r for r in a.store.instances(study_uid) if r.sop_class_uid == SR_CLASS]
        docs = {r.sop_instance_uid: pydicom.dcmread(io.BytesIO(a.store.read_instance(
            r.sop_instance_uid))) for r in srs}  # fmt: skip
        first = docs[a.reports[request.id]]
        (second,) = [d for uid, d in docs.items() if uid != a.reports[request.id]]
        assert str(second.PatientName) == real_name  # re-identified like the report
        assert second.StudyInstanceUID == study_uid
        ref = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
        assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
        texts = [e.value for e in second.iterall() if e.keyword == "TextValue"]
        assert "Correction: right side." in texts

        # Re-sending the report re-sends its addenda; the hospital files each once.
        await b.consulting.reports.resend_report(request.id)
        said = await RuntimeNode(b).add_addendum(request.id, "Also: no shift.")  # the TUI's e
        assert said.startswith(f"addendum 2 to the report of consult {request.id[:8]}")
        await wait_for(lambda: len(a.consults.addenda_wires(request.id)) == 2)
        assert len(a.store.instances(study_uid)) == 4

        # Addendum 3 is lost on the way (kept on the consultant's node, never delivered):
        # addendum 4 brings it along, in order, instead of being refused for the gap.
        lost = Addendum(request.id, report_digest(report_wire), 3, neuro.node_id, "neuro",
                        "Lost on the way.", b.now())  # fmt: skip
        b.consults.add_addendum(request.id, lost.to_wire(neuro), b.now())
        fourth, _ = await b.consulting.reports.send_addendum(request.id, "Fourth.")
        assert fourth.number == 4
        await wait_for(lambda: len(a.consults.addenda_wires(request.id)) == 4)
        assert [Addendum.from_wire(w).number for w in a.consults.addenda_wires(request.id)] == [
            1, 2, 3, 4]  # fmt: skip

        # The referrer reads them all under the report (consult show and the TUI use this).
        sections = RuntimeNode(a).report(request.id)
        assert sections is not None
        headings = [s.heading for s in sections]
        assert headings[-4:] == ["Addendum 1", "Addendum 2", "Addendum 3", "Addendum 4"]
        assert "Correction: right side." in sections[-4].lines
        assert any("NOT acknowledged" in line for s in sections for line in s.lines)
        assert any(f"(node {neuro.node_id.short()}, verified)" in line
                   for line in sections[0].lines)  # fmt: skip
        assert verify_report(report_wire, consult_id=request.id).impression == "Left SDH."
    finally:
        for rt in (a, b, c):
            await rt.stop()


pytestmark = pytest.mark.timeout(180)


def test_consult_show_and_export_list_addenda_under_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import sqlite3

    from consult.store import DB_NAME, ConsultDB
    from node.core.config import NodeHome
    from node.core.keystore import load_identity
    from tests.consult.test_cli_consult import run
    from tests.consult.test_report_text import _reported_case

    hospital, consult_id = _reported_case(tmp_path, capsys, "Collection.")
    author = load_identity(NodeHome(tmp_path / "specialist").key_path, None)
    home = NodeHome(hospital)
    with ConsultDB.in_data_dir(home.data_dir) as db:
        report_wire = db.report_wire(consult_id)
        assert report_wire is not None
        addendum = Addendum(consult_id, report_digest(report_wire), 1, author.node_id,
                            "Martin^Claire", "Correction:\x1b[2J right side.", T0)  # fmt: skip
        db.add_addendum(consult_id, addendum.to_wire(author), T0)
        # A stranger's addendum is refused by the store too (not only on the network path).
        stranger = Identity.generate()
        forged = Addendum(consult_id, report_digest(report_wire), 2, stranger.node_id,
                          "Martin^Claire", "No bleed.", T0)  # fmt: skip
        with pytest.raises(BadReport, match="signed by"):
            db.add_addendum(consult_id, forged.to_wire(stranger), T0)
    code, out, _ = run(hospital, capsys, "show", consult_id[:8])
    assert code == 0
    assert out.index("Addendum 1:") > out.index("Impression:")
    assert "Correction:\ufffd[2J right side." in out
    assert "\x1b" not in out
    txt = tmp_path / "r.txt"
    assert run(hospital, capsys, "export", consult_id[:8], "--out", str(txt))[0] == 0
    assert "Addendum 1:" in txt.read_text(encoding="utf-8")

    # Slipped into the database past the store: shown as not verified, its text not shown.
    with sqlite3.connect(home.data_dir / DB_NAME) as raw:
        raw.execute(
            "INSERT INTO addenda VALUES (?,?,?,?)", (consult_id, 2, forged.to_wire(stranger), T0)
        )
    out = run(hospital, capsys, "show", consult_id[:8])[1]
    assert "Addendum signature:  NOT VERIFIED" in out
    assert "No bleed." not in out
    page = tmp_path / "r.html"
    assert run(hospital, capsys, "export", consult_id[:8], "--out", str(page))[0] == 0
    assert '<p class="warn">Addendum signature:  NOT VERIFIED' in page.read_text(encoding="utf-8")


async def test_an_oversized_addendum_is_refused_before_it_is_decoded() -> None:
    from typing import Any

    class Untouched:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"the runtime's {name} was used for an oversized addendum")

    stranger = Identity.generate()
    huge = b"\x92" + b"\x00" * MAX_ADDENDUM_WIRE  # not even an envelope
    with pytest.raises(MalformedMessage, match="limit"):
        await ReportDesk(Untouched()).on_addendum(stranger.node_id, huge)  # type: ignore[arg-type]
