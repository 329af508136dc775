"""De-identification for sharing: DICOM PS3.15 Annex E Basic Profile with named options.

The attribute table (which tags get D, Z, X, U and the combined actions) comes
from ``dicom-anonymizer`` (KitwareMedical), which ships Table E.1-1 per DICOM
edition (we use 2026c). We apply it ourselves because the share needs what no
library gives: pseudonyms that are consistent within a share and a map back.
dicognito was rejected: it does not follow the Annex E table (it fakes names,
addresses and dates, keeps private tags) and keeps no reverse map.

Actions: X delete; Z empty; D dummy (patient ID/name get the share's pseudonym);
U new UID, the same original UID always giving the same new UID within a share,
so Study/Series/Frame of Reference/SOP UIDs and references inside sequences stay
consistent. Combined actions take the non-deleting choice (X/Z -> Z, X/D -> D,
X/Z/D -> Z, X/Z/U* -> U) so Type 1/2 attributes stay present. Every private
attribute is removed. Sequences are walked to any depth.

Default options for teleradiology (``DEFAULT_OPTIONS``):
* Retain Longitudinal Temporal Information with Modified Dates (113107): all
  dates shift by one per-patient offset, so priors and intervals still read
  right; times are kept.
* Retain Patient Characteristics (113108): sex, age, size, weight... matter for
  the reading.
Off by default, for a site to turn on knowingly: Clean Descriptors (113105)
keeps study/series/protocol/procedure descriptions with the patient's names
and IDs and every token holding four digits or more (dates, record numbers,
phone numbers) removed -- token scrubbing misses what it does not know, so by
default those attributes get the profile's action (removed or emptied). Narrative
free text (comments, patient history, reasons, diagnoses) is never kept.
Retain Device Identity (113109) and Retain Institution Identity (113112).

Beyond the table, so that what the table misses does not leak:
* the File Meta Information is rebuilt from scratch (version, media storage SOP
  class and instance UID, transfer syntax, our implementation class UID and
  version name): Source AE title, Private Information and anything else a sender
  put there never leave; the 128-byte preamble is zeroed;
* overlay planes (groups 60xx) are removed whole, not only their data and comments;
* every free-text, person-name and AE title element the table does not name
  (VR LT, ST, UT, UC, PN, AE) is emptied, and an element of unknown VR (UN) is
  removed.

Burned-in annotation (:func:`burned_in_reason`): an instance with
BurnedInAnnotation = YES, or without the flag in a modality or SOP class that
commonly burns text into pixels (US, SC, XA, ES, OT, secondary capture), is
refused (:class:`BurnedInAnnotationError`) unless the share says a person
checked the pixels, or the share blacks out a band at the top of such images
(Clean Pixel Data, 113101, claimed only for the instances it changed: ultrasound
machines write name, id and date there; ``black_out_top`` rows). Other pixel
data is never changed.

The pseudonym map stays on the node, encrypted with a caller's 32-byte key
(secretbox), so a report that comes back with pseudonymous UIDs is re-linked.

Why one module: The profile's table, its options and the handling of every value
representation are one procedure, applied in one pass over a data set.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import io
import re
import secrets
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import msgpack
import nacl.exceptions
import nacl.secret
import pydicom
from dicomanonymizer.dicomfields_selector import (  # type: ignore[import-untyped]
    dicom_anonymization_database_selector,
)
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID

from node.core.errors import NodeError
from node.core.private import write_private

ANNEX_E_EDITION = "dicomfields_2026c"
MAP_MAX_BYTES = 64 * 1024 * 1024


class DeidError(NodeError):
    """De-identification could not be done safely."""


class BurnedInAnnotationError(DeidError):
    """The image says it has burned-in text; we do not share it."""


class PseudonymMapError(DeidError):
    """The pseudonym map is damaged or the key is wrong."""


class Option(enum.Enum):
    """Annex E options, valued by their CID 7050 code."""

    CLEAN_PIXEL_DATA = ("113101", "Clean Pixel Data Option")
    CLEAN_DESCRIPTORS = ("113105", "Clean Descriptors Option")
    RETAIN_LONGITUDINAL_MODIFIED_DATES = (
        "113107",
        "Retain Longitudinal Temporal Information Modified Dates Option",
    )
    RETAIN_PATIENT_CHARACTERISTICS = ("113108", "Retain Patient Characteristics Option")
    RETAIN_DEVICE_IDENTITY = ("113109", "Retain Device Identity Option")
    RETAIN_INSTITUTION_IDENTITY = ("113112", "Retain Institution Identity Option")


BASIC_PROFILE = ("113100", "Basic Application Confidentiality Profile")
DEFAULT_OPTIONS = frozenset(
    {
        Option.RETAIN_LONGITUDINAL_MODIFIED_DATES,
        Option.RETAIN_PATIENT_CHARACTERISTICS,
    }
)
# Our File Meta identity: a 2.25 UID from a fixed name (PS3.5 B.2), and a version name.
IMPLEMENTATION_CLASS_UID = "2.25." + str(
    int.from_bytes(hashlib.sha256(b"radmesh implementation").digest()[:16], "big")
)
IMPLEMENTATION_VERSION_NAME = "RADMESH_0_1"
# Element VRs that hold free text, names or AE titles: emptied unless the table or an
# option decides otherwise.
_FREE_TEXT_VRS = frozenset({"LT", "ST", "UT", "UC", "PN", "AE"})
# Not in Table E.1-1 but never shared: the encrypted originals of modified attributes.
_ALSO_REMOVED = frozenset({0x04000500, 0xFFFCFFFC})
# Modalities and SOP classes that commonly carry text burned into the pixels.
BURNED_IN_MODALITIES = frozenset({"US", "SC", "XA", "ES", "OT"})
BURNED_IN_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
        "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit SC
        "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
        "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
        "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
        "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image
        "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image
        "1.2.840.10008.5.1.4.1.1.12.1",  # X-Ray Angiographic Image
        "1.2.840.10008.5.1.4.1.1.77.1.1.1",  # Video Endoscopic Image
        "1.2.840.10008.5.1.4.1.1.77.1.4.1",  # Video Photographic Image
    }
)

_RETAINED: dict[Option, frozenset[str]] = {
    Option.RETAIN_PATIENT_CHARACTERISTICS: frozenset(
        {
            "PatientSex",
            "PatientAge",
            "PatientSize",
            "PatientWeight",
            "EthnicGroup",
            "SmokingStatus",
            "PregnancyStatus",
            "PatientSexNeutered",
            "PatientSpeciesDescription",
            "PatientBreedDescription",
            "SpecialNeeds",
            "PatientState",
            "Allergies",
        }
    ),
    Option.RETAIN_DEVICE_IDENTITY: frozenset(
        {
            "DeviceSerialNumber",
            "StationName",
            "DeviceLabel",
            "DeviceDescription",
            "DetectorID",
            "GantryID",
            "CassetteID",
            "PlateID",
            "GeneratorID",
            "SourceSerialNumber",
            "XRayDetectorID",
        }
    ),
    Option.RETAIN_INSTITUTION_IDENTITY: frozenset(
        {"InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName"}
    ),
}
_DESCRIPTORS = frozenset(
    {
        "StudyDescription",
        "SeriesDescription",
        "ProtocolName",
        "PerformedProcedureStepDescription",
        "RequestedProcedureDescription",
        "ScheduledProcedureStepDescription",
        "AcquisitionDeviceProcessingDescription",
        "ContrastBolusAgent",
        "BodyPartExamined",
    }
)


def _load_table() -> tuple[dict[int, str], list[tuple[int, int, str]]]:
    """Table E.1-1 as {tag: action} plus masked repeating-group entries."""
    categories = {
        "D_TAGS": "D",
        "Z_TAGS": "Z",
        "X_TAGS": "X",
        "U_TAGS": "U",
        "Z_D_TAGS": "Z",
        "X_Z_TAGS": "Z",
        "X_D_TAGS": "D",
        "X_Z_D_TAGS": "Z",
        "X_Z_U_STAR_TAGS": "U",
    }
    database = dicom_anonymization_database_selector(ANNEX_E_EDITION)
    exact: dict[int, str] = {}
    masked: list[tuple[int, int, str]] = []
    for category, action in categories.items():
        for entry in database[category]:
            if len(entry) == 2:
                exact[(entry[0] << 16) | entry[1]] = action
            else:
                group, element, group_mask, element_mask = entry
                mask = (group_mask << 16) | element_mask
                masked.append((mask, ((group << 16) | element) & mask, action))
    return exact, masked


_EXACT, _MASKED = _load_table()


def profile_action(tag: int) -> str | None:
    """The Basic Profile action (X, Z, D or U) for a tag, None if the profile keeps it."""
    action = _EXACT.get(tag)
    if action is not None:
        return action
    for mask, value, masked_action in _MASKED:
        if tag & mask == value:
            return masked_action
    return None


# -- pseudonym map -----------------------------------------------------------


@dataclass
class PseudonymMap:
    """Original <-> pseudonym for patients and UIDs within one share; kept encrypted."""

    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    uids: dict[str, str] = field(default_factory=dict)
    patients: dict[str, tuple[str, str]] = field(default_factory=dict)  # orig id -> (id, name)
    original_names: dict[str, str] = field(default_factory=dict)  # orig id -> orig name
    date_offsets: dict[str, int] = field(default_factory=dict)  # orig id -> days
    # A person confirmed the pixels of this share's burned-in candidates were checked.
    burned_in_checked: bool = False
    black_out_top: int = 0  # rows blacked out at the top of burned-in candidates
    # Keys the patient pseudonym and date shift when set (node.dicom.pseudonyms: one key per
    # hospital-consultant pair, so a follow-up groups with the earlier case); else ``secret``.
    patient_key: bytes | None = None

    def _mac(self, kind: str, value: str) -> bytes:
        return hmac.new(self.secret, f"{kind}\x00{value}".encode(), hashlib.sha256).digest()

    def _patient_mac(self, kind: str, value: str) -> bytes:
        key = self.patient_key if self.patient_key is not None else self.secret
        return hmac.new(key, f"{kind}\x00{value}".encode(), hashlib.sha256).digest()

    def pseudo_uid(self, original: str) -> str:
        known = self.uids.get(original)
        if known is None:
            # 2.25: UID derived from a 128-bit number (PS3.5 B.2); keyed, so not reversible.
            known = "2.25." + str(int.from_bytes(self._mac("uid", original)[:16], "big"))
            self.uids[original] = known
        return known

    def pseudo_patient(self, patient_id: str, patient_name: str) -> tuple[str, str]:
        known = self.patients.get(patient_id)
        if known is None:
            tag = self._patient_mac("patient", patient_id).hex()[:12].upper()
            known = (f"RM-{tag}", f"ANON^{tag}")
            self.patients[patient_id] = known
            self.original_names[patient_id] = patient_name
        return known

    def date_offset(self, patient_id: str) -> int:
        known = self.date_offsets.get(patient_id)
        if known is None:
            # A whole number of days back, 1 to 3 years: weekday patterns blur, intervals hold.
            known = -(365 + int.from_bytes(self._patient_mac("date", patient_id)[:4], "big") % 730)
            self.date_offsets[patient_id] = known
        return known

    def relink_uid(self, pseudo_uid: str) -> str:
        for original, pseudo in self.uids.items():
            if pseudo == pseudo_uid:
                return original
        raise PseudonymMapError(f"UID {pseudo_uid} was not issued in this share")

    def to_bytes(self, key: bytes) -> bytes:
        plain = msgpack.packb(
            {
                "v": 1,
                "secret": self.secret,
                "uids": self.uids,
                "patients": {k: list(v) for k, v in self.patients.items()},
                "names": self.original_names,
                "dates": self.date_offsets,
                "burned_in": self.burned_in_checked,
                "black_out": self.black_out_top,
                "patient_key": self.patient_key,
            }
        )
        return bytes(nacl.secret.SecretBox(key).encrypt(plain))

    @classmethod
    def from_bytes(cls, data: bytes, key: bytes) -> PseudonymMap:
        if len(data) > MAP_MAX_BYTES:
            raise PseudonymMapError("pseudonym map file is larger than any map we write")
        try:
            raw = msgpack.unpackb(nacl.secret.SecretBox(key).decrypt(data), strict_map_key=True)
            return cls(
                secret=bytes(raw["secret"]),
                uids=dict(raw["uids"]),
                patients={k: (v[0], v[1]) for k, v in raw["patients"].items()},
                original_names=dict(raw["names"]),
                date_offsets=dict(raw["dates"]),
                burned_in_checked=raw.get("burned_in") is True,
                black_out_top=int(raw.get("black_out", 0)),
                patient_key=_optional_key(raw.get("patient_key")),
            )
        except nacl.exceptions.CryptoError as exc:
            raise PseudonymMapError(
                "cannot decrypt the pseudonym map: wrong key or damaged file"
            ) from exc
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise PseudonymMapError(f"pseudonym map is malformed: {exc}") from exc

    def persist(self, path: Path, key: bytes) -> None:
        """Write atomically (temp file, fsync, rename), mode 0600."""
        path.parent.mkdir(parents=True, exist_ok=True)
        write_private(path, self.to_bytes(key))

    @classmethod
    def load(cls, path: Path, key: bytes) -> PseudonymMap:
        return cls.from_bytes(path.read_bytes(), key)


def _optional_key(raw: object) -> bytes | None:
    if raw is None:
        return None
    if not isinstance(raw, bytes) or len(raw) != 32:
        raise ValueError("patient key is not 32 bytes")
    return raw


def burned_in_reason(ds: Dataset) -> str | None:
    """Why this instance may have text burned into its pixels, or None.

    BurnedInAnnotation YES says so; NO is believed; a missing or empty flag counts
    as YES where text in the pixels is common (screen captures, ultrasound,
    angiography, endoscopy, "other").
    """
    flag = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if flag == "YES":
        return "BurnedInAnnotation is YES"
    if flag == "NO":
        return None
    modality = str(ds.get("Modality", "") or "").strip().upper()
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if modality in BURNED_IN_MODALITIES:
        return f"modality {modality} without a BurnedInAnnotation flag"
    if sop_class in BURNED_IN_SOP_CLASSES:
        return "a screen capture, ultrasound or video SOP class without a BurnedInAnnotation flag"
    if "ConversionType" in ds:
        return "a converted image (screen capture) without a BurnedInAnnotation flag"
    return None


class BurnedInPolicy(enum.Enum):
    REFUSE = "refuse"
    ALLOW = "allow"  # the sender has checked the pixels


@dataclass
class ShareContext:
    """Everything that must stay the same across the instances of one share."""

    pseudonyms: PseudonymMap = field(default_factory=PseudonymMap)
    options: frozenset[Option] = DEFAULT_OPTIONS
    burned_in: BurnedInPolicy = BurnedInPolicy.REFUSE
    # Clean Pixel Data: the top rows of every frame of an image that may have burned-in
    # text are set to black (ultrasound machines write name, id and date there).
    black_out_top: int = 0


# -- the transformation ------------------------------------------------------


@dataclass
class _Patient:
    original_id: str
    pseudo_id: str
    pseudo_name: str
    date_offset: int
    identifying_tokens: frozenset[str]


def deidentify(data: bytes, share: ShareContext) -> bytes:
    """Apply the Basic Profile and the share's options to one Part-10 instance."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except (pydicom.errors.InvalidDicomError, ValueError, EOFError) as exc:
        raise DeidError(f"cannot de-identify: not readable DICOM ({exc})") from exc
    reason = burned_in_reason(ds)
    options = share.options
    if reason is not None and share.black_out_top > 0:
        _black_out_top(ds, share.black_out_top)
        options = options | {Option.CLEAN_PIXEL_DATA}
    elif reason is not None and share.burned_in is BurnedInPolicy.REFUSE:
        raise BurnedInAnnotationError(
            f"instance {ds.get('SOPInstanceUID', '?')} may have text burned into its pixels "
            f"({reason}) that can identify the patient; it was not shared. Check the pixels, "
            "then share again confirming they were checked (--burned-in-checked), or leave "
            "the instance out"
        )
    if ds.file_meta.get("TransferSyntaxUID") is None:
        raise DeidError("cannot de-identify: the file has no transfer syntax in its meta")
    patient = _patient(ds, share)
    ds.remove_private_tags()
    _clean(ds, share, patient)
    _mark(ds, options)
    ds.file_meta = _fresh_file_meta(ds, ds.file_meta.TransferSyntaxUID)
    ds.preamble = bytes(128)  # a preamble can carry anything (TIFF headers, text)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _black_out_top(ds: Dataset, rows: int) -> None:
    """Clean Pixel Data: set the top ``rows`` rows of every frame to black. A compressed
    image is decompressed first (and leaves uncompressed) when a decoder is installed."""
    sop = ds.get("SOPInstanceUID", "?")
    if "PixelData" not in ds:
        return
    try:
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress()
        pixels = ds.pixel_array.copy()
    except (NotImplementedError, RuntimeError, ValueError, AttributeError) as exc:
        raise DeidError(
            f"instance {sop}: its pixels cannot be decoded here to black out burned-in text "
            f"({exc}); check them and share with --burned-in-checked, or leave it out"
        ) from exc
    photometric = str(ds.PhotometricInterpretation)
    bits, signed = int(ds.BitsStored), bool(ds.get("PixelRepresentation", 0))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    band = (slice(None), slice(0, rows)) if frames > 1 else (slice(0, rows),)
    if photometric == "MONOCHROME1":  # the highest value is black
        pixels[band] = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
    elif photometric.startswith("YBR"):  # black: no luma, neutral chroma
        pixels[(*band, Ellipsis, 0)] = 0
        pixels[(*band, Ellipsis, slice(1, 3))] = 1 << (bits - 1)
    else:
        pixels[band] = -(1 << (bits - 1)) if signed else 0
    ds.set_pixel_data(pixels, photometric, int(ds.BitsStored))


