"""The report as a DICOM TID 1500 Measurement Report: every annotation tool's measurement as
SCOORD on the annotated image, key images as a KOS, VERIFIED by the signer, honest text
sections; read back with highdicom and checked by dcmtk and dicom3tools."""

from __future__ import annotations

import dataclasses
import io
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import KeyObjectSelectionDocumentStorage

from consult.errors import BadReport
from consult.measure import PixelSpacing, angle_degrees, ellipse_roi_stats, length_mm
from consult.report import (
    KeyImage,
    Measurement,
    PatientStudy,
    Report,
    Unit,
    export_key_images,
    export_sr,
    placeable,
    report_items,
    verify_report,
)
from consult.shared import Annotation, AnnotationKind
from crypto import canonical
from crypto.envelope import SignedEnvelope
from crypto.identity import Identity

CONSULTANT = Identity(bytes([9]) * 32)
AT = 1_800_000_000
CONSULT = "c0ffee00" * 4
PSEUDO = "2.25.4242."
PATIENT = PatientStudy(
    patient_name="Dupont^Marie",
    patient_id="H-000123",
    patient_birth_date="19640212",
    patient_sex="F",
    accession_number="ACC42",
    study_id="S1",
    study_date="20261120",
    study_time="101500",
)


def ct() -> pydicom.Dataset:
    path = get_testdata_file("CT_small.dcm")  # ships inside pydicom
    assert path is not None
    return pydicom.dcmread(path)


class Case:
    """A CT slice as the consultant saw it (pseudonymised UIDs) and the way back."""

    def __init__(self) -> None:
        self.ds = ct()
        originals = (self.ds.StudyInstanceUID, self.ds.SeriesInstanceUID, self.ds.SOPInstanceUID)
        self.pseudo = {uid: f"{PSEUDO}{i}" for i, uid in enumerate(originals)}
        self.relink = {v: k for k, v in self.pseudo.items()}.__getitem__
        self.spacing = PixelSpacing.from_dicom(self.ds.PixelSpacing)

    def image_of(self, sop_uid: str, frame: int) -> KeyImage | None:
        if sop_uid != self.pseudo[self.ds.SOPInstanceUID]:
            return None  # an instance this node does not hold
        return KeyImage(self.pseudo[self.ds.SeriesInstanceUID], self.ds.SOPClassUID, sop_uid, None)

    def annotations(self) -> list[Annotation]:
        sop = self.pseudo[self.ds.SOPInstanceUID]
        roi = ellipse_roi_stats(
            self.ds.pixel_array,
            (32, 30),
            10,
            6,
            self.spacing,
            slope=float(self.ds.RescaleSlope),
            intercept=float(self.ds.RescaleIntercept),
        )

        def note(
            n: int,
            kind: AnnotationKind,
            points: tuple[tuple[float, float], ...],
            text: str,
            values: dict[str, float],
        ) -> Annotation:
            return Annotation(f"a{n}", kind, sop, 0, points, "X", float(n), text, values)

        return [
            note(1, AnnotationKind.LENGTH, ((10, 10), (50, 40)), "lesion",
                 {"length_mm": length_mm((10, 10), (50, 40), self.spacing)}),
            note(2, AnnotationKind.ANGLE, ((20, 20), (40, 20), (20, 45)), "",
                 {"angle_deg": angle_degrees((20, 20), (40, 20), (20, 45), self.spacing)}),
            note(3, AnnotationKind.ELLIPSE, ((32, 30), (10, 6)), "cyst", roi.to_wire()),
            note(4, AnnotationKind.ARROW, ((5, 5), (28, 31)), "midline shift?", {}),
            note(5, AnnotationKind.POINT, ((40, 41),), "calcification", {}),
            # Drawn on an instance this node does not hold: left out, never mis-filed.
            Annotation("a6", AnnotationKind.POINT, "2.25.1.2", 0, ((1, 1),), "X", 6.0, "elsewhere"),
        ]  # fmt: skip

    def report(self, text: str = "Hypodense lesion in the left lobe.") -> Report:
        measurements, marks = report_items(self.annotations(), self.image_of)
        key = self.image_of(self.pseudo[self.ds.SOPInstanceUID], 0)
        assert key is not None
        return Report(
            consult_id=CONSULT,
            study_uid=self.pseudo[self.ds.StudyInstanceUID],
            author=CONSULTANT.node_id,
            author_name="Martin^Claire^^Dr",
            text=text,
            impression="Likely cyst; follow-up in 6 months.",
            measurements=measurements,
            key_images=(key,),
            finalised_at=AT,
            marks=marks,
            author_institution="Neuro Consult Ltd",
        )


