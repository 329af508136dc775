"""Reading DICOM files for the store: what an instance is.

:func:`parse_instance` reads the header of one DICOM Part 10 file (pixel data is
deferred, never loaded), checks that its pixel data is whole (a cut file fails
here, not in a viewer) and returns the attributes the index keeps.
Importing whole folders is :mod:`node.dicom.importer`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import IO

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag
from pydicom.uid import DeflatedExplicitVRLittleEndian

from node.core.errors import NodeError

PIXEL_DATA = 0x7FE00010
ITEM_TAG = 0xFFFEE000
SEQ_DELIM_TAG = 0xFFFEE0DD
UNDEFINED_LENGTH = 0xFFFFFFFF
# More fragments than this is a malformed (or hostile) file, not an image.
MAX_FRAGMENTS = 100_000
DEFER_SIZE = 1024


class InvalidDicom(NodeError):
    """A file or byte string is not a DICOM instance the store can keep."""


@dataclass(frozen=True)
class InstanceInfo:
    """What the index keeps about one instance. Patient fields are PHI."""

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    accession_number: str = ""
    study_date: str = ""
    study_time: str = ""
    study_description: str = ""
    modality: str = ""
    series_description: str = ""
    series_number: int | None = None
    body_part: str = ""
    instance_number: int | None = None
    image_position: tuple[float, ...] | None = None
    image_orientation: tuple[float, ...] | None = None
    pixel_spacing: tuple[float, ...] | None = None
    slice_thickness: float | None = None
    rows: int | None = None
    columns: int | None = None
    frames: int = 1
    encapsulated: bool = False


def text_of(ds: pydicom.Dataset, keyword: str) -> str:
    """The element as one line of text ("" if absent); multiple values joined by ``\\``."""
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def int_of(ds: pydicom.Dataset, keyword: str) -> int | None:
    """The element as an integer; None if absent, empty or not a number."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def floats_of(ds: pydicom.Dataset, keyword: str) -> tuple[float, ...] | None:
    """Every value of the element as floats; None if absent, empty or not numbers."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        items = value if isinstance(value, pydicom.multival.MultiValue | list) else [value]
        return tuple(float(v) for v in items)
    except (TypeError, ValueError):
        return None


def float_of(ds: pydicom.Dataset, keyword: str) -> float | None:
    """The element's first value as a float; None if absent, empty or not a number."""
    values = floats_of(ds, keyword)
    return values[0] if values else None


def _fragments(fp: IO[bytes], start: int, limit: int) -> list[tuple[int, int]]:
    """(offset, length) of every item of encapsulated pixel data, the offset table first."""
    fp.seek(start)
    items: list[tuple[int, int]] = []
    position = start
    while True:
        header = fp.read(8)
        if len(header) < 8:
            raise InvalidDicom("truncated: encapsulated pixel data has no sequence delimiter")
        group, element, length = struct.unpack("<HHI", header)
        tag = (group << 16) | element
        position += 8
        if tag == SEQ_DELIM_TAG:
            return items
        if tag != ITEM_TAG or length == UNDEFINED_LENGTH:
            raise InvalidDicom("unreadable element: malformed encapsulated pixel data item")
        if position + length > limit:
            raise InvalidDicom("truncated: a pixel data fragment runs past the end of the file")
        items.append((position, length))
        if len(items) > MAX_FRAGMENTS:
            raise InvalidDicom("unreadable element: too many pixel data fragments")
        position += length
        fp.seek(position)


def _check_native_length(ds: pydicom.Dataset, length: int, frames: int) -> None:
    rows, columns = int_of(ds, "Rows"), int_of(ds, "Columns")
    bits = int_of(ds, "BitsAllocated")
    samples = int_of(ds, "SamplesPerPixel") or 1
    if not rows or not columns or not bits or bits % 8:
        return  # bit-packed or without geometry: nothing to compare the length with
    frame_size = rows * columns * samples * bits // 8
    if samples == 3 and text_of(ds, "PhotometricInterpretation") == "YBR_FULL_422":
        frame_size = frame_size * 2 // 3  # two chroma samples shared by each pixel pair
    if frame_size * frames > length:
        raise InvalidDicom("truncated: pixel data is shorter than rows x columns x frames")


def _check_pixel_data(ds: pydicom.Dataset, fp: IO[bytes], file_size: int, frames: int) -> bool:
    """Refuse pixel data that a cut or malformed file leaves incomplete, so it fails at
    import and not in a viewer; returns whether the pixel data is encapsulated."""
    raw = ds._dict.get(BaseTag(PIXEL_DATA))  # the raw element keeps the file offset of the value
    if raw is None:
        return False
    start = getattr(raw, "value_tell", None)
    length = getattr(raw, "length", None)
    if start is None or length is None:
        return False
    if ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return False  # offsets point into the inflated stream, not the file
    if length == UNDEFINED_LENGTH:
        if not _fragments(fp, start, file_size):
            raise InvalidDicom("unreadable element: encapsulated pixel data without offset table")
        return True
    if start + length > file_size:
        raise InvalidDicom("truncated: pixel data runs past the end of the file")
    _check_native_length(ds, length, frames)
    return False


