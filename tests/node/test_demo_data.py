"""The demo generator writes studies a viewer and a de-identifier can work with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from node.demo.phantom import (
    HAEMATOMA,
    HEAD_FOV_MM,
    VERTEX_Z,
    collection_span,
    generate_cr,
    generate_ct,
    generate_demo_study,
    generate_mr,
    head_hu,
)


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> list[pydicom.Dataset]:
    paths = generate_ct(tmp_path_factory.mktemp("ct"), slices=30, rows=256, seed=5)
    return [pydicom.dcmread(p) for p in paths]


def _hu(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def test_ct_geometry_steps_along_z_in_one_series(ct: list[pydicom.Dataset]) -> None:
    z = [float(ds.ImagePositionPatient[2]) for ds in ct]
    steps = np.diff(z)
    assert np.allclose(steps, steps[0], atol=1e-6)
    assert steps[0] > 0
    assert float(ct[0].SliceThickness) == pytest.approx(steps[0], abs=1e-3)
    assert {ds.SeriesInstanceUID for ds in ct} == {ct[0].SeriesInstanceUID}
    assert len({ds.SOPInstanceUID for ds in ct}) == len(ct)
    assert [int(ds.InstanceNumber) for ds in ct] == list(range(1, 31))
    assert list(map(float, ct[0].ImageOrientationPatient)) == [1, 0, 0, 0, 1, 0]
    assert ct[0].file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert (ct[0].Rows, ct[0].Columns, ct[0].BitsAllocated) == (256, 256, 16)


def test_ct_has_hu_like_anatomy_with_noise(ct: list[pydicom.Dataset]) -> None:
    middle = _hu(ct[15])
    assert middle.min() < -950  # air
    assert (middle > 800).mean() > 0.01  # skull
    centre = middle[128 - 10 : 128 + 10, 60:80]  # brain off the midline ventricles
    assert 15 < np.median(centre) < 50
    assert 3 < centre.std() < 15  # noisy, not flat
    haematoma = (middle > 55) & (middle < 90)
    assert haematoma.sum() > 200  # the subdural crescent is there


def test_patient_and_study_identifiers_are_present_for_deid(ct: list[pydicom.Dataset]) -> None:
    ds = ct[0]
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber"):
        assert str(ds.get(keyword, "")), keyword
    assert {d.StudyInstanceUID for d in ct} == {ds.StudyInstanceUID}


def test_mr_and_cr_are_valid_images(tmp_path: Path) -> None:
    mr = pydicom.dcmread(generate_mr(tmp_path / "mr", slices=3, rows=64)[1])
    assert mr.Modality == "MR"
    image = mr.pixel_array
    assert image.shape == (64, 64)
    assert image.max() > 1000  # bright CSF on T2
    cr = pydicom.dcmread(generate_cr(tmp_path / "cr", rows=256))
    assert cr.Modality == "CR"
    assert cr.pixel_array.shape == (256, 213)


def test_demo_study_shares_one_patient_across_studies(tmp_path: Path) -> None:
    out = generate_demo_study(tmp_path, ct_slices=3, ct_rows=32, mr_slices=2, cr_rows=64)
    files = [pydicom.dcmread(p) for p in sorted(out.rglob("*.dcm"))]
    assert len(files) == 6
    assert len({ds.PatientID for ds in files}) == 1
    assert len({ds.StudyInstanceUID for ds in files}) == 2
    assert {ds.Modality for ds in files} == {"CT", "MR", "CR"}


def test_same_seed_gives_the_same_pixels(tmp_path: Path) -> None:
    a = generate_ct(tmp_path / "a", slices=2, rows=32, seed=9)
    b = generate_ct(tmp_path / "b", slices=2, rows=32, seed=9)
    assert pydicom.dcmread(a[1]).PixelData == pydicom.dcmread(b[1]).PixelData


def test_dcmtk_accepts_the_generated_files(tmp_path: Path) -> None:
    import shutil
    import subprocess

    if shutil.which("dcmftest") is None or shutil.which("dcmdump") is None:
        pytest.skip("dcmtk not installed (Debian package dcmtk)")
    out = generate_demo_study(tmp_path, ct_slices=2, ct_rows=32, mr_slices=1, cr_rows=64)
    files = [str(p) for p in sorted(out.rglob("*.dcm"))]
    checked = subprocess.run(["dcmftest", *files], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout
    assert checked.stdout.count("yes:") == len(files)
    dumped = subprocess.run(
        ["dcmdump", "-q", "+L", str(out / "ct" / "CT0001.dcm")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert dumped.returncode == 0, dumped.stderr
    intercept = next(line for line in dumped.stdout.splitlines() if "RescaleIntercept" in line)
    assert float(intercept.split("[")[1].split("]")[0]) == -1024  # as dcmtk reads it


def test_ct_headers_are_those_of_a_head_ct(ct: list[pydicom.Dataset]) -> None:
    ds = ct[15]
    assert (ds.Modality, ds.BodyPartExamined, ds.PatientPosition) == ("CT", "HEAD", "HFS")
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept), ds.RescaleType) == (1, -1024, "HU")
    assert [float(v) for v in ds.WindowCenter] == [40, 600]  # brain first, then bone
    assert [float(v) for v in ds.WindowWidth] == [80, 2800]
    assert float(ds.PixelSpacing[0]) * ds.Rows == pytest.approx(HEAD_FOV_MM, abs=0.01)
    assert float(ds.SliceLocation) == pytest.approx(float(ds.ImagePositionPatient[2]))
    corner = -(ds.Rows - 1) / 2 * float(ds.PixelSpacing[0])  # the image is centred on the head
    assert float(ds.ImagePositionPatient[0]) == pytest.approx(corner, abs=1e-3)
    assert _hu(ds)[0, 0] == -1024  # padding outside the reconstruction circle


def _around(hu: np.ndarray, rows: int, x_mm: float, y_mm: float, r_mm: float = 2.0) -> float:
    """Median HU in a small disc around patient coordinates (x left, y posterior)."""
    spacing = HEAD_FOV_MM / rows
    yy, xx = np.mgrid[0:rows, 0:rows]
    cx, cy = (rows - 1) / 2 + x_mm / spacing, (rows - 1) / 2 + y_mm / spacing
    return float(np.median(hu[(xx - cx) ** 2 + (yy - cy) ** 2 <= (r_mm / spacing) ** 2]))


def test_the_head_has_its_tissues_where_anatomy_puts_them() -> None:
    rows = 512
    body = head_hu(rows, 20.0, noise=0.0, collection=None)  # level of the ventricle bodies
    assert _around(body, rows, 0.0, -107.0) == -1000  # air in front of the face
    ray = body[rows // 2, rows // 2 :]  # from the centre to the patient's left
    assert ray.max() >= 1500  # cortical bone of the skull
    assert ((ray > -200) & (ray < 100)).sum() > 0  # the scalp outside it
    assert 0 <= _around(body, rows, 5.5, -5.0, 1.0) <= 10  # lateral ventricle: CSF
    white = _around(body, rows, 30.0, 0.0)
    assert 24 <= white <= 30
    cortex = body[np.abs(body - 41.0) < 0.5].size  # the grey matter ribbon
    assert cortex > 0.04 * body.size
    assert np.median(body[np.abs(body - 41.0) < 0.5]) - white >= 10  # grey/white contrast
    low = head_hu(rows, -45.0, noise=0.0, collection=None)  # orbits and skull base
    assert 5 <= _around(low, rows, 31.0, -74.0) <= 20  # a globe's vitreous
    assert _around(low, rows, 0.0, -26.0) < -900  # the air of the sphenoid sinus
    assert head_hu(rows, VERTEX_Z + 1.0, noise=0.0).max() == -1000  # above the vertex: air


def test_the_haematoma_is_on_the_left_and_pushes_the_midline_right() -> None:
    rows, z = 512, HAEMATOMA.level_z
    sick = head_hu(rows, z, noise=0.0)
    well = head_hu(rows, z, noise=0.0, collection=None)
    blood = sick == HAEMATOMA.hu
    columns = np.nonzero(blood)[1]
    assert columns.size > 500
    assert columns.min() > rows // 2  # the patient's left is the image's right
    assert not (well == HAEMATOMA.hu).any()
    span = collection_span(rows, z)
    assert span is not None
    (c0, r0), (c1, r1) = span
    length = np.hypot(c1 - c0, r1 - r0) * HEAD_FOV_MM / rows
    assert length == pytest.approx(HAEMATOMA.thickest_mm, abs=0.1)
    assert sick[round((r0 + r1) / 2), round((c0 + c1) / 2)] == HAEMATOMA.hu
    # Mass effect: the third ventricle (CSF on the midline) sits right of where it was.
    csf_sick = np.nonzero((np.abs(sick - 6.0) < 0.5)[rows // 2 - 20 : rows // 2 + 20])[1]
    csf_well = np.nonzero((np.abs(well - 6.0) < 0.5)[rows // 2 - 20 : rows // 2 + 20])[1]
    shift_px = np.median(csf_sick[np.abs(csf_sick - rows // 2) < 30]) - np.median(
        csf_well[np.abs(csf_well - rows // 2) < 30]
    )
    assert shift_px * HEAD_FOV_MM / rows == pytest.approx(HAEMATOMA.shift_mm(z), abs=1.0)