def signed_and_back(report: Report) -> Report:
    back = verify_report(report.sign(CONSULTANT), consult_id=report.consult_id)
    assert back == report  # shapes, groups, marks and the institution survive the wire
    return back


def read_back(data: bytes) -> tuple[pydicom.Dataset, hd.sr.MeasurementReport]:
    sr = hd.sr.srread(io.BytesIO(data))
    return sr, hd.sr.MeasurementReport.from_sequence(sr.content)


def test_every_tool_becomes_a_tid1500_group_with_scoord_on_the_annotated_image() -> None:
    case = Case()
    report = signed_and_back(case.report())
    sr, tree = read_back(export_sr(report, relink_uid=case.relink, patient=PATIENT))
    original_sop = case.ds.SOPInstanceUID
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr.StudyInstanceUID == case.ds.StudyInstanceUID  # re-linked, not the pseudonym
    assert str(sr.PatientName) == "Dupont^Marie"

    lines: dict[str, tuple[str, float, str, str, list[list[float]]]] = {}
    for group in tree.get_image_measurement_groups():
        (m,) = group.get_measurements()
        (coords,) = m.referenced_coordinates
        ref = coords.ContentSequence[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == original_sop
        assert ref.ReferencedSOPClassUID == case.ds.SOPClassUID
        lines[str(group.tracking_identifier)] = (
            m.name.meaning, m.value, m.unit.value, coords.graphic_type.value, coords.value.tolist()
        )  # fmt: skip
    length = length_mm((10, 10), (50, 40), case.spacing)
    name, value, unit, graphic, points = lines["lesion"]
    assert (name, unit, graphic) == ("Length", "mm", "POLYLINE")
    assert value == pytest.approx(length)
    assert points == [[10.5, 10.5], [50.5, 40.5]]  # pixel centre = +0.5 in SCOORD
    name, value, unit, graphic, points = lines["angle"]
    assert (name, unit, graphic) == ("Angle", "deg", "POLYLINE")
    assert value == pytest.approx(90.0)
    assert points[1] == [20.5, 20.5]  # the vertex in the middle of the polyline

    regions = {}
    for roi_group in tree.get_planar_roi_measurement_groups():
        roi = roi_group.roi
        assert roi is not None
        assert roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
            original_sop
        )
        regions[roi_group.tracking_identifier] = (
            roi.graphic_type.value,
            roi.value.tolist(),
            {m.name.meaning: (m.value, m.unit.value) for m in roi_group.get_measurements()},
        )
    shape, points, stats = regions["cyst"]
    assert shape == "ELLIPSE"
    assert points == [[22.5, 30.5], [42.5, 30.5], [32.5, 24.5], [32.5, 36.5]]  # major then minor
    assert set(stats) == {"Area", "Mean", "Standard Deviation", "Minimum", "Maximum"}
    assert stats["Area"][1] == "mm2"
    assert stats["Mean"][1] == stats["Standard Deviation"][1] == "[hnsf'U]"
    roi_values = {m.quantity: m.value for m in report.measurements if m.group == "a3"}
    assert stats["Mean"][0] == pytest.approx(roi_values["mean"])
    assert regions["midline shift?"][:2] == ("POINT", [[28.5, 31.5]])  # the arrow's head
    assert regions["calcification"][:3] == ("POINT", [[40.5, 41.5]], {})
    assert "elsewhere" not in regions

    observer = tree.get_observer_contexts()[0].observer_identifying_attributes
    assert isinstance(observer, hd.sr.PersonObserverIdentifyingAttributes)
    assert observer.name == "Martin^Claire^^Dr"
    assert observer.login_name == str(CONSULTANT.node_id)
    assert not any(PSEUDO in str(v.value) for v in sr.iterall() if v.VR == "UI")


