"""Signed consult reports, peer reviews, and their export as DICOM SR.

The consultant finalises a :class:`Report` (text, impression, selected
measurements, key images) and signs it with the node key (envelope type
``consult-report``). The requesting node verifies it (signature, signer is the
named author, right consult), re-links it to the real patient through its
pseudonym map, and exports a Comprehensive SR that files under the original
study in the PACS. A second reader may score it with a signed :class:`PeerReview`.

Canonical encoding has no floats (their bytes are ambiguous), so measurement
values travel as decimal strings.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.coding import Code

from consult.errors import BadReport, LocalConsultError, MalformedMessage
from consult.requests import check_consult_id, check_uid
from crypto.envelope import SignedEnvelope
from crypto.errors import CryptoError
from crypto.identity import Identity, NodeId

REPORT_TYPE = "consult-report"
REVIEW_TYPE = "consult-review"
MAX_REPORT_WIRE = 512 * 1024
MAX_TEXT_CHARS = 100_000
MAX_ITEMS = 200


class Unit(StrEnum):
    MM = "mm"
    DEGREE = "deg"
    MM2 = "mm2"
    HU = "[hnsf'U]"


_UNIT_MEANING = {
    Unit.MM: "millimeter",
    Unit.DEGREE: "degree",
    Unit.MM2: "square millimeter",
    Unit.HU: "Hounsfield unit",
}
# What each measurement is, as SNOMED CT concepts (as in DICOM CID 7469/7464).
QUANTITIES = {
    "length": Code("410668003", "SCT", "Length"),
    "angle": Code("1483009", "SCT", "Angle"),
    "area": Code("42798000", "SCT", "Area"),
    "mean": Code("373098007", "SCT", "Mean"),
    "sd": Code("386136009", "SCT", "Standard Deviation"),
    "min": Code("255605001", "SCT", "Minimum"),
    "max": Code("56851009", "SCT", "Maximum"),
}


@dataclass(frozen=True)
class KeyImage:
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    frame: int | None = None

    def to_body(self) -> dict[str, Any]:
        return {
            "series": self.series_uid,
            "class": self.sop_class_uid,
            "sop": self.sop_instance_uid,
            "frame": self.frame,
        }

    @classmethod
    def from_body(cls, raw: Any) -> KeyImage:
        frame = raw["frame"]
        if frame is not None and not isinstance(frame, int):
            raise TypeError("frame")
        return cls(_s(raw["series"]), _s(raw["class"]), _s(raw["sop"]), frame)


@dataclass(frozen=True)
class Measurement:
    quantity: str  # a key of QUANTITIES
    value: float
    unit: Unit
    label: str
    image: KeyImage | None = None

    def __post_init__(self) -> None:
        if self.quantity not in QUANTITIES:
            raise LocalConsultError(
                f"unknown measurement {self.quantity!r}; use one of {', '.join(QUANTITIES)}"
            )

    def to_body(self) -> dict[str, Any]:
        return {
            "q": self.quantity,
            "v": repr(float(self.value)),
            "u": self.unit.value,
            "label": self.label,
            "img": self.image.to_body() if self.image else None,
        }

    @classmethod
    def from_body(cls, raw: Any) -> Measurement:
        image = raw["img"]
        return cls(
            _s(raw["q"]),
            float(_s(raw["v"])),
            Unit(raw["u"]),
            _s(raw["label"]),
            KeyImage.from_body(image) if image is not None else None,
        )


def _s(value: Any, limit: int = 1000) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise TypeError("expected a short text")
    return value


@dataclass(frozen=True)
class Report:
    consult_id: str
    study_uid: str  # as shared (pseudonymised when the study was de-identified)
    author: NodeId
    author_name: str
    text: str
    impression: str
    measurements: tuple[Measurement, ...]
    key_images: tuple[KeyImage, ...]
    finalised_at: int
    # A finding that needs action now (an acute subdural needing surgery): delivered first,
    # alerts the hospital, and must be acknowledged by a named person.
    critical: bool = False

    def __post_init__(self) -> None:
        if len(self.text) + len(self.impression) > MAX_TEXT_CHARS:
            raise LocalConsultError(f"the report is limited to {MAX_TEXT_CHARS} characters")
        if len(self.measurements) + len(self.key_images) > MAX_ITEMS:
            raise LocalConsultError(f"select at most {MAX_ITEMS} measurements and key images")
        if not self.impression.strip():
            raise LocalConsultError("a report needs an impression: write the conclusion")

    def to_body(self) -> dict[str, Any]:
        return {
            "consult": self.consult_id,
            "study": self.study_uid,
            "author": self.author.digest,
            "name": self.author_name,
            "text": self.text,
            "impression": self.impression,
            "measurements": [m.to_body() for m in self.measurements],
            "key_images": [k.to_body() for k in self.key_images],
            "at": self.finalised_at,
        } | ({"critical": True} if self.critical else {})  # old reports' bytes unchanged

    @classmethod
    def from_body(cls, raw: Any) -> Report:
        try:
            author = raw["author"]
            at = raw["at"]
            if not isinstance(author, bytes) or not isinstance(at, int):
                raise TypeError("author/at")
            critical = raw.get("critical", False)  # absent from reports made before it
            if not isinstance(critical, bool):
                raise TypeError("critical")
            return cls(
                check_consult_id(raw["consult"], "consult report"),
                check_uid(raw["study"], "consult report study UID"),
                NodeId(author),
                _s(raw["name"], 200),
                _s(raw["text"], MAX_TEXT_CHARS),
                _s(raw["impression"], MAX_TEXT_CHARS),
                tuple(Measurement.from_body(m) for m in raw["measurements"]),
                tuple(KeyImage.from_body(k) for k in raw["key_images"]),
                at,
                critical,
            )
        except (
            KeyError,
            TypeError,
            ValueError,
            LocalConsultError,
            CryptoError,
            MalformedMessage,
        ) as exc:
            raise BadReport(f"consult report is malformed: {exc}") from exc

    def sign(self, consultant: Identity) -> bytes:
        if consultant.node_id != self.author:
            raise LocalConsultError("a report can only be signed by its author's node key")
        return SignedEnvelope.create(consultant, REPORT_TYPE, self.to_body()).to_wire()


def _open(data: bytes, type_: str) -> tuple[NodeId, Any]:
    if len(data) > MAX_REPORT_WIRE:
        raise BadReport(f"{type_} is {len(data)} bytes, limit is {MAX_REPORT_WIRE}")
    try:
        envelope = SignedEnvelope.from_wire(data, MAX_REPORT_WIRE)
        return envelope.signer_id, envelope.verify(type_)
    except CryptoError as exc:
        raise BadReport(
            f"{type_} does not verify ({exc}): do not file it; ask for it again"
        ) from exc


def verify_report(data: bytes, *, consult_id: str, consultant: NodeId | None = None) -> Report:
    """Verify a signed report on arrival: signature, author = signer, the expected consult."""
    signer, body = _open(data, REPORT_TYPE)
    report = Report.from_body(body)
    if signer != report.author:
        raise BadReport("report is signed by a node other than its named author")
    if consultant is not None and signer != consultant:
        raise BadReport(
            f"report for {consult_id} comes from {signer.short()}, "
            f"but the case was accepted by {consultant.short()}"
        )
    if report.consult_id != consult_id:
        raise BadReport(f"report is for consult {report.consult_id}, not {consult_id}")
    return report


# --- peer review ---------------------------------------------------------------------------


class Score(StrEnum):
    AGREE = "agree"
    MINOR = "minor_discrepancy"
    MAJOR = "major_discrepancy"


@dataclass(frozen=True)
class PeerReview:
    """A second reader's score of a report, bound to the exact signed report bytes."""

    consult_id: str
    report_sha256: bytes
    reviewer: NodeId
    score: Score
    comment: str
    at: int

    @staticmethod
    def digest(report_wire: bytes) -> bytes:
        return hashlib.sha256(report_wire).digest()

    def to_body(self) -> dict[str, Any]:
        return {
            "consult": self.consult_id,
            "report": self.report_sha256,
            "reviewer": self.reviewer.digest,
            "score": self.score.value,
            "comment": self.comment,
            "at": self.at,
        }

    def sign(self, reviewer: Identity) -> bytes:
        if reviewer.node_id != self.reviewer:
            raise LocalConsultError("a review can only be signed by the reviewer's node key")
        return SignedEnvelope.create(reviewer, REVIEW_TYPE, self.to_body()).to_wire()


