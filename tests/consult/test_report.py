"""Signed reports and peer reviews; the DICOM SR that goes back to the PACS."""

from __future__ import annotations

import dataclasses
import io
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from consult.errors import BadReport, LocalConsultError
from consult.measure import PixelSpacing, ellipse_roi_stats, length_mm
from consult.report import (
    KeyImage,
    Measurement,
    PatientStudy,
    PeerReview,
    Report,
    Score,
    Unit,
    export_sr,
    verify_report,
    verify_review,
)
from crypto.envelope import SignedEnvelope
from crypto.identity import Identity
from tests.consult.test_sr import items as content_items

CONSULTANT = Identity(bytes([7]) * 32)
AT = 1_800_000_000
PSEUDO_PREFIX = "2.25.777."


def ct_path() -> Path:
    path = get_testdata_file("CT_small.dcm")  # ships inside pydicom
    assert path is not None
    return Path(str(path))


def pseudonymise(uid: str) -> str:
    return PSEUDO_PREFIX + str(abs(hash(uid)) % 10**12)


def make_report(measurements: bool = True) -> tuple[Report, dict[str, str], pydicom.Dataset]:
    ct = pydicom.dcmread(ct_path())
    mapping = {
        pseudonymise(uid): uid
        for uid in (ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID)
    }
    reverse = {v: k for k, v in mapping.items()}
    key = KeyImage(reverse[ct.SeriesInstanceUID], ct.SOPClassUID, reverse[ct.SOPInstanceUID], None)
    spacing = PixelSpacing.from_dicom(ct.PixelSpacing)
    roi = ellipse_roi_stats(
        ct.pixel_array,
        (64, 64),
        10,
        8,
        spacing,
        slope=float(ct.RescaleSlope),
        intercept=float(ct.RescaleIntercept),
    )
    items = (
        (
            Measurement("length", length_mm((10, 10), (50, 40), spacing), Unit.MM, "lesion", key),
            Measurement("mean", roi.mean, Unit.HU, "lesion density", key),
            Measurement("area", roi.area_mm2, Unit.MM2, "lesion area", key),
        )
        if measurements
        else ()
    )
    report = Report(
        consult_id="c0ffee00c0ffee00c0ffee00c0ffee00",
        study_uid=reverse[ct.StudyInstanceUID],
        author=CONSULTANT.node_id,
        author_name="Martin^Claire^^Dr",
        text="Hypodense lesion in the left lobe.",
        impression="Likely cyst; follow-up in 6 months.",
        measurements=items,
        key_images=(key,) if measurements else (),
        finalised_at=AT,
    )
    return report, mapping, ct


def test_report_signs_and_verifies_with_float_values_exact() -> None:
    report, _, _ = make_report()
    wire = report.sign(CONSULTANT)
    back = verify_report(
        wire, consult_id="c0ffee00c0ffee00c0ffee00c0ffee00", consultant=CONSULTANT.node_id
    )
    assert back == report
    assert back.measurements[0].value == report.measurements[0].value


def test_tampered_report_is_refused() -> None:
    report, _, _ = make_report()
    wire = bytearray(report.sign(CONSULTANT))
    index = wire.index(b"cyst")
    wire[index : index + 4] = b"mass"
    with pytest.raises(BadReport, match="does not verify"):
        verify_report(bytes(wire), consult_id="c0ffee00c0ffee00c0ffee00c0ffee00")


def test_report_from_the_wrong_node_or_for_the_wrong_case_is_refused() -> None:
    report, _, _ = make_report()
    wire = report.sign(CONSULTANT)
    with pytest.raises(BadReport, match="accepted by"):
        verify_report(
            wire,
            consult_id="c0ffee00c0ffee00c0ffee00c0ffee00",
            consultant=Identity.generate().node_id,
        )
    with pytest.raises(BadReport, match="not other"):
        verify_report(wire, consult_id="other")
    impostor = Identity.generate()
    forged = SignedEnvelope.create(impostor, "consult-report", report.to_body()).to_wire()
    with pytest.raises(BadReport, match="named author"):
        verify_report(forged, consult_id="c0ffee00c0ffee00c0ffee00c0ffee00")
    with pytest.raises(LocalConsultError):
        report.sign(impostor)