def test_a_signed_report_is_verified_by_its_signer_at_signing_time() -> None:
    case = Case()
    sr, _ = read_back(export_sr(case.report(), relink_uid=case.relink, patient=PATIENT))
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == (
        "COMPLETE",
        "VERIFIED",
        "FINAL",
    )
    verifier = sr.VerifyingObserverSequence[0]
    assert verifier.VerifyingObserverName == "Martin^Claire^^Dr"
    assert verifier.VerifyingOrganization == "Neuro Consult Ltd"
    assert verifier.VerificationDateTime == "20270115080000+0000"  # AT, not export time


def items(sequence: pydicom.Sequence) -> list[pydicom.Dataset]:
    found = []
    for item in sequence:
        found.append(item)
        if "ContentSequence" in item:
            found.extend(items(item.ContentSequence))
    return found


def text_only(report: Report) -> Report:
    return dataclasses.replace(report, measurements=(), marks=(), key_images=())


def test_text_sections_are_honest_and_a_text_only_report_is_still_tid1500() -> None:
    case = Case()
    report = text_only(case.report(text=""))
    sr, tree = read_back(export_sr(report, relink_uid=case.relink, patient=PATIENT))
    values = {
        i.ConceptNameCodeSequence[0].CodeMeaning: i.TextValue
        for i in items(sr.ContentSequence)
        if "TextValue" in i
    }
    assert values["Impression"] == "Likely cyst; follow-up in 6 months."
    assert "Finding" not in values  # no findings written: no findings section
    assert not any("no findings" in str(v).lower() for v in values.values())
    assert tree.get_image_measurement_groups() == []
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert "CurrentRequestedProcedureEvidenceSequence" not in sr


def test_key_images_are_filed_as_a_key_object_selection() -> None:
    case = Case()
    report = case.report()
    kos = pydicom.dcmread(io.BytesIO(_kos(report, case)))
    assert kos.SOPClassUID == KeyObjectSelectionDocumentStorage
    assert kos.StudyInstanceUID == case.ds.StudyInstanceUID
    assert kos.ConceptNameCodeSequence[0].CodeValue == "113000"  # Of Interest
    images = [i for i in kos.ContentSequence if i.ValueType == "IMAGE"]
    assert [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in images] == [
        case.ds.SOPInstanceUID
    ]
    without = dataclasses.replace(report, key_images=())
    assert export_key_images(without, relink_uid=case.relink, patient=PATIENT) is None


def _kos(report: Report, case: Case) -> bytes:
    data = export_key_images(report, relink_uid=case.relink, patient=PATIENT)
    assert data is not None
    return data


def test_reports_signed_in_the_old_wire_format_still_decode() -> None:
    old_body = {
        "consult": CONSULT,
        "study": "2.25.1",
        "author": CONSULTANT.node_id.digest,
        "name": "Dr Old",
        "text": "",
        "impression": "Normal.",
        "measurements": [{"q": "length", "v": "9.0", "u": "mm", "label": "x", "img": None}],
        "key_images": [],
        "at": AT,
    }
    wire = SignedEnvelope.create(CONSULTANT, "consult-report", old_body).to_wire()
    report = verify_report(wire, consult_id=CONSULT)
    assert report.measurements == (Measurement("length", 9.0, Unit.MM, "x"),)
    assert (report.marks, report.author_institution) == ((), "")
    # ...and a report without the new parts signs exactly the old keys (old nodes read it).
    assert set(report.to_body()) == set(old_body)
    assert report.to_body()["measurements"] == old_body["measurements"]
    envelope = SignedEnvelope.from_wire(report.sign(CONSULTANT))
    assert canonical.decode(envelope.payload) == old_body
    # A value without an image still goes in as a measurement.
    _, tree = read_back(export_sr(report, relink_uid=lambda uid: uid, patient=PATIENT))
    (group,) = tree.get_image_measurement_groups()
    assert group.get_measurements()[0].value == 9.0