def verify_review(data: bytes, *, report_wire: bytes) -> PeerReview:
    """Verify a review and that it scores exactly ``report_wire``."""
    signer, raw = _open(data, REVIEW_TYPE)
    try:
        review = PeerReview(
            check_consult_id(raw["consult"], "peer review"),
            raw["report"],
            NodeId(raw["reviewer"]),
            Score(raw["score"]),
            _s(raw["comment"], MAX_TEXT_CHARS),
            raw["at"],
        )
        if not isinstance(review.report_sha256, bytes) or not isinstance(review.at, int):
            raise TypeError("report digest/at")
    except (KeyError, TypeError, ValueError, CryptoError, MalformedMessage) as exc:
        raise BadReport(f"peer review is malformed: {exc}") from exc
    if signer != review.reviewer:
        raise BadReport("peer review is signed by a node other than its named reviewer")
    if review.report_sha256 != PeerReview.digest(report_wire):
        raise BadReport("peer review scores a different version of the report")
    return review


# --- DICOM SR --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatientStudy:
    """The real patient and study, from the node's own records (never from the consultant)."""

    patient_name: str
    patient_id: str
    patient_birth_date: str = ""  # YYYYMMDD
    patient_sex: str = ""  # M, F, O or empty
    accession_number: str = ""
    study_id: str = ""
    study_date: str = ""
    study_time: str = ""
    referring_physician: str = ""


