"""Signed consult reports, peer reviews, and their export as DICOM SR.

The consultant finalises a :class:`Report` (text, impression, selected
measurements, key images) and signs it with the node key (envelope type
``consult-report``). The requesting node verifies it (signature, signer is the
named author, right consult), re-links it to the real patient through its
pseudonym map, and exports a DICOM TID 1500 Measurement Report (Comprehensive
SR, VERIFIED by the signer) that files under the original study in the PACS,
with every measurement as SCOORD on the annotated image, and the key images as
a Key Object Selection. A second reader may score it with a signed
:class:`PeerReview`.

Canonical encoding has no floats (their bytes are ambiguous), so measurement
values and outline points travel as decimal strings.

Wire compatibility: keys added after the first version (``shape``/``group`` on a
measurement, ``marks`` and ``org`` on a report) are written only when set and
read as absent when missing, so reports signed by older nodes still decode and
older nodes ignore what they do not know.

Why one module: The signed report, the peer review and the SR built from them share one
data model; the SR is only correct if it says exactly what was signed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.valuerep import DA, TM

from consult.addenda import Addendum
from consult.errors import BadReport, LocalConsultError, MalformedMessage
from consult.requests import check_consult_id, check_uid
from consult.shared import Annotation, AnnotationKind, point_count
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
    NONE = "1"  # pixel values of a modality without physical units (MR, ...)


_UNIT_MEANING = {
    Unit.MM: "millimeter",
    Unit.DEGREE: "degree",
    Unit.MM2: "square millimeter",
    Unit.HU: "Hounsfield unit",
    Unit.NONE: "no units",
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
    frame: int | None = None  # DICOM frame number (from 1) in a multi-frame instance
    number: int | None = None  # Instance Number, to name the slice to a reader

    def to_body(self) -> dict[str, Any]:
        body = {
            "series": self.series_uid,
            "class": self.sop_class_uid,
            "sop": self.sop_instance_uid,
            "frame": self.frame,
        }
        if self.number is not None:
            body["n"] = self.number
        return body

    @classmethod
    def from_body(cls, raw: Any) -> KeyImage:
        frame, number = raw["frame"], raw.get("n")
        if frame is not None and not isinstance(frame, int):
            raise TypeError("frame")
        if number is not None and not isinstance(number, int):
            raise TypeError("instance number")
        return cls(
            check_uid(raw["series"], "key image series UID"),
            check_uid(raw["class"], "key image SOP class UID"),
            check_uid(raw["sop"], "key image instance UID"),
            frame,
            number,
        )


Point = tuple[float, float]


@dataclass(frozen=True)
class Outline:
    """The annotation a measurement or mark was made with, as drawn in the session.

    Points are radmesh image coordinates (x = column, y = row, pixel centres on
    whole numbers, as :mod:`consult.measure` uses them), in the annotation's order:
    length (a, b), angle (vertex, a, b), ellipse (centre, (radius x, radius y)),
    point (p), arrow (tail, head). :func:`export_sr` turns them into DICOM SCOORD.
    """

    kind: AnnotationKind
    points: tuple[Point, ...]

    def __post_init__(self) -> None:
        if len(self.points) != point_count(self.kind):
            raise LocalConsultError(
                f"a {self.kind.value} outline has {point_count(self.kind)} point(s), "
                f"not {len(self.points)}"
            )
        if not all(math.isfinite(c) for p in self.points for c in p):
            raise LocalConsultError("outline points must be finite numbers")
        if self.kind is AnnotationKind.ELLIPSE and not min(self.points[1]) > 0:
            raise LocalConsultError("an ellipse outline needs positive radii")

    def to_body(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "pts": [repr(float(c)) for p in self.points for c in p],
        }

    @classmethod
    def from_body(cls, raw: Any) -> Outline:
        flat = raw["pts"]
        if not isinstance(flat, list) or len(flat) > 2 * MAX_OUTLINE_POINTS or len(flat) % 2:
            raise TypeError("outline points")
        numbers = [float(_s(c, 40)) for c in flat]
        return cls(
            AnnotationKind(_s(raw["kind"], 20)),
            tuple(zip(numbers[::2], numbers[1::2], strict=True)),
        )


MAX_OUTLINE_POINTS = 3


@dataclass(frozen=True)
class Measurement:
    quantity: str  # a key of QUANTITIES
    value: float
    unit: Unit
    label: str
    image: KeyImage | None = None
    outline: Outline | None = None  # where on ``image`` it was measured
    # Measurements made on one annotation (an ROI's area, mean, SD...) share its group
    # id and become one measurement group in the SR; empty = a group of its own.
    group: str = ""

    def __post_init__(self) -> None:
        if self.quantity not in QUANTITIES:
            raise LocalConsultError(
                f"unknown measurement {self.quantity!r}; use one of {', '.join(QUANTITIES)}"
            )
        if not math.isfinite(self.value):
            raise LocalConsultError(f"measurement {self.quantity!r} is not a finite number")

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "q": self.quantity,
            "v": repr(float(self.value)),
            "u": self.unit.value,
            "label": self.label,
            "img": self.image.to_body() if self.image else None,
        }
        if self.outline is not None:
            body["shape"] = self.outline.to_body()
        if self.group:
            body["group"] = self.group
        return body

    @classmethod
    def from_body(cls, raw: Any) -> Measurement:
        image = raw["img"]
        shape = raw.get("shape")
        return cls(
            _s(raw["q"]),
            float(_s(raw["v"])),
            Unit(raw["u"]),
            _s(raw["label"]),
            KeyImage.from_body(image) if image is not None else None,
            Outline.from_body(shape) if shape is not None else None,
            _s(raw.get("group", ""), 64),
        )


@dataclass(frozen=True)
class Mark:
    """A labelled point or arrow on an image: no value, but a place the report points at."""

    label: str
    image: KeyImage
    outline: Outline

    def __post_init__(self) -> None:
        if self.outline.kind not in (AnnotationKind.POINT, AnnotationKind.ARROW):
            raise LocalConsultError("a mark is a point or an arrow; measure with the other tools")

    def to_body(self) -> dict[str, Any]:
        return {"label": self.label, "img": self.image.to_body(), "shape": self.outline.to_body()}

    @classmethod
    def from_body(cls, raw: Any) -> Mark:
        return cls(
            _s(raw["label"]), KeyImage.from_body(raw["img"]), Outline.from_body(raw["shape"])
        )


def _bounded_list(value: Any) -> list[Any]:
    if not isinstance(value, list) or len(value) > MAX_ITEMS:
        raise TypeError(f"expected a list of at most {MAX_ITEMS} items")
    return value


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
    marks: tuple[Mark, ...] = ()
    author_institution: str = ""  # the signer's organisation, for the SR's verifier

    def __post_init__(self) -> None:
        if len(self.text) + len(self.impression) > MAX_TEXT_CHARS:
            raise LocalConsultError(f"the report is limited to {MAX_TEXT_CHARS} characters")
        if len(self.measurements) + len(self.key_images) + len(self.marks) > MAX_ITEMS:
            raise LocalConsultError(
                f"select at most {MAX_ITEMS} measurements, marks and key images"
            )
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
            **({"marks": [m.to_body() for m in self.marks]} if self.marks else {}),
            **({"org": self.author_institution} if self.author_institution else {}),
            **({"critical": True} if self.critical else {}),  # old reports' bytes unchanged
        }

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
                marks=tuple(Mark.from_body(m) for m in _bounded_list(raw.get("marks", []))),
                author_institution=_s(raw.get("org", ""), 200),
                critical=critical,
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


# --- from the live session ------------------------------------------------------------------

CT_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
        "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
        "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
    }
)
_SIZE_VALUES = {"length_mm": ("length", Unit.MM), "angle_deg": ("angle", Unit.DEGREE)}
_ROI_VALUES = ("area_mm2", "mean", "sd", "min", "max")  # the report order of an ROI's stats
_DEFAULT_LABEL = {
    AnnotationKind.LENGTH: "length",
    AnnotationKind.ANGLE: "angle",
    AnnotationKind.ELLIPSE: "ROI",
    AnnotationKind.POINT: "point",
    AnnotationKind.ARROW: "arrow",
}


def _from_annotation(annotation: Annotation, image: KeyImage) -> list[Measurement | Mark]:
    """What one annotation puts in the report (its values as the viewer computed them)."""
    kind = annotation.kind
    label = annotation.text or _DEFAULT_LABEL[kind]
    outline = Outline(kind, tuple(annotation.points))
    if kind in (AnnotationKind.POINT, AnnotationKind.ARROW):
        return [Mark(label, image, outline)]
    values = annotation.values or {}
    found: list[Measurement | Mark] = []
    if kind is AnnotationKind.ELLIPSE:
        modality_unit = Unit.HU if image.sop_class_uid in CT_CLASSES else Unit.NONE
        for name in _ROI_VALUES:
            if name in values:
                quantity, unit = ("area", Unit.MM2) if name == "area_mm2" else (name, modality_unit)
                found.append(
                    Measurement(
                        quantity, float(values[name]), unit, label, image, outline, annotation.id
                    )
                )
        return found
    for name, (quantity, unit) in _SIZE_VALUES.items():
        if name in values:
            found.append(
                Measurement(
                    quantity, float(values[name]), unit, label, image, outline, annotation.id
                )
            )
    return found


def report_items(
    annotations: Iterable[Annotation],
    image_of: Callable[[str, int], KeyImage | None],
    *,
    room: int = MAX_ITEMS,
) -> tuple[tuple[Measurement, ...], tuple[Mark, ...]]:
    """The measurements and marks of a session's annotations, for the signed report.

    ``image_of(sop_uid, frame)`` names the annotated image (series, SOP class, DICOM
    frame number or None for a single-frame instance) from the node's store, or None
    when the node does not hold it: such an annotation cannot be placed in an SR and is
    left out, as is one whose shape cannot be reported (a participant's degenerate
    annotation must not stop the report). Oldest first; what does not fit in ``room``
    items (whole annotations) is left out.
    """
    measurements: list[Measurement] = []
    marks: list[Mark] = []
    for annotation in sorted(annotations, key=lambda a: (a.at, a.id)):
        image = image_of(annotation.sop_instance_uid, annotation.frame)
        if image is None:
            continue
        try:
            items = _from_annotation(annotation, image)
        except LocalConsultError:
            continue
        if len(measurements) + len(marks) + len(items) > room:
            break
        measurements.extend(i for i in items if isinstance(i, Measurement))
        marks.extend(i for i in items if isinstance(i, Mark))
    return tuple(measurements), tuple(marks)


def placeable(report: Report, known: Callable[[str], bool]) -> tuple[Report, int]:
    """The report without the image references this node cannot re-link (``known(uid)``
    is False for a series or instance UID it never issued), and how many were removed.

    A measurement keeps its value and loses its image and outline; a mark or key image
    goes. So one wrong reference from the consultant costs that reference, not the SR.
    """

    def ok(image: KeyImage | None) -> bool:
        return image is None or (known(image.series_uid) and known(image.sop_instance_uid))

    measurements = tuple(
        m if ok(m.image) else replace(m, image=None, outline=None) for m in report.measurements
    )
    marks = tuple(m for m in report.marks if ok(m.image))
    key_images = tuple(k for k in report.key_images if ok(k))
    dropped = (
        sum(1 for m in report.measurements if not ok(m.image))
        + len(report.marks) - len(marks)
        + len(report.key_images) - len(key_images)
    )  # fmt: skip
    if not dropped:
        return report, 0
    return replace(report, measurements=measurements, marks=marks, key_images=key_images), dropped


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


# CID 7021 (Measurement Report Document Titles).
_REPORT_TITLE = Code("126000", "DCM", "Imaging Measurement Report")
_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")
_QUALITATIVE = Code("C0034375", "UMLS", "Qualitative Evaluations")  # TID 1500 row 12
_FINDING = Code("121071", "DCM", "Finding")
_IMPRESSION = Code("121073", "DCM", "Impression")
_KEY_IMAGES_TITLE = Code("113000", "DCM", "Of Interest")  # CID 7010 (KOS titles)
UTF8 = "ISO_IR 192"
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})
SR_SERIES = 9901  # the report's SR and its addenda: one series, so a PACS shows them together
KOS_SERIES = 9902  # the key images beside it
MANUFACTURER = "radmesh"


def _scoord_points(outline: Outline) -> tuple[hd.sr.GraphicTypeValues, list[Point]]:
    """DICOM SCOORD of an outline: (0, 0) is the top-left corner of the first pixel, so a
    radmesh point (pixel centres on whole numbers) moves by half a pixel."""
    pts = [(x + 0.5, y + 0.5) for x, y in outline.points]
    kind = outline.kind
    if kind is AnnotationKind.ELLIPSE:
        (cx, cy), (rx, ry) = pts[0], outline.points[1]
        across, down = [(cx - rx, cy), (cx + rx, cy)], [(cx, cy - ry), (cx, cy + ry)]
        major, minor = (across, down) if rx >= ry else (down, across)
        return hd.sr.GraphicTypeValues.ELLIPSE, major + minor
    if kind is AnnotationKind.ANGLE:  # arm a, vertex, arm b: the polyline the angle is on
        return hd.sr.GraphicTypeValues.POLYLINE, [pts[1], pts[0], pts[2]]
    if kind is AnnotationKind.ARROW:  # what an arrow points at is its head
        return hd.sr.GraphicTypeValues.POINT, [pts[1]]
    if kind is AnnotationKind.POINT:
        return hd.sr.GraphicTypeValues.POINT, pts
    return hd.sr.GraphicTypeValues.POLYLINE, pts


def _frames(image: KeyImage) -> list[int] | None:
    return [image.frame] if image.frame is not None else None


class _Builder:
    """Turns a report's measurements, marks and key images into highdicom content."""

    def __init__(self, report: Report, relink_uid: Callable[[str], str]) -> None:
        self.report = report
        self.relink = relink_uid

    def _source(self, image: KeyImage, cls: type[Any]) -> Any:
        return cls(
            referenced_sop_class_uid=image.sop_class_uid,
            referenced_sop_instance_uid=self.relink(image.sop_instance_uid),
            referenced_frame_numbers=_frames(image),
        )

    def _tracking(self, key: str, label: str) -> hd.sr.TrackingIdentifier:
        # Stable per report and annotation, so the same SR exported twice tracks the same.
        digest = hashlib.sha256(f"{self.report.consult_id}/{key}".encode()).digest()
        uid = "2.25." + str(int.from_bytes(digest[:16], "big"))
        return hd.sr.TrackingIdentifier(uid=uid, identifier=label or "measurement")

    def _measurement(self, m: Measurement, with_coordinates: bool) -> hd.sr.Measurement:
        coordinates = images = None
        if m.image is not None and m.outline is not None and with_coordinates:
            graphic, points = _scoord_points(m.outline)
            coordinates = [
                hd.sr.CoordinatesForMeasurement(
                    graphic_type=graphic,
                    graphic_data=np.array(points, dtype=np.float64),
                    source_image=self._source(m.image, hd.sr.SourceImageForRegion),
                )
            ]
        elif m.image is not None and with_coordinates:
            images = [self._source(m.image, hd.sr.SourceImageForMeasurement)]
        return hd.sr.Measurement(
            name=_code(QUANTITIES[m.quantity]),
            value=m.value,
            unit=_unit(m.unit),
            referenced_images=images,
            referenced_coordinates=coordinates,
        )

    def _region(self, image: KeyImage, outline: Outline) -> hd.sr.ImageRegion:
        graphic, points = _scoord_points(outline)
        return hd.sr.ImageRegion(
            graphic_type=graphic,
            graphic_data=np.array(points, dtype=np.float64),
            source_image=self._source(image, hd.sr.SourceImageForRegion),
        )

    def groups(self) -> list[Any]:
        """One TID 1410 (an ROI or mark: SCOORD region, its stats) or TID 1501 (lengths,
        angles: SCOORD per measurement) group per annotation, in report order."""
        by_group: dict[str, list[Measurement]] = {}
        for index, m in enumerate(self.report.measurements):
            by_group.setdefault(m.group or f"#{index}", []).append(m)
        found: list[Any] = []
        for key, members in by_group.items():
            first = members[0]
            tracking = self._tracking(key, first.label or first.quantity)
            outline, image = first.outline, first.image
            if outline is not None and image is not None and outline.kind is AnnotationKind.ELLIPSE:
                found.append(
                    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                        tracking_identifier=tracking,
                        referenced_region=self._region(image, outline),
                        measurements=[self._measurement(m, False) for m in members],
                    )
                )
            else:
                found.append(
                    hd.sr.MeasurementsAndQualitativeEvaluations(
                        tracking_identifier=tracking,
                        measurements=[self._measurement(m, True) for m in members],
                    )
                )
        for index, mark in enumerate(self.report.marks):
            found.append(
                hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=self._tracking(f"mark#{index}", mark.label),
                    referenced_region=self._region(mark.image, mark.outline),
                )
            )
        return found

    def texts(self) -> hd.sr.ContainerContentItem | None:
        """Findings and impression as TEXT items; a section without text is left out."""
        items = [
            hd.sr.TextContentItem(name=_code(name), value=value, relationship_type=_CONTAINS)
            for name, value in ((_FINDING, self.report.text), (_IMPRESSION, self.report.impression))
            if value.strip()
        ]
        if not items:
            return None
        container = hd.sr.ContainerContentItem(
            name=_code(_QUALITATIVE), relationship_type=_CONTAINS
        )
        container.ContentSequence = hd.sr.ContentSequence(items)
        return container


_CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS


def _person(report: Report) -> hd.sr.ObserverContext:
    return hd.sr.ObserverContext(
        observer_type=_code(Code("121006", "DCM", "Person")),
        observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
            name=_person_name(report),
            login_name=str(report.author),  # the signing node's id
            organization_name=_organisation(report),
        ),
    )


def _observer(report: Report) -> hd.sr.ObservationContext:
    return hd.sr.ObservationContext(observer_person_context=_person(report))


def _measurement_report(report: Report, builder: _Builder) -> hd.sr.ContentSequence:
    """The TID 1500 content tree: observer, procedure, measurements, findings/impression."""
    groups = builder.groups()
    texts = builder.texts()
    if groups:
        tree: hd.sr.ContentSequence = hd.sr.MeasurementReport(
            observation_context=_observer(report),
            procedure_reported=_code(_PROCEDURE),
            imaging_measurements=groups,
            title=_code(_REPORT_TITLE),
        )
    else:
        # highdicom wants one imaging measurement; TID 1500 wants one of rows 8, 10 and 12:
        # a text-only report is the same header with the Qualitative Evaluations only.
        root = hd.sr.ContainerContentItem(name=_code(_REPORT_TITLE), template_id="1500")
        root.ContentSequence = hd.sr.ContentSequence(
            [
                *hd.sr.LanguageOfContentItemAndDescendants(hd.sr.templates.DEFAULT_LANGUAGE),
                *_observer(report),
                hd.sr.CodeContentItem(
                    name=_code(Code("121058", "DCM", "Procedure reported")),
                    value=_code(_PROCEDURE),
                    relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
                ),
            ]
        )
        tree = hd.sr.ContentSequence([root], is_root=True)
    if texts is not None:
        tree[0].ContentSequence.append(texts)
    return tree


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