def _check_complete(ds: pydicom.Dataset) -> None:
    """Touch every top-level element so a malformed value fails here, not in a viewer."""
    for tag in list(ds.keys()):
        if tag == PIXEL_DATA:
            continue
        try:
            ds[tag].value  # noqa: B018 - conversion is the check
        except Exception as exc:
            raise InvalidDicom(f"unreadable element {tag}: {type(exc).__name__}") from exc


def _why_not_part10(fp: IO[bytes]) -> str:
    """Tell a raw dataset without Part 10 header from something that is not DICOM."""
    fp.seek(0)
    try:
        ds = pydicom.dcmread(fp, force=True, stop_before_pixels=True)
        looks_dicom = bool(ds.get("SOPInstanceUID") or ds.get("SOPClassUID"))
    except Exception:
        looks_dicom = False
    if looks_dicom:
        return "missing meta: a DICOM data set without the Part 10 preamble and file meta"
    return "not DICOM: no DICM preamble or file meta"


def parse_instance(fp: IO[bytes], file_size: int) -> InstanceInfo:
    """Parse one DICOM Part 10 instance from a seekable binary file.

    Raises :class:`InvalidDicom` with a one-line reason a person can act on.
    """
    fp.seek(0)
    try:
        ds = pydicom.dcmread(fp, defer_size=DEFER_SIZE)
    except InvalidDicomError as exc:
        raise InvalidDicom(_why_not_part10(fp)) from exc
    except (EOFError, struct.error) as exc:
        raise InvalidDicom("truncated: the file ends in the middle of an element") from exc
    except Exception as exc:
        raise InvalidDicom(f"unreadable element: {type(exc).__name__}: {exc}"[:200]) from exc
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        raise InvalidDicom("missing meta: no file meta information with a transfer syntax")
    _check_complete(ds)
    sop_uid = text_of(ds, "SOPInstanceUID") or text_of(meta, "MediaStorageSOPInstanceUID")
    sop_class = text_of(ds, "SOPClassUID") or text_of(meta, "MediaStorageSOPClassUID")
    study_uid, series_uid = text_of(ds, "StudyInstanceUID"), text_of(ds, "SeriesInstanceUID")
    if sop_class == "1.2.840.10008.1.3.10":
        raise InvalidDicom("not an instance: this is a DICOMDIR (import its folder instead)")
    missing = [
        name
        for name, value in (
            ("SOPInstanceUID", sop_uid),
            ("SOPClassUID", sop_class),
            ("StudyInstanceUID", study_uid),
            ("SeriesInstanceUID", series_uid),
        )
        if not value
    ]
    if missing:
        raise InvalidDicom(f"missing attribute(s): {', '.join(missing)}")
    frames = max(1, int_of(ds, "NumberOfFrames") or 1)
    encapsulated = _check_pixel_data(ds, fp, file_size, frames)
    return InstanceInfo(
        sop_instance_uid=sop_uid,
        sop_class_uid=sop_class,
        study_uid=study_uid,
        series_uid=series_uid,
        transfer_syntax=str(meta.TransferSyntaxUID),
        patient_id=text_of(ds, "PatientID"),
        patient_name=text_of(ds, "PatientName"),
        patient_birth_date=text_of(ds, "PatientBirthDate"),
        patient_sex=text_of(ds, "PatientSex"),
        accession_number=text_of(ds, "AccessionNumber"),
        study_date=text_of(ds, "StudyDate"),
        study_time=text_of(ds, "StudyTime"),
        study_description=text_of(ds, "StudyDescription"),
        modality=text_of(ds, "Modality"),
        series_description=text_of(ds, "SeriesDescription"),
        series_number=int_of(ds, "SeriesNumber"),
        body_part=text_of(ds, "BodyPartExamined"),
        instance_number=int_of(ds, "InstanceNumber"),
        image_position=floats_of(ds, "ImagePositionPatient"),
        image_orientation=floats_of(ds, "ImageOrientationPatient"),
        pixel_spacing=floats_of(ds, "PixelSpacing"),
        slice_thickness=float_of(ds, "SliceThickness"),
        rows=int_of(ds, "Rows"),
        columns=int_of(ds, "Columns"),
        frames=frames,
        encapsulated=encapsulated,
    )