def _code(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)


def _unit(unit: Unit) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(unit.value, "UCUM", _UNIT_MEANING[unit])


_REPORT_TITLE = Code("18748-4", "LN", "Diagnostic imaging report")
_FINDING = Code("121071", "DCM", "Finding")
_IMPRESSION = Code("121073", "DCM", "Impression")
_KEY_IMAGES = Code("121180", "DCM", "Key Images")
_GROUP = Code("125007", "DCM", "Measurement Group")
_TRACKING = Code("112039", "DCM", "Tracking Identifier")
_SOURCE = Code("121112", "DCM", "Source of Measurement")
_OBSERVER = Code("121008", "DCM", "Person Observer Name")
_OBSERVER_ID = Code("NODE-ID", "99RADMESH", "radmesh node id")


def _image_item(image: KeyImage, relink_uid: Callable[[str], str], name: Code) -> Any:
    return hd.sr.ImageContentItem(
        name=_code(name),
        referenced_sop_class_uid=image.sop_class_uid,
        referenced_sop_instance_uid=relink_uid(image.sop_instance_uid),
        referenced_frame_numbers=image.frame,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )


def _study_level(report: Report, relink_uid: Callable[[str], str], who: PatientStudy) -> Dataset:
    """Study-level attributes the SR inherits: the real patient, the original study."""
    ds = Dataset()
    ds.PatientName = who.patient_name
    ds.PatientID = who.patient_id
    ds.PatientBirthDate = who.patient_birth_date
    ds.PatientSex = who.patient_sex
    ds.StudyInstanceUID = relink_uid(report.study_uid)
    ds.AccessionNumber = who.accession_number
    ds.StudyID = who.study_id
    ds.StudyDate = who.study_date
    ds.StudyTime = who.study_time
    ds.ReferringPhysicianName = who.referring_physician
    return ds