def _fresh_file_meta(ds: Dataset, transfer_syntax: str) -> FileMetaDataset:
    """Only what Part 10 requires, nothing carried over from the sender's file meta."""
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def _patient(ds: Dataset, share: ShareContext) -> _Patient:
    original_id = str(ds.get("PatientID", "") or "")
    original_name = str(ds.get("PatientName", "") or "")
    pseudo_id, pseudo_name = share.pseudonyms.pseudo_patient(original_id, original_name)
    tokens = {original_id, *re.split(r"[\^\s,]+", original_name)}
    for keyword in (
        "OtherPatientIDs",
        "AccessionNumber",
        "PatientBirthName",
        "PatientMotherBirthName",
    ):
        tokens.update(re.split(r"[\^\s,\\]+", str(ds.get(keyword, "") or "")))
    return _Patient(
        original_id,
        pseudo_id,
        pseudo_name,
        share.pseudonyms.date_offset(original_id),
        frozenset(t for t in tokens if len(t) >= 2),
    )


def _clean(ds: Dataset, share: ShareContext, patient: _Patient) -> None:
    for elem in list(ds):
        action = _action_for(elem, share.options)
        if action == "X":
            del ds[elem.tag]
            continue
        if elem.VR == "SQ":
            if action == "Z":
                elem.value = Sequence()
                continue
            for item in elem.value:
                _clean(item, share, patient)
            continue
        if action == "K":
            continue
        if action == "C":
            elem.value = _scrub(elem, patient)
        elif action == "U":
            elem.value = _map_uids(elem, share.pseudonyms)
        elif action == "Z":
            elem.value = _pseudonym(elem, patient) or _empty(elem)
        elif action == "D":
            elem.value = _pseudonym(elem, patient) or _dummy(elem, share.options, patient)
        elif action == "SHIFT":
            elem.value = _shift(elem, patient.date_offset)