def _run(tool: str, package: str, *args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} missing: install the Debian package {package}")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=30, check=False)


def test_dsrdump_reads_a_verified_tid1500_report(tmp_path: Path) -> None:
    case = Case()
    path = tmp_path / "sr.dcm"
    path.write_bytes(export_sr(case.report(), relink_uid=case.relink, patient=PATIENT))
    result = _run("dsrdump", "dcmtk", "+Pt", "+Pl", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # dcmtk warns about SR structure problems here
    assert "TID 1500 (DCMR)" in result.stdout
    assert "Verification Flag   : VERIFIED" in result.stdout
    assert "Martin^Claire^^Dr, Neuro Consult Ltd" in result.stdout
    assert "SCOORD" in result.stdout
    assert "(ELLIPSE," in result.stdout
    assert '"Impression")="Likely cyst; follow-up in 6 months."' in result.stdout


@pytest.mark.parametrize("what", ["sr", "sr-text-only", "kos"])
def test_dciodvfy_finds_no_errors(tmp_path: Path, what: str) -> None:
    case = Case()
    report = case.report()
    if what == "sr-text-only":
        report = text_only(report)
    data = (
        _kos(report, case)
        if what == "kos"
        else export_sr(report, relink_uid=case.relink, patient=PATIENT)
    )
    path = tmp_path / f"{what}.dcm"
    path.write_bytes(data)
    result = _run("dciodvfy", "dicom3tools", str(path))
    out = result.stdout + result.stderr
    assert "Error" not in out, out
    assert ("KeyObjectSelectionDocument" if what == "kos" else "ComprehensiveSR") in out


def test_a_multi_frame_annotation_references_its_frame_in_scoord_and_kos() -> None:
    case = Case()

    def multi_frame(sop_uid: str, frame: int) -> KeyImage | None:
        found = case.image_of(sop_uid, frame)
        return None if found is None else dataclasses.replace(found, frame=frame + 1)

    sop = case.pseudo[case.ds.SOPInstanceUID]
    on_frame_4 = Annotation(
        "m1", AnnotationKind.ELLIPSE, sop, 3, ((20, 20), (4, 4)), "X", 1.0, "roi",
        {"area_mm2": 30.0, "mean": 10.0},
    )  # fmt: skip
    measurements, _ = report_items([on_frame_4], multi_frame)
    assert {m.image.frame for m in measurements if m.image} == {4}
    key = measurements[0].image
    assert key is not None
    report = dataclasses.replace(
        case.report(), measurements=measurements, marks=(), key_images=(key,)
    )
    _, tree = read_back(export_sr(report, relink_uid=case.relink, patient=PATIENT))
    (group,) = tree.get_planar_roi_measurement_groups()
    assert group.roi is not None
    assert group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedFrameNumber == 4
    kos = pydicom.dcmread(io.BytesIO(_kos(report, case)))
    (image,) = [i for i in kos.ContentSequence if i.ValueType == "IMAGE"]
    assert image.ReferencedSOPSequence[0].ReferencedFrameNumber == 4


@pytest.mark.parametrize(
    "shape",
    [
        {"kind": "ellipse", "pts": ["1.0", "1.0", "0.0", "3.0"]},  # no radius
        {"kind": "length", "pts": ["1.0", "1.0"]},  # one point short
        {"kind": "length", "pts": ["nan", "1.0", "2.0", "2.0"]},
        {"kind": "cube", "pts": []},
        {"kind": "point", "pts": [1, 2]},  # numbers travel as decimal strings
        ["not", "a", "shape"],
    ],
)
def test_a_report_with_a_malformed_outline_is_refused(shape: object) -> None:
    case = Case()
    body = case.report().to_body()
    body["measurements"][0]["shape"] = shape
    wire = SignedEnvelope.create(CONSULTANT, "consult-report", body).to_wire()
    with pytest.raises(BadReport, match="malformed"):
        verify_report(wire, consult_id=CONSULT)


def test_a_degenerate_annotation_is_left_out_and_does_not_stop_the_report() -> None:
    case = Case()
    sop = case.pseudo[case.ds.SOPInstanceUID]
    flat = Annotation(
        "z1", AnnotationKind.ELLIPSE, sop, 0, ((20, 20), (0, 4)), "X", 0.5, "", {"mean": 1.0}
    )
    measurements, marks = report_items([flat, *case.annotations()], case.image_of)
    assert "z1" not in {m.group for m in measurements}
    assert len(marks) == 2  # the rest is all there
    assert {m.group for m in measurements} == {"a1", "a2", "a3"}


def test_text_and_names_in_any_language_survive_in_the_sr_and_kos() -> None:
    case = Case()
    report = dataclasses.replace(
        case.report(text="Hématome sous-dural – 9 mm² “aigu”"), author_name="Müller^Jürgen"
    )
    patient = dataclasses.replace(PATIENT, patient_name="Noël^Zoë")
    sr = pydicom.dcmread(io.BytesIO(export_sr(report, relink_uid=case.relink, patient=patient)))
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    assert str(sr.PatientName) == "Noël^Zoë"
    found = {i.TextValue for i in items(sr.ContentSequence) if "TextValue" in i}
    assert "Hématome sous-dural – 9 mm² “aigu”" in found  # not '?' in place of each letter
    assert sr.VerifyingObserverSequence[0].VerifyingObserverName == "Müller^Jürgen"
    kos = export_key_images(report, relink_uid=case.relink, patient=patient)
    assert kos is not None
    assert str(pydicom.dcmread(io.BytesIO(kos)).PatientName) == "Noël^Zoë"
    plain = pydicom.dcmread(
        io.BytesIO(export_sr(case.report(), relink_uid=case.relink, patient=PATIENT))
    )
    assert "SpecificCharacterSet" not in plain  # ASCII keeps the default every PACS reads


def test_references_the_hospital_cannot_relink_are_left_out_of_the_sr_not_the_sr() -> None:
    case = Case()
    report = case.report()
    stranger = KeyImage("2.25.8", case.ds.SOPClassUID, "2.25.9")
    bad = dataclasses.replace(
        report,
        measurements=(*report.measurements, Measurement("length", 3.0, Unit.MM, "x", stranger)),
        marks=(*report.marks, dataclasses.replace(report.marks[0], image=stranger)),
        key_images=(*report.key_images, stranger),
    )
    with pytest.raises(KeyError):  # the strict re-link: one stranger and no SR at all
        export_sr(bad, relink_uid=case.relink, patient=PATIENT)
    kept, dropped = placeable(bad, lambda uid: uid in case.pseudo.values())
    assert dropped == 3
    assert kept.marks == report.marks
    assert kept.key_images == report.key_images
    assert kept.measurements[-1] == Measurement("length", 3.0, Unit.MM, "x")  # value kept
    _, tree = read_back(export_sr(kept, relink_uid=case.relink, patient=PATIENT))
    assert len(tree.get_planar_roi_measurement_groups()) == 3
    assert placeable(report, lambda uid: True) == (report, 0)


@pytest.mark.parametrize("field", ["series", "class", "sop"])
def test_a_key_image_whose_uid_is_not_a_uid_is_refused(field: str) -> None:
    body = Case().report().to_body()
    body["key_images"][0][field] = "../../etc/passwd"
    wire = SignedEnvelope.create(CONSULTANT, "consult-report", body).to_wire()
    with pytest.raises(BadReport, match="not a DICOM UID"):
        verify_report(wire, consult_id=CONSULT)
