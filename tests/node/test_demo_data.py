"""The demo generator writes studies a viewer and a de-identifier can work with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from node.demo.phantom import generate_cr, generate_ct, generate_demo_study, generate_mr


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