def _action_for(elem: DataElement, options: frozenset[Option]) -> str | None:
    keyword = elem.keyword
    for option, keywords in _RETAINED.items():
        if option in options and keyword in keywords:
            return "K"
    if Option.CLEAN_DESCRIPTORS in options and keyword in _DESCRIPTORS:
        return "C"
    tag = int(elem.tag)
    if tag in _ALSO_REMOVED or (0x6000 <= tag >> 16 <= 0x601E and not (tag >> 16) & 1):
        return "X"  # whole overlay planes: labels, descriptions and bitmaps can name people
    action = profile_action(tag)
    if action is None and elem.VR == "UI" and keyword.endswith("InstanceUID"):
        action = "U"  # any instance UID the table predates
    if action is None and elem.VR in _FREE_TEXT_VRS:
        action = "Z"  # free text, a name or an AE title the table does not name
    if action is None and elem.VR == "UN":
        return "X"  # unknown content
    if (
        Option.RETAIN_LONGITUDINAL_MODIFIED_DATES in options
        and elem.VR in ("DA", "DT")
        and keyword != "PatientBirthDate"
        and action in (None, "D", "Z")
    ):
        return "SHIFT"
    return action


def _pseudonym(elem: DataElement, patient: _Patient) -> str | None:
    if elem.keyword == "PatientID":
        return patient.pseudo_id
    if elem.keyword == "PatientName":
        return patient.pseudo_name
    return None


