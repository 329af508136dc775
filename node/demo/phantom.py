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
from pydicom.filebase import DicomBytesIO
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)

_FIRST = ("JANE", "JOHN", "MARIA", "AHMED", "LENA", "KWAME", "SOFIA", "TOMAS", "ANIKA", "RAVI")
_LAST = ("DOE", "MUELLER", "OKONKWO", "SILVA", "NAKAMURA", "KOWALSKI", "HANSEN", "MORENO")

Floats = npt.NDArray[np.float32]
Mask = npt.NDArray[np.bool_]


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


def _with_meta(ds: Dataset) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta


def _write(ds: Dataset, path: Path) -> Path:
    _with_meta(ds)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


# The head, in patient coordinates (LPS, mm): +x is the patient's left (the image's
# right in the radiological convention), +y posterior, +z superior; z = 0 is the level
# of the thalami. The outer skull surface is an egg, wider behind than in front.
VERTEX_Z = 98.0  # top of the skull
BASE_Z = -75.0  # below it the scan sees no head in this phantom
HEAD_FOV_MM = 230.0  # the reconstruction circle, as a head CT's display field of view


@dataclass(frozen=True)
class Collection:
    """An acute subdural haematoma over the left convexity: a crescent between the inner
    table and the brain, thickest ``thickest_mm`` at level ``level_z`` toward
    ``towards_deg`` (0 = straight to the patient's left, 90 = straight back)."""

    thickest_mm: float = 9.0
    level_z: float = 2.0
    half_height_mm: float = 44.0
    towards_deg: float = 8.0
    half_arc_deg: float = 64.0
    hu: float = 68.0  # acute blood

    def thickness(self, theta_deg: Floats, z: float) -> Floats:
        """Thickness (mm) at each angle around the head, at height ``z``."""
        height = 1.0 - ((z - self.level_z) / self.half_height_mm) ** 2
        if height <= 0.0:
            return np.zeros_like(theta_deg)
        off = np.abs((theta_deg - self.towards_deg + 180.0) % 360.0 - 180.0)
        arc = np.cos(np.clip(off / self.half_arc_deg, 0.0, 1.0) * (np.pi / 2.0))
        thickness: Floats = (self.thickest_mm * float(np.sqrt(height)) * arc).astype(np.float32)
        return thickness

    def shift_mm(self, z: float) -> float:
        """Midline shift toward the patient's right (-x) at height ``z``: mass effect."""
        height = 1.0 - ((z - self.level_z) / (self.half_height_mm + 15.0)) ** 2
        return -0.5 * self.thickest_mm * float(np.sqrt(max(height, 0.0)))


HAEMATOMA = Collection()


def _vault(z: float) -> tuple[float, float] | None:
    """Semi-axes (left-right, front-back) of the outer skull surface at height z."""
    if not BASE_Z < z < VERTEX_Z:
        return None
    shrink = 1.0 - (z / VERTEX_Z) ** 2 if z > 0 else 1.0 - (z / 140.0) ** 2
    scale = float(np.sqrt(shrink))
    return 74.0 * scale, 93.0 * scale


def _ellipse(x: Floats, y: Floats, cx: float, cy: float, rx: float, ry: float) -> Mask:
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1.0


def _band(profile: float) -> float:
    """0 outside a structure's levels, rising to 1 at their middle (profile = 1 - u^2)."""
    return float(np.sqrt(profile)) if profile > 0 else 0.0