def _images(report: Report, *, key_images: bool = True) -> list[KeyImage]:
    found = [m.image for m in report.measurements if m.image] + [m.image for m in report.marks]
    if key_images:
        found += list(report.key_images)
    return list({k.sop_instance_uid: k for k in found}.values())


def _evidence(
    report: Report, relink_uid: Callable[[str], str], who: PatientStudy, images: list[KeyImage]
) -> tuple[list[Dataset], bool]:
    """One dataset per referenced image (re-linked); (evidence, whether any image is referenced)."""
    evidence = []
    for image in images:
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


def _person_name(report: Report) -> str:
    """The author as a DICOM PN: a name without '^' is a single component, said so."""
    display = report.author_name or f"radmesh node {report.author.short()}"
    return display if "^" in display else display + "^"


def _organisation(report: Report) -> str:
    return report.author_institution or f"radmesh node {report.author.short()}"


def _derived_uid(report: Report, what: str) -> str:
    """The same signed report gives the same SR/KOS UIDs: filing it twice replaces, not adds."""
    digest = hashlib.sha256(
        f"{report.consult_id}/{report.author}/{report.finalised_at}/{what}".encode()
    ).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def _part10(ds: Dataset) -> bytes:
    # Names and report text in any language, never '?' in place of each accented letter;
    # plain ASCII keeps the default character set that every PACS reads.
    if not all(str(e.value).isascii() for e in ds.iterall() if e.VR in _TEXT_VRS):
        ds.SpecificCharacterSet = UTF8
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def export_sr(
    report: Report,
    *,
    relink_uid: Callable[[str], str],
    patient: PatientStudy,
    series_number: int = SR_SERIES,
    manufacturer: str = MANUFACTURER,
    institution: str = "",
) -> bytes:
    """A TID 1500 Measurement Report (Comprehensive SR, Part 10 bytes) under the real study.

    ``relink_uid`` maps the pseudonymised UIDs the consultant saw back to the
    originals (the node's pseudonym map; the identity for studies shared as-is).
    Call it only on a report that :func:`verify_report` accepted: the document is
    VERIFIED, with the signer as Verifying Observer at the time it was signed.
    Key images go in a separate Key Object Selection (:func:`export_key_images`).
    """
    content = _measurement_report(report, _Builder(report, relink_uid))
    evidence, has_images = _evidence(report, relink_uid, patient, _images(report, key_images=False))
    sr = _verified_sr(
        report,
        report,
        evidence,
        content,
        ("sr", 1),
        series_number=series_number,
        manufacturer=manufacturer,
        institution=institution,
    )
    if not has_images:
        del sr.CurrentRequestedProcedureEvidenceSequence
    return _part10(sr)


