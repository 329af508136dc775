"""Synthetic but realistic DICOM studies for tests, the demo and benchmarks.

Pure numpy + pydicom, vectorised per slice. The CT is a head: air, scalp, a
skull of cortical bone, brain parenchyma with grey/white contrast, lateral
ventricles of CSF and, optionally, a crescent acute subdural haematoma over
the left convexity, with Gaussian noise so it compresses like real CT and
not like a flat phantom. Geometry is consistent (ImagePositionPatient steps
along z, axial orientation, PixelSpacing, SliceThickness), so a viewer can
stack and measure it. Patients are fictitious but look real (name, id, birth
date, accession number, physicians), so de-identification has work to do.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)

_FIRST = ("JANE", "JOHN", "MARIA", "AHMED", "LENA", "KWAME", "SOFIA", "TOMAS", "ANIKA", "RAVI")
_LAST = ("DOE", "MUELLER", "OKONKWO", "SILVA", "NAKAMURA", "KOWALSKI", "HANSEN", "MORENO")

Floats = npt.NDArray[np.float32]


@dataclass(frozen=True)
class DemoPatient:
    name: str
    patient_id: str
    birth_date: str
    sex: str


@dataclass(frozen=True)
class DemoStudy:
    """A patient and study that several generated series can share."""

    patient: DemoPatient
    study_uid: str = field(default_factory=generate_uid)
    accession: str = "ACC000001"
    date: str = "20240315"
    time: str = "031522"
    description: str = "CT HEAD WITHOUT CONTRAST"
    institution: str = "St. Brigid's Rural Hospital"
    referring: str = "MURPHY^SEAN^^DR"


def random_study(seed: int = 0, description: str = "CT HEAD WITHOUT CONTRAST") -> DemoStudy:
    rng = np.random.default_rng(seed)
    sex = str(rng.choice(["F", "M"]))
    birth = dt.date(1940, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 60)))
    patient = DemoPatient(
        name=f"{rng.choice(_LAST)}^{rng.choice(_FIRST)}",
        patient_id=f"RM{int(rng.integers(10**6, 10**7))}",
        birth_date=birth.strftime("%Y%m%d"),
        sex=sex,
    )
    return DemoStudy(
        patient=patient,
        accession=f"ACC{int(rng.integers(10**5, 10**6))}",
        description=description,
    )


def _base(study: DemoStudy, sop_class: str, modality: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientName = study.patient.name
    ds.PatientID = study.patient.patient_id
    ds.PatientBirthDate = study.patient.birth_date
    ds.PatientSex = study.patient.sex
    ds.StudyInstanceUID = study.study_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study.date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = study.time
    ds.AccessionNumber = study.accession
    ds.StudyID = "1"
    ds.StudyDescription = study.description
    ds.ReferringPhysicianName = study.referring
    ds.InstitutionName = study.institution
    ds.Manufacturer = "radmesh demo"
    ds.Modality = modality
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = generate_uid()
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.PixelRepresentation = 0
    return ds


def _write(ds: Dataset, path: Path) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def _head_slice(
    x: Floats, y: Floats, z: float, haematoma: bool, rng: np.random.Generator
) -> Floats | None:
    """HU of one axial slice of the head phantom at height z (mm); None above/below it."""
    half_height = 90.0
    scale = 1.0 - (z / half_height) ** 2
    if scale <= 0.02:
        return None
    s = float(np.sqrt(scale))
    r = np.sqrt((x / (78.0 * s)) ** 2 + (y / (96.0 * s)) ** 2)
    hu = np.full(x.shape, -1000.0, dtype=np.float32)
    thickness = 7.0 / (87.0 * s)
    hu[r < 1.0 + 5.0 / (87.0 * s)] = 40.0  # scalp
    hu[r < 1.0] = 1000.0  # skull
    inner = r < 1.0 - thickness
    brain = np.where(r < 0.75 - thickness, 28.0, 38.0)  # white matter inside grey cortex
    hu[inner] = brain[inner]
    if abs(z) < 35.0:  # lateral ventricles, widest at mid height
        w = float(np.sqrt(1.0 - (z / 35.0) ** 2))
        for side in (-1.0, 1.0):
            vent = ((x - side * 9.0) / (6.0 * w + 0.5)) ** 2 + (y / (24.0 * w + 0.5)) ** 2 < 1.0
            hu[vent & inner] = 5.0
    if haematoma and -20.0 < z < 55.0:
        # Crescent between the inner table and a shifted ellipse; +x is patient left (LPS).
        rr = np.sqrt(((x + 7.0) / (78.0 * s)) ** 2 + (y / (96.0 * s)) ** 2)
        crescent = inner & (rr >= 1.0 - thickness) & (x > 15.0)
        hu[crescent] = 70.0
    hu += rng.normal(0.0, 6.0, x.shape).astype(np.float32)
    return hu


def generate_ct(
    out_dir: Path,
    *,
    slices: int = 200,
    rows: int = 512,
    seed: int = 0,
    study: DemoStudy | None = None,
    haematoma: bool = True,
    slice_spacing: float | None = None,
) -> list[Path]:
    """Write an axial head CT series, one file per slice; returns the paths in z order."""
    if slices < 1 or rows < 16:
        raise ValueError("need at least one slice of at least 16 x 16 pixels")
    out_dir.mkdir(parents=True, exist_ok=True)
    study = study or random_study(seed)
    rng = np.random.default_rng(seed + 1)
    spacing = 230.0 / rows
    # Rounded so the DS strings written for positions keep the spacing exactly uniform.
    step = round(slice_spacing if slice_spacing is not None else max(0.6, 190.0 / slices), 3)
    coords = (np.arange(rows, dtype=np.float32) - (rows - 1) / 2.0) * spacing
    x, y = np.meshgrid(coords, coords)
    top_left = float(coords[0])
    base = _base(study, CT_IMAGE_STORAGE, "CT")
    base.SeriesInstanceUID = generate_uid()
    base.SeriesNumber = 2
    base.SeriesDescription = "AX HEAD 5/5 BRAIN"
    base.BodyPartExamined = "HEAD"
    base.Rows = base.Columns = rows
    base.PixelSpacing = [round(spacing, 6), round(spacing, 6)]
    base.SliceThickness = round(step, 3)
    base.SpacingBetweenSlices = round(step, 3)
    base.ImageOrientationPatient = list(AXIAL)
    base.BitsStored = 12
    base.HighBit = 11
    base.RescaleIntercept = -1024
    base.RescaleSlope = 1
    base.RescaleType = "HU"
    base.WindowCenter = 40
    base.WindowWidth = 80
    base.KVP = 120
    base.ConvolutionKernel = "H30s"
    paths = []
    z0 = -step * (slices - 1) / 2.0
    for index in range(slices):
        z = z0 + index * step
        hu = _head_slice(x, y, z, haematoma, rng)
        if hu is None:
            hu = -1000.0 + rng.normal(0.0, 6.0, x.shape).astype(np.float32)
        stored = np.clip(np.rint(hu + 1024.0), 0, 4095).astype("<u2")
        ds = Dataset()
        ds.update(base)
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [round(top_left, 4), round(top_left, 4), round(z, 4)]
        ds.SliceLocation = round(z, 4)
        ds.PixelData = stored.tobytes()
        paths.append(_write(ds, out_dir / f"CT{index + 1:04d}.dcm"))
    return paths


def generate_mr(
    out_dir: Path,
    *,
    slices: int = 24,
    rows: int = 256,
    seed: int = 0,
    study: DemoStudy | None = None,
) -> list[Path]:
    """Write an axial T2-weighted head MR series (CSF bright, fat and bone dark)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    study = study or random_study(seed, "MR BRAIN")
    rng = np.random.default_rng(seed + 2)
    spacing = 230.0 / rows
    step = 5.0
    coords = (np.arange(rows, dtype=np.float32) - (rows - 1) / 2.0) * spacing
    x, y = np.meshgrid(coords, coords)
    base = _base(study, MR_IMAGE_STORAGE, "MR")
    base.SeriesInstanceUID = generate_uid()
    base.SeriesNumber = 3
    base.SeriesDescription = "AX T2 TSE"
    base.BodyPartExamined = "BRAIN"
    base.Rows = base.Columns = rows
    base.PixelSpacing = [round(spacing, 6), round(spacing, 6)]
    base.SliceThickness = step
    base.ImageOrientationPatient = list(AXIAL)
    base.BitsStored = 12
    base.HighBit = 11
    base.MagneticFieldStrength = 1.5
    base.EchoTime = 100
    base.RepetitionTime = 4000
    paths = []
    z0 = -step * (slices - 1) / 2.0
    for index in range(slices):
        z = z0 + index * step
        hu = _head_slice(x, y, z, False, rng)
        if hu is None:
            hu = np.full(x.shape, -1000.0, dtype=np.float32)
        # Map the CT tissue classes to T2 signal: CSF bright, grey > white, bone/air dark.
        signal = np.select(
            [hu < -500, hu > 500, hu < 15, hu < 33, hu < 60],
            [0.0, 40.0, 1800.0, 700.0, 850.0],
            default=500.0,
        ).astype(np.float32)
        signal += np.abs(rng.normal(0.0, 25.0, x.shape)).astype(np.float32)
        ds = Dataset()
        ds.update(base)
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [float(coords[0]), float(coords[0]), round(z, 4)]
        ds.SliceLocation = round(z, 4)
        ds.PixelData = np.clip(signal, 0, 4095).astype("<u2").tobytes()
        paths.append(_write(ds, out_dir / f"MR{index + 1:04d}.dcm"))
    return paths