def head_hu(
    rows: int,
    z: float,
    *,
    rng: np.random.Generator | None = None,
    noise: float = 6.0,
    collection: Collection | None = HAEMATOMA,
    fov_mm: float = HEAD_FOV_MM,
) -> Floats:
    """One axial slice (rows x rows, HU) of the head at height ``z`` mm.

    Scalp with its fat layer; a skull of outer table, diploe and inner table, thinner over
    the temples; cortex following gyri with CSF in the sulci and the interhemispheric
    fissure with the falx; white matter; caudate, lentiform nuclei and thalami; the
    lateral and third ventricles; lower down the cerebellum with its folia, the fourth
    ventricle, brainstem, petrous bones, sphenoid sinus, orbits with globes and lenses.
    ``collection``: the haematoma (and its midline shift), None for a normal head.
    Scanner noise is Gaussian (``noise`` HU) inside the reconstruction circle; outside it
    the pixels are padding (-1024), as a scanner writes them.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    spacing = fov_mm / rows
    coords = (np.arange(rows, dtype=np.float32) - (rows - 1) / 2.0) * spacing
    x, y = np.meshgrid(coords, coords)
    hu = np.full(x.shape, -1000.0, dtype=np.float32)
    axes = _vault(z)
    if axes is not None:
        _head(hu, x, y, z, axes, collection)
    if noise:
        hu += rng.normal(0.0, noise, x.shape).astype(np.float32)
    hu[x**2 + y**2 > (fov_mm / 2.0) ** 2] = -1024.0
    return hu


def _head(
    hu: Floats,
    x: Floats,
    y: Floats,
    z: float,
    axes: tuple[float, float],
    collection: Collection | None,
) -> None:
    a, b = axes
    a_here = a * (1.0 + 0.07 * np.clip(y / b, -1.0, 1.0))  # wider behind
    rho = np.sqrt((x / a_here) ** 2 + (y / b) ** 2)
    grad = np.sqrt((x / a_here**2) ** 2 + (y / b**2) ** 2) / np.maximum(rho, 1e-3)
    d = (1.0 - rho) / np.maximum(grad, 1e-4)  # mm inside the outer skull surface
    theta = np.degrees(np.arctan2(y, x)).astype(np.float32)
    radius = np.hypot(x, y) + 1e-3
    face = z < -28.0
    # At orbit level the front of the head is the orbits and the nose, not the vault.
    anterior = _ellipse(x, y, 0.0, -b, 0.72 * a, 0.5 * b) if face else np.zeros_like(x, bool)

    # Scalp: skin and muscle with a fat layer.
    hu[d > -6.0] = 45.0
    hu[(d > -4.5) & (d < -1.2)] = -85.0
    # Skull: thicker in front, thin over the temples.
    thick = 6.5 + 1.5 * np.clip(-y / b, 0.0, 1.0) - 3.0 * (np.abs(x) / radius) ** 6
    bone = (d >= 0.0) & (d < thick) & ~anterior
    diploe = np.float32(620.0) + 90.0 * np.sin(x * 1.7) * np.cos(y * 1.3)
    hu[bone] = np.where((d < 1.6) | (d > thick - 1.4), 1700.0, diploe)[bone]
    inside = (d >= thick) & ~anterior
    depth = d - thick  # mm below the inner table

    t = collection.thickness(theta, z) if collection is not None else np.zeros_like(x)
    shift = collection.shift_mm(z) if collection is not None else 0.0
    brain_depth = depth - t
    hu[inside] = 26.0  # white matter
    # Cortex: grey matter whose boundary with the white matter follows the gyri.
    rad = np.radians(theta)
    gyri = 4.5 + 2.5 * np.sin(rad * 23.0 + z * 0.15 + 1.7 * np.sin(rad * 7.0 + z * 0.05))
    hu[inside & (brain_depth < 1.2 + gyri)] = 41.0
    warp = 2.2 * np.sin(rad * 5.0 + z * 0.07) + 0.9 * np.sin(rad * 13.0 - z * 0.09)
    sulcal = np.cos(rad * 36.0 + warp + z * 0.11)
    reach = 1.2 + gyri + 3.0 + 3.0 * np.sin(rad * 11.0 + z * 0.13) ** 2  # sulci vary in depth
    effaced = t > 0.3  # the collection presses the sulci shut under it
    hu[inside & ~effaced & (sulcal > 0.70) & (brain_depth < reach + 2.5)] = 41.0
    csf = 8.0
    hu[inside & ~effaced & (sulcal > 0.94) & (brain_depth < reach)] = csf
    hu[inside & ~effaced & (brain_depth < 1.2)] = csf  # subarachnoid space

    # Deep structures, displaced toward the right by the mass effect (not at the falx's
    # anchors in front and behind).
    xs = x - shift * np.cos(np.clip(y / 80.0, -1.0, 1.0) * (np.pi / 2.0))
    if z < -18.0:
        _posterior_fossa(hu, xs, y, z, inside)
    else:
        _cerebrum(hu, xs, y, z, inside, b)
    if face:
        _face(hu, x, y, z, b, d)
    if z < -26.0:
        _skull_base(hu, x, y, z, inside)
    if collection is not None:
        blood = inside & (depth < t)
        hu[blood] = collection.hu


def _cerebrum(hu: Floats, xs: Floats, y: Floats, z: float, inside: Mask, b: float) -> None:
    csf, deep_grey = 6.0, 37.0
    # Interhemispheric fissure with the falx; the corpus callosum bridges it mid-height.
    fissure = inside & (np.abs(xs) < 1.6)
    if z < 36.0:
        fissure &= (y < -34.0) | (y > 40.0)
    hu[fissure] = 8.0
    hu[fissure & (np.abs(xs) < 0.5)] = 62.0
    # Sylvian fissures with the insula, low in the cerebrum.
    sylvian = _band(1.0 - ((z + 5.0) / 14.0) ** 2)
    if sylvian:
        line = np.abs(y - (-6.0 + 0.18 * (np.abs(xs) - 40.0))) < 1.4 * sylvian + 0.4
        hu[inside & line & (np.abs(xs) > 36.0) & (np.abs(xs) < 58.0)] = 8.0
        insula = np.abs(np.abs(xs) - 34.0) < 2.2
        hu[inside & insula & (np.abs(y + 2.0) < 16.0)] = 40.0
    for side in (-1.0, 1.0):
        left = side > 0  # the collection's side: its ventricle is squeezed
        if (k := _band(1.0 - ((z - 13.0) / 10.0) ** 2)) > 0:
            hu[inside & _ellipse(xs, y, side * 11.0, -20.0, 4.0 + k, 6.0 + 3.0 * k)] = deep_grey
        if (k := _band(1.0 - ((z - 5.0) / 10.0) ** 2)) > 0:
            lentiform = _ellipse(xs, y, side * 22.0, -4.0, 3.0 + 3.0 * k, 6.0 + 8.0 * k)
            hu[inside & lentiform] = deep_grey
        if (k := _band(1.0 - ((z - 4.0) / 10.0) ** 2)) > 0:
            hu[inside & _ellipse(xs, y, side * 8.5, 9.0, 3.0 + 4.0 * k, 5.0 + 6.0 * k)] = 38.0
        if (k := _band(1.0 - ((z - 19.0) / 16.0) ** 2)) > 0:
            centre = side * (4.5 + 0.0028 * (y + 25.0) ** 2)
            width = np.where(y < -15.0, 4.0, np.where(y > 14.0, 5.5, 3.0)) * k
            width = width * np.sqrt(np.clip(1.0 - ((y + 3.0) / 35.5) ** 6, 0.0, 1.0))
            if left:
                width = width * 0.55
            length = (y > -38.0) & (y < 32.0)
            if z < 9.0:  # only the frontal horns and the atria reach this low
                length &= (y < -16.0) | (y > 14.0)
            hu[inside & length & (np.abs(xs - centre) < width)] = csf
    if (k := _band(1.0 - (z / 9.0) ** 2)) > 0:  # third ventricle
        hu[inside & (np.abs(xs) < 1.6 * k) & (y > -8.0) & (y < 14.0)] = csf


def _posterior_fossa(hu: Floats, xs: Floats, y: Floats, z: float, inside: Mask) -> None:
    behind = inside & (y > 6.0)
    spokes = np.arctan2(y - 14.0, xs)
    folia = np.cos(np.hypot(xs, y - 14.0) * 2.4 + 1.2 * np.sin(spokes * 5.0)) > 0.55
    hu[behind] = np.where(folia, 38.0, 29.0)[behind]  # cerebellar folia
    hu[behind & (np.abs(xs) < 1.2) & (y > 34.0)] = 8.0  # vallecula behind the vermis
    hu[inside & _ellipse(xs, y, 0.0, -2.0, 13.0, 11.0)] = 34.0  # pons / medulla
    if -58.0 < z < -26.0:  # fourth ventricle: a tent behind the pons
        tent = (y > 10.0) & (y < 20.0) & (np.abs(xs) < 7.0 * (1.0 - (y - 10.0) / 12.0))
        hu[inside & tent] = 6.0


def _skull_base(hu: Floats, x: Floats, y: Floats, z: float, inside: Mask) -> None:
    if -52.0 < z < -26.0:  # petrous ridges, from behind the ear toward the clivus
        for side in (-1.0, 1.0):
            ax, ay, bx, by = side * 56.0, 22.0, side * 16.0, -6.0
            t = np.clip(((x - ax) * (bx - ax) + (y - ay) * (by - ay)) / 2000.0, 0.0, 1.0)
            near = np.hypot(x - (ax + t * (bx - ax)), y - (ay + t * (by - ay))) < 5.0
            hu[near & inside] = 1500.0
            mastoid = _ellipse(x, y, side * 58.0, 30.0, 7.0, 8.0) & inside
            hu[mastoid] = np.where(np.sin(x * 2.1) * np.sin(y * 2.3) > 0.2, -700.0, 900.0)[mastoid]
    if -62.0 < z < -30.0:  # sphenoid sinus in its bony walls, in front of the pons
        hu[_ellipse(x, y, 0.0, -26.0, 16.0, 12.0)] = 900.0
        hu[_ellipse(x, y, 0.0, -26.0, 14.0, 10.0)] = -950.0


def _face(hu: Floats, x: Floats, y: Floats, z: float, b: float, d: Floats) -> None:
    """Below the frontal bone at orbit level: orbits with globes and lenses, the
    ethmoid air cells between them."""
    front = _ellipse(x, y, 0.0, -b, 0.72 * b * 0.8, 0.5 * b) & (d > -6.0)
    hu[front & (d > -1.0)] = 40.0  # soft tissue between and around the orbits
    level = _band(1.0 - ((z + 45.0) / 17.0) ** 2)
    if not level:
        return
    for side in (-1.0, 1.0):
        hu[front & _ellipse(x, y, side * 30.0, -68.0, 17.0, 22.0) & (d > 2.0)] = -85.0
        wall = _ellipse(x, y, side * 30.0, -68.0, 19.0, 24.0) & ~_ellipse(
            x, y, side * 30.0, -68.0, 17.0, 22.0
        )
        hu[front & wall & (d > 0.0)] = 1100.0
        globe = _ellipse(x, y, side * 31.0, -74.0, 11.5 * level, 11.5 * level)
        hu[globe] = 12.0
        hu[_ellipse(x, y, side * 31.0, -84.0 + 2.0 * (1 - level), 4.0, 1.8) & globe] = 110.0
    ethmoid = front & (np.abs(x) < 11.0) & (y > -82.0)
    hu[ethmoid] = np.where(np.cos(x * 1.6) * np.cos(y * 1.4) > 0.55, 350.0, -850.0)[ethmoid]


def slice_step(slices: int, slice_spacing: float | None = None) -> float:
    """The distance between slices: rounded so the DS strings keep it exactly uniform."""
    return round(slice_spacing if slice_spacing is not None else max(0.6, 190.0 / slices), 3)


def slice_positions(slices: int, slice_spacing: float | None = None) -> list[float]:
    """The z (mm) of each slice :func:`generate_ct` writes, bottom up, centred on z = 0."""
    step = slice_step(slices, slice_spacing)
    z0 = -step * (slices - 1) / 2.0
    return [round(z0 + index * step, 4) for index in range(slices)]


def collection_span(
    rows: int, z: float, collection: Collection = HAEMATOMA
) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """Where to measure the collection at height ``z``: image points (column, row) on the
    inner table and on the brain's surface, across its thickest part; None where the
    slice does not cross it."""
    found = _inner_table(rows, z, collection)
    if found is None:
        return None
    (col, row), (dcol, drow), thickness_px = found
    if thickness_px < 1.0:
        return None
    return (col, row), (col - dcol * thickness_px, row - drow * thickness_px)


def _inner_table(
    rows: int, z: float, collection: Collection
) -> tuple[tuple[float, float], tuple[float, float], float] | None:
    axes = _vault(z)
    if axes is None:
        return None
    spacing = HEAD_FOV_MM / rows
    angle = np.radians(collection.towards_deg)
    direction = (float(np.cos(angle)), float(np.sin(angle)))
    # Walk out from the centre along the collection's direction to the inner table.
    steps = np.arange(0.0, 120.0, 0.05, dtype=np.float32)
    px, py = steps * direction[0], steps * direction[1]
    a, b = axes
    a_here = a * (1.0 + 0.07 * np.clip(py / b, -1.0, 1.0))
    rho = np.sqrt((px / a_here) ** 2 + (py / b) ** 2)
    grad = np.sqrt((px / a_here**2) ** 2 + (py / b**2) ** 2) / np.maximum(rho, 1e-3)
    d = (1.0 - rho) / np.maximum(grad, 1e-4)
    thick = 6.5 - 3.0 * (np.abs(px) / (np.hypot(px, py) + 1e-3)) ** 6
    outside = np.nonzero(d < thick)[0]
    if not len(outside):
        return None
    reach = float(steps[outside[0]])
    theta = np.array([collection.towards_deg], dtype=np.float32)
    thickness_mm = float(collection.thickness(theta, z)[0])
    centre = (rows - 1) / 2.0
    point = (centre + reach * direction[0] / spacing, centre + reach * direction[1] / spacing)
    return point, direction, thickness_mm / spacing


def ct_series_header(study: DemoStudy, rows: int, step: float) -> Dataset:
    """What every slice of the head CT series shares: a head CT as a scanner writes it."""
    spacing = HEAD_FOV_MM / rows
    base = _base(study, CT_IMAGE_STORAGE, "CT")
    base.SeriesInstanceUID = generate_uid()
    base.SeriesNumber = 2
    base.SeriesDescription = "AX HEAD 5/5 BRAIN"
    base.BodyPartExamined = "HEAD"
    base.ProtocolName = "HEAD ROUTINE"
    base.Rows = base.Columns = rows
    base.PixelSpacing = [round(spacing, 6), round(spacing, 6)]
    base.SliceThickness = round(step, 3)
    base.SpacingBetweenSlices = round(step, 3)
    base.ImageOrientationPatient = list(AXIAL)
    base.BitsStored = 12
    base.HighBit = 11
    base.PixelPaddingValue = 0  # stored 0 = -1024 HU: outside the reconstruction circle
    base.RescaleIntercept = -1024
    base.RescaleSlope = 1
    base.RescaleType = "HU"
    base.WindowCenter = [40, 600]  # brain, bone
    base.WindowWidth = [80, 2800]
    base.WindowCenterWidthExplanation = ["BRAIN", "BONE"]
    base.KVP = 120
    base.XRayTubeCurrent = 280
    base.ReconstructionDiameter = HEAD_FOV_MM
    base.ConvolutionKernel = "H30s"
    base.GantryDetectorTilt = 0
    return base


def ct_slice(base: Dataset, index: int, z: float, hu: Floats) -> Dataset:
    """One slice: the shared header, its position and its pixels (HU, stored + 1024)."""
    rows = int(base.Rows)
    spacing = HEAD_FOV_MM / rows
    top_left = round(-(rows - 1) / 2.0 * spacing, 4)
    ds = Dataset()
    ds.update(base)
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [top_left, top_left, round(z, 4)]
    ds.SliceLocation = round(z, 4)
    ds.PixelData = np.clip(np.rint(hu + 1024.0), 0, 4095).astype("<u2").tobytes()
    return ds


def generate_ct(
    out_dir: Path,
    *,
    slices: int = 200,
    rows: int = 512,
    seed: int = 0,
    study: DemoStudy | None = None,
    haematoma: bool = True,
    slice_spacing: float | None = None,
    noise: float = 6.0,
) -> list[Path]:
    """Write an axial head CT series, one file per slice; returns the paths in z order.
    The same seed gives the same pixels (UIDs are new each time)."""
    if slices < 1 or rows < 16:
        raise ValueError("need at least one slice of at least 16 x 16 pixels")
    out_dir.mkdir(parents=True, exist_ok=True)
    study = study or random_study(seed)
    rng = np.random.default_rng(seed + 1)
    positions = slice_positions(slices, slice_spacing)
    step = slice_step(slices, slice_spacing)
    base = ct_series_header(study, rows, step)
    collection = HAEMATOMA if haematoma else None
    paths = []
    for index, z in enumerate(positions):
        hu = head_hu(rows, z, rng=rng, noise=noise, collection=collection)
        paths.append(_write(ct_slice(base, index, z, hu), out_dir / f"CT{index + 1:04d}.dcm"))
    return paths


def part10(ds: Dataset) -> bytes:
    """``ds`` as a DICOM file's bytes (Explicit VR Little Endian)."""
    buffer = DicomBytesIO()
    _with_meta(ds)
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return bytes(buffer.getvalue())


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
    corner = round(-(rows - 1) / 2.0 * spacing, 4)
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
        hu = head_hu(rows, z, noise=0.0, collection=None)
        # Map the CT tissue classes to T2 signal: CSF bright, grey > white, bone/air dark.
        signal = np.select(
            [hu < -500, hu > 300, hu < -30, hu < 15, hu < 32, hu < 45],
            [0.0, 40.0, 1400.0, 1800.0, 700.0, 850.0],
            default=500.0,
        ).astype(np.float32)
        signal += np.abs(rng.normal(0.0, 25.0, hu.shape)).astype(np.float32)
        ds = Dataset()
        ds.update(base)
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [corner, corner, round(z, 4)]
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