def export_key_images(
    report: Report,
    *,
    relink_uid: Callable[[str], str],
    patient: PatientStudy,
    series_number: int = KOS_SERIES,
    manufacturer: str = MANUFACTURER,
    institution: str = "",
) -> bytes | None:
    """The report's key images as a Key Object Selection ("Of Interest"), or None if none."""
    if not report.key_images:
        return None
    referenced = []
    for image in report.key_images:
        ds = _study_level(report, relink_uid, patient)
        ds.SeriesInstanceUID = relink_uid(image.series_uid)
        ds.SOPClassUID = image.sop_class_uid
        ds.SOPInstanceUID = relink_uid(image.sop_instance_uid)
        # highdicom references an instance as an IMAGE (not COMPOSITE) when it has Rows and
        # Columns; only the UIDs are copied, so their values do not matter.
        ds.Rows = ds.Columns = 0
        referenced.append(ds)
    content = hd.ko.KeyObjectSelection(
        document_title=_code(_KEY_IMAGES_TITLE),
        referenced_objects=referenced,
        observer_person_context=_person(report),
        description="Key images of the consult report",
    )
    frames = {relink_uid(k.sop_instance_uid): k.frame for k in report.key_images}
    for item in content[0].ContentSequence:
        if item.ValueType == "IMAGE":
            ref = item.ReferencedSOPSequence[0]
            if frames.get(ref.ReferencedSOPInstanceUID) is not None:
                ref.ReferencedFrameNumber = frames[ref.ReferencedSOPInstanceUID]
    stamp = dt.datetime.fromtimestamp(report.finalised_at, tz=dt.UTC)
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=referenced,
        content=content,
        series_instance_uid=_derived_uid(report, "kos-series"),
        series_number=series_number,
        sop_instance_uid=_derived_uid(report, "kos"),
        instance_number=1,
        manufacturer=manufacturer,
        institution_name=institution or None,
    )
    kos.ContentDate = DA(stamp.date())
    kos.ContentTime = TM(stamp.time().replace(tzinfo=None))
    return _part10(kos)