def generate_cr(
    out_dir: Path, *, rows: int = 2048, seed: int = 0, study: DemoStudy | None = None
) -> Path:
    """Write a PA chest radiograph (lungs dark, mediastinum, ribs, noise)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    study = study or random_study(seed, "XR CHEST PA")
    rng = np.random.default_rng(seed + 3)
    columns = rows * 5 // 6
    v = np.linspace(-1.0, 1.0, rows, dtype=np.float32)[:, None]
    u = np.linspace(-1.0, 1.0, columns, dtype=np.float32)[None, :]
    image = np.full((rows, columns), 2600.0, dtype=np.float32)  # soft tissue, bright
    for side in (-1.0, 1.0):
        lung = ((u - side * 0.42) / 0.33) ** 2 + ((v + 0.05) / 0.62) ** 2 < 1.0
        image = np.where(lung, 900.0, image)
    image = np.where((np.abs(u) < 0.12) & (v > -0.55), 2900.0, image)  # mediastinum
    ribs = (np.sin((v * 9.0 + np.abs(u) * 2.5) * np.pi) > 0.85) & (np.abs(u) < 0.8)
    image = np.where(ribs, image + 700.0, image)
    image += rng.normal(0.0, 40.0, image.shape).astype(np.float32)
    ds = _base(study, CR_IMAGE_STORAGE, "CR")
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SeriesDescription = "CHEST PA"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.Rows, ds.Columns = rows, columns
    ds.ImagerPixelSpacing = [round(430.0 / rows, 4)] * 2
    ds.PixelSpacing = [round(430.0 / rows, 4)] * 2
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelData = np.clip(image, 0, 4095).astype("<u2").tobytes()
    return _write(ds, out_dir / "CR0001.dcm")


def generate_demo_study(
    out_dir: Path,
    *,
    ct_slices: int = 200,
    ct_rows: int = 512,
    mr_slices: int = 24,
    cr_rows: int = 2048,
    seed: int = 0,
) -> Path:
    """One patient: a head CT with a subdural haematoma plus an MR in the same study,
    and a chest radiograph as a second study. Returns ``out_dir``."""
    head = random_study(seed, "CT HEAD WITHOUT CONTRAST")
    generate_ct(out_dir / "ct", slices=ct_slices, rows=ct_rows, seed=seed, study=head)
    if mr_slices:
        generate_mr(out_dir / "mr", slices=mr_slices, seed=seed, study=head)
    if cr_rows:
        chest = DemoStudy(
            patient=head.patient,
            accession=f"{head.accession}X",
            description="XR CHEST PA",
            time="034010",
        )
        generate_cr(out_dir / "cr", rows=cr_rows, seed=seed, study=chest)
    return out_dir