def _map_uids(elem: DataElement, pseudonyms: PseudonymMap) -> Any:
    if elem.VM > 1:
        return [pseudonyms.pseudo_uid(str(v)) for v in elem.value]
    return pseudonyms.pseudo_uid(str(elem.value)) if elem.value else elem.value


def _empty(elem: DataElement) -> Any:
    return None if elem.VR not in ("OB", "OW", "OF", "OD", "OL", "OV", "UN") else b""


_DUMMY_BY_VR: dict[str, Any] = {
    "DA": "19000101",
    "DT": "19000101000000",
    "TM": "000000",
    "AS": "000Y",
    "DS": "0",
    "IS": "0",
    "FL": 0.0,
    "FD": 0.0,
    "SL": 0,
    "SS": 0,
    "UL": 0,
    "US": 0,
    "SV": 0,
    "UV": 0,
    "AT": 0,
    "PN": "ANONYMIZED",
    "UI": "2.25.0",
}


def _dummy(elem: DataElement, options: frozenset[Option], patient: _Patient) -> Any:
    if elem.VR in ("DA", "DT") and Option.RETAIN_LONGITUDINAL_MODIFIED_DATES in options:
        return _shift(elem, patient.date_offset)
    if elem.VR in _DUMMY_BY_VR:
        return _DUMMY_BY_VR[elem.VR]
    if elem.VR in ("OB", "OW", "OF", "OD", "OL", "OV", "UN"):
        return b""
    return "ANONYMIZED"