def test_report_needs_an_impression_and_known_quantities() -> None:
    report, _, _ = make_report()
    with pytest.raises(LocalConsultError, match="impression"):
        dataclasses.replace(report, impression="  ")
    with pytest.raises(LocalConsultError, match="unknown measurement"):
        Measurement("volume", 1.0, Unit.MM, "x")


def test_peer_review_binds_to_the_exact_report() -> None:
    report, _, _ = make_report()
    wire = report.sign(CONSULTANT)
    reviewer = Identity.generate()
    review = PeerReview(
        "c0ffee00c0ffee00c0ffee00c0ffee00",
        PeerReview.digest(wire),
        reviewer.node_id,
        Score.MINOR,
        "size overstated",
        AT,
    )
    signed = review.sign(reviewer)
    assert verify_review(signed, report_wire=wire) == review
    other = dataclasses.replace(report, impression="Different.").sign(CONSULTANT)
    with pytest.raises(BadReport, match="different version"):
        verify_review(signed, report_wire=other)
    with pytest.raises(LocalConsultError):
        review.sign(CONSULTANT)
    tampered = bytearray(signed)
    index = tampered.index(b"minor")
    tampered[index : index + 5] = b"major"
    with pytest.raises(BadReport):
        verify_review(bytes(tampered), report_wire=wire)


PATIENT = PatientStudy(
    patient_name="Dupont^Marie",
    patient_id="H-000123",
    patient_birth_date="19640212",
    patient_sex="F",
    accession_number="ACC42",
    study_date="20261120",
)


def test_sr_files_under_the_real_study_with_text_and_measurements() -> None:
    report, mapping, ct = make_report()
    data = export_sr(report, relink_uid=mapping.__getitem__, patient=PATIENT)
    sr = pydicom.dcmread(io.BytesIO(data))
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert sr.StudyInstanceUID == ct.StudyInstanceUID  # the original, not the pseudonym
    assert sr.PatientName == "Dupont^Marie"
    assert sr.PatientID == "H-000123"
    assert sr.CompletionFlag == "COMPLETE"
    assert sr.VerificationFlag == "VERIFIED"  # by the signer, whose signature was checked
    assert sr.VerifyingObserverSequence[0].VerifyingObserverName == "Martin^Claire^^Dr"
    tree = content_items(sr.ContentSequence)
    texts = {
        i.ConceptNameCodeSequence[0].CodeMeaning: i.TextValue for i in tree if "TextValue" in i
    }
    assert texts["Finding"] == report.text
    assert texts["Impression"] == report.impression
    numbers = {
        i.ConceptNameCodeSequence[0].CodeMeaning: (
            float(i.MeasuredValueSequence[0].NumericValue),
            i.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue,
        )
        for i in tree
        if i.ValueType == "NUM"
    }
    assert numbers["Length"][0] == pytest.approx(report.measurements[0].value, rel=1e-6)
    assert numbers["Length"][1] == "mm"
    assert numbers["Mean"][1] == "[hnsf'U]"
    images = {
        i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in tree if i.ValueType == "IMAGE"
    }
    assert images == {ct.SOPInstanceUID}
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == ct.StudyInstanceUID
    assert not any(PSEUDO_PREFIX in str(v.value) for v in sr.iterall() if v.VR == "UI")


def test_sr_without_images_still_files_under_the_study() -> None:
    report, mapping, ct = make_report(measurements=False)
    data = export_sr(report, relink_uid=mapping.__getitem__, patient=PATIENT)
    sr = pydicom.dcmread(io.BytesIO(data))
    assert sr.StudyInstanceUID == ct.StudyInstanceUID
    assert "CurrentRequestedProcedureEvidenceSequence" not in sr


def test_dcmtk_reads_the_sr(tmp_path: Path) -> None:
    if shutil.which("dsrdump") is None:
        pytest.skip("dsrdump missing: install the Debian package dcmtk")
    report, mapping, _ = make_report()
    path = tmp_path / "report.dcm"
    path.write_bytes(export_sr(report, relink_uid=mapping.__getitem__, patient=PATIENT))
    result = subprocess.run(
        ["dsrdump", "+Pl", str(path)], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # dcmtk warns about SR structure problems here
    assert "Likely cyst; follow-up in 6 months." in result.stdout
    assert "Dupont^Marie" in result.stdout
    assert "Comprehensive SR" in result.stdout