def export_addendum_sr(
    report: Report,
    addendum: Addendum,
    *,
    relink_uid: Callable[[str], str],
    patient: PatientStudy,
    series_number: int = SR_SERIES,
    manufacturer: str = MANUFACTURER,
    institution: str = "",
) -> bytes:
    """An addendum as a new Comprehensive SR in the report's SR series, same study: a new
    SOP Instance UID (derived from the report and the addendum's number), its text as the
    impression under an "ADDENDUM n" finding, and the report's SR (:func:`export_sr`)
    named in the Predecessor Documents Sequence, so a PACS shows it as amending that one.
    VERIFIED by the signer at the time the addendum was signed. Call it only on an
    addendum that :func:`consult.addenda.verify_addendum` accepted against ``report``."""
    signed = dt.datetime.fromtimestamp(report.finalised_at, tz=dt.UTC)
    amended = replace(
        report,
        text=f"ADDENDUM {addendum.number} to the report signed {signed:%Y-%m-%d %H:%M} UTC",
        impression=addendum.text,
        measurements=(),
        marks=(),
        key_images=(),
        author_name=addendum.author_name or report.author_name,
        finalised_at=addendum.at,
        critical=False,
    )
    content = _measurement_report(amended, _Builder(amended, relink_uid))
    evidence, _ = _evidence(amended, relink_uid, patient, [])
    sr = _verified_sr(
        report,
        amended,
        evidence,
        content,
        (f"addendum-{addendum.number}", 1 + addendum.number),
        series_number=series_number,
        manufacturer=manufacturer,
        institution=institution,
    )
    del sr.CurrentRequestedProcedureEvidenceSequence
    original = Dataset()
    original.ReferencedSOPClassUID = sr.SOPClassUID
    original.ReferencedSOPInstanceUID = _derived_uid(report, "sr")
    series = Dataset()
    series.SeriesInstanceUID = _derived_uid(report, "sr-series")
    series.ReferencedSOPSequence = [original]
    study = Dataset()
    study.StudyInstanceUID = relink_uid(report.study_uid)
    study.ReferencedSeriesSequence = [series]
    sr.PredecessorDocumentsSequence = [study]
    return _part10(sr)