def _evidence(
    report: Report, relink_uid: Callable[[str], str], who: PatientStudy
) -> tuple[list[Dataset], bool]:
    """One dataset per referenced image (re-linked); (evidence, whether any image is referenced)."""
    images = {k.sop_instance_uid: k for k in report.key_images}
    images.update({m.image.sop_instance_uid: m.image for m in report.measurements if m.image})
    evidence = []
    for image in images.values():
        ds = _study_level(report, relink_uid, who)
        ds.SeriesInstanceUID = relink_uid(image.series_uid)
        ds.SOPClassUID = image.sop_class_uid
        ds.SOPInstanceUID = relink_uid(image.sop_instance_uid)
        evidence.append(ds)
    if evidence:
        return evidence, True
    # highdicom copies patient and study from an evidence instance; a report
    # without images still needs one, and its evidence sequence is removed after.
    placeholder = _study_level(report, relink_uid, who)
    placeholder.SeriesInstanceUID = hd.UID()
    placeholder.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    placeholder.SOPInstanceUID = hd.UID()
    return [placeholder], False


def _person_name(display: str) -> str:
    """A display name as a DICOM PN: a name without '^' is a single component, said so."""
    return display if "^" in display else display + "^"


def export_sr(
    report: Report,
    *,
    relink_uid: Callable[[str], str],
    patient: PatientStudy,
    series_number: int = 9901,
    manufacturer: str = "radmesh",
    institution: str = "",
) -> bytes:
    """A Comprehensive SR (Part 10 bytes) filed under the real study, for the PACS.

    ``relink_uid`` maps the pseudonymised UIDs the consultant saw back to the
    originals (the node's pseudonym map; the identity for studies shared as-is).
    """
    content = hd.sr.ContainerContentItem(name=_code(_REPORT_TITLE), template_id=None)
    items: list[Any] = [
        hd.sr.PnameContentItem(
            name=_code(_OBSERVER),
            value=_person_name(report.author_name or str(report.author.short())),
            relationship_type=hd.sr.RelationshipTypeValues.HAS_OBS_CONTEXT,
        ),
        hd.sr.TextContentItem(
            name=_code(_OBSERVER_ID),
            value=str(report.author),
            relationship_type=hd.sr.RelationshipTypeValues.HAS_OBS_CONTEXT,
        ),
        hd.sr.TextContentItem(
            name=_code(_FINDING),
            value=report.text or "(no findings text)",
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        ),
        hd.sr.TextContentItem(
            name=_code(_IMPRESSION),
            value=report.impression,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        ),
    ]
    for measurement in report.measurements:
        group = hd.sr.ContainerContentItem(
            name=_code(_GROUP), relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
        children: list[Any] = [
            hd.sr.TextContentItem(
                name=_code(_TRACKING),
                value=measurement.label or measurement.quantity,
                relationship_type=hd.sr.RelationshipTypeValues.HAS_OBS_CONTEXT,
            ),
            hd.sr.NumContentItem(
                name=_code(QUANTITIES[measurement.quantity]),
                value=measurement.value,
                unit=_unit(measurement.unit),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            ),
        ]
        if measurement.image is not None:
            children.append(_image_item(measurement.image, relink_uid, _SOURCE))
        group.ContentSequence = DicomSequence(children)
        items.append(group)
    items.extend(_image_item(k, relink_uid, _KEY_IMAGES) for k in report.key_images)
    content.ContentSequence = DicomSequence(items)

    evidence, has_images = _evidence(report, relink_uid, patient)
    stamp = dt.datetime.fromtimestamp(report.finalised_at, tz=dt.UTC)
    sr = hd.sr.ComprehensiveSR(
        evidence=evidence,
        content=content,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        institution_name=institution or None,
        is_complete=True,
        is_final=True,
        record_evidence=False,
        series_description="radmesh consult report",
        content_date=stamp.date(),
        content_time=stamp.time().replace(tzinfo=None),
    )
    if not has_images:
        del sr.CurrentRequestedProcedureEvidenceSequence
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, sr, enforce_file_format=True)
    return buffer.getvalue()