def _shift_one(text: str, days: int) -> str:
    if len(text) < 8 or not text[:8].isdigit():
        return "19000101" + text[8:]
    try:
        moved = date(int(text[:4]), int(text[4:6]), int(text[6:8])) + timedelta(days=days)
    except ValueError:
        return "19000101" + text[8:]
    return moved.strftime("%Y%m%d") + text[8:]


def _shift(elem: DataElement, days: int) -> Any:
    if not elem.value:
        return elem.value
    if elem.VM > 1:
        return [_shift_one(str(v), days) for v in elem.value]
    return _shift_one(str(elem.value), days)


_NUMBERS = re.compile(r"\S*(?:\d\D?){4,}\S*")  # dates, record and phone numbers


def _scrub(elem: DataElement, patient: _Patient) -> Any:
    """Clean Descriptors: the patient's names and IDs and every token with four digits
    or more removed. Used only when the site turned the option on."""
    if not isinstance(elem.value, str) or not elem.value:
        return elem.value
    text = elem.value
    for token in sorted(patient.identifying_tokens, key=len, reverse=True):
        text = re.sub(re.escape(token), "", text, flags=re.IGNORECASE)
    text = _NUMBERS.sub("", text)
    return re.sub(r"\s{2,}", " ", text).strip()


def _code_item(code: tuple[str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code[0], "DCM", code[1]
    return item


def _mark(ds: Dataset, options: frozenset[Option]) -> None:
    codes = [BASIC_PROFILE, *sorted(option.value for option in options)]
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "PS3.15 E Basic Profile " + " ".join(c for c, _ in codes[1:])
    ds.DeidentificationMethodCodeSequence = Sequence([_code_item(code) for code in codes])
    ds.LongitudinalTemporalInformationModified = (
        "MODIFIED" if Option.RETAIN_LONGITUDINAL_MODIFIED_DATES in options else "REMOVED"
    )