def _verified_sr(
    report: Report,
    signed: Report,
    evidence: Any,
    content: Any,
    instance: tuple[str, int],
    *,
    series_number: int,
    manufacturer: str,
    institution: str,
) -> Any:
    """The Comprehensive SR of ``signed`` (the report, or an addendum dressed as one) in the
    report's SR series: VERIFIED, its signer the Verifying Observer at signing time.
    ``instance`` is the UID label and instance number within that series."""
    label, number = instance
    stamp = dt.datetime.fromtimestamp(signed.finalised_at, tz=dt.UTC)
    sr = hd.sr.ComprehensiveSR(
        evidence=evidence,
        content=content[0],
        series_instance_uid=_derived_uid(report, "sr-series"),
        series_number=series_number,
        sop_instance_uid=_derived_uid(report, label),
        instance_number=number,
        manufacturer=manufacturer,
        institution_name=institution or None,
        is_complete=True,
        is_final=True,
        is_verified=True,
        verifying_observer_name=_person_name(signed),
        verifying_organization=_organisation(signed),
        record_evidence=False,
        series_description="radmesh consult report",
        content_date=stamp.date(),
        content_time=stamp.time().replace(tzinfo=None),
    )
    sr.VerifyingObserverSequence[0].VerificationDateTime = stamp.strftime("%Y%m%d%H%M%S+0000")
    return sr
