"""De-identification: Annex E Basic Profile, consistent pseudonyms, re-linking."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from node.dicom.deid import (
    _EXACT,
    DEFAULT_OPTIONS,
    BurnedInAnnotationError,
    Option,
    PseudonymMap,
    PseudonymMapError,
    ShareContext,
    deidentify,
)
from tests.dcmtk import generated_ct

MARK = "PHIMARK"
_VALUES = {
    "DA": "20010203",
    "DT": "20010203040506",
    "TM": "040506",
    "AS": "042Y",
    "DS": "12.5",
    "IS": "7",
    "US": 7,
    "UL": 7,
    "SS": 7,
    "SL": 7,
    "FL": 1.5,
    "FD": 1.5,
}
_TEXT_VRS = {"LO", "SH", "PN", "ST", "LT", "UT", "CS", "AE", "UC", "UR"}


def _populate(ds: Dataset) -> set[int]:
    """Set every Annex E attribute we can give a value; returns the tags set."""
    placed = set()
    for tag in _EXACT:
        if tag >> 16 in (0, 2):  # command and file meta groups are not data set attributes
            continue
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            continue
        if vr in _TEXT_VRS:
            value: object = f"{MARK}{tag:08X}"[: 16 if vr in ("SH", "AE", "CS") else 64]
            if vr == "CS":
                value = "PHIMARK"
        elif vr == "UI":
            value = f"1.2.3.{tag}"
        elif vr in _VALUES:
            value = _VALUES[vr]
        else:
            continue
        ds.add_new(tag, vr, value)
        placed.add(tag)
    return placed


def _full_instance() -> tuple[bytes, set[int]]:
    base = pydicom.dcmread(io.BytesIO(generated_ct(1)[0]))
    placed = _populate(base)
    nested = Dataset()
    _populate(nested)
    base.SourceImageSequence = Sequence([nested])  # nested copy, inside a sequence
    base.add_new(0x00091010, "LO", f"{MARK}private")
    base.add_new(0x00090010, "LO", "ACME")
    out = io.BytesIO()
    base.save_as(out, enforce_file_format=True)
    return out.getvalue(), placed


def test_no_profile_phi_survives_even_in_sequences() -> None:
    data, placed = _full_instance()
    assert len(placed) > 300
    result = deidentify(data, ShareContext(options=frozenset()))
    assert MARK.encode() not in result
    assert b"20010203" not in result
    out = pydicom.dcmread(io.BytesIO(result))
    for ds in (out, out.SourceImageSequence[0]):
        for tag in placed:
            if tag in ds and tag not in (0x00100010, 0x00100020):
                elem = ds[tag]
                assert (
                    elem.VR in ("UI", "SQ")
                    or not elem.value
                    or elem.value
                    in ("19000101", "19000101000000", "000000", "000Y", "0", 0, 0.0, "ANONYMIZED")
                ), keyword_for_tag(tag)
    assert out.PatientIdentityRemoved == "YES"
    assert [i.CodeValue for i in out.DeidentificationMethodCodeSequence] == ["113100"]
    assert not any(elem.tag.is_private for elem in out.iterall())


def test_default_options_are_coded_and_keep_characteristics() -> None:
    ds = pydicom.dcmread(io.BytesIO(generated_ct(1)[0]))
    ds.PatientSex, ds.PatientAge, ds.StudyDate = "F", "042Y", "20240110"
    ds.StudyDescription = "CT head Test P1"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    out = pydicom.dcmread(io.BytesIO(deidentify(buf.getvalue(), ShareContext())))
    codes = {i.CodeValue for i in out.DeidentificationMethodCodeSequence}
    assert codes == {"113100", "113107", "113108"}
    assert (out.PatientSex, out.PatientAge) == ("F", "042Y")
    assert out.StudyDate != "20240110"
    assert len(out.StudyDate) == 8
    assert "StudyDescription" not in out  # Clean Descriptors is a site's explicit choice
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    clean = ShareContext(options=DEFAULT_OPTIONS | {Option.CLEAN_DESCRIPTORS})
    out = pydicom.dcmread(io.BytesIO(deidentify(buf.getvalue(), clean)))
    assert out.StudyDescription == "CT head"


def test_series_uids_consistent_and_pixels_untouched() -> None:
    share = ShareContext()
    originals = [pydicom.dcmread(io.BytesIO(d)) for d in generated_ct(3)]
    outs = []
    for ds in originals:
        ds.ReferencedImageSequence = Sequence([Dataset()])
        ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID = originals[0].SOPInstanceUID
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        outs.append(pydicom.dcmread(io.BytesIO(deidentify(buf.getvalue(), share))))
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "PatientID"):
        values = {str(o.get(key)) for o in outs}
        assert len(values) == 1, key
        assert values != {str(originals[0].get(key))}, key
    assert len({o.SOPInstanceUID for o in outs}) == 3
    ref = {str(o.ReferencedImageSequence[0].ReferencedSOPInstanceUID) for o in outs}
    assert ref == {str(outs[0].SOPInstanceUID)}
    for o, ds in zip(outs, originals, strict=True):
        assert o.PixelData == ds.PixelData
        assert o.file_meta.MediaStorageSOPInstanceUID == o.SOPInstanceUID


def test_relink_through_persisted_encrypted_map(tmp_path: Path) -> None:
    share = ShareContext()
    data = generated_ct(1)[0]
    original = pydicom.dcmread(io.BytesIO(data))
    out = pydicom.dcmread(io.BytesIO(deidentify(data, share)))
    key = bytes(range(32))
    path = tmp_path / "share.map"
    share.pseudonyms.persist(path, key)
    assert b"Test" not in path.read_bytes()
    loaded = PseudonymMap.load(path, key)
    assert loaded.relink_uid(str(out.StudyInstanceUID)) == original.StudyInstanceUID
    assert loaded.patients == share.pseudonyms.patients
    assert loaded.original_names == share.pseudonyms.original_names
    with pytest.raises(PseudonymMapError, match="wrong key"):
        PseudonymMap.load(path, bytes(32))
    with pytest.raises(PseudonymMapError):
        loaded.relink_uid("2.25.1")


def test_burned_in_annotation_is_refused() -> None:
    ds = pydicom.dcmread(io.BytesIO(generated_ct(1)[0]))
    ds.BurnedInAnnotation = "YES"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(BurnedInAnnotationError):
        deidentify(buf.getvalue(), ShareContext())


def test_retain_device_identity_is_opt_in() -> None:
    ds = pydicom.dcmread(io.BytesIO(generated_ct(1)[0]))
    ds.DeviceSerialNumber = "SN123"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    default = pydicom.dcmread(io.BytesIO(deidentify(buf.getvalue(), ShareContext())))
    assert "DeviceSerialNumber" not in default or default.DeviceSerialNumber != "SN123"
    opts = frozenset({Option.RETAIN_DEVICE_IDENTITY})
    kept = pydicom.dcmread(io.BytesIO(deidentify(buf.getvalue(), ShareContext(options=opts))))
    assert kept.DeviceSerialNumber == "SN123"
