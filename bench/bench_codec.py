"""Wire codec: compression ratio and encode/decode speed, JPEG-LS vs zstd-only vs raw.

Run: ``python -m bench codec``. Data: the demo's synthetic head CT
(node/demo/phantom.py: HU-like anatomy and scanner noise, not flat images) as
in-memory files, and incompressible random 16-bit data. ``ct_series`` here is what
the transfer tests and benchmarks use when they want files in memory.

It also times what a sender spends before it can offer the manifest (every
instance read, encoded and verified into the sealed spool, as ``send_study``
does) for a 200-slice CT study: without a wire cache, with an empty one (cold),
with one that already has the study (warm: a study sent again, or warmed after
its import), and for the de-identified copy a consult shares, against the same
warm cache. BENCH_OFFER_SLICES changes the study size. This machine (2 cores,
load ~1): no cache 1.98 s, cold 1.98 s, warm 0.71 s (2.8x sooner), the
de-identified copy 0.68 s (2.9x); what is left when warm is parsing each file
twice (describe + encode), hashing, zstd of the residual and the sealed spool.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from node.demo import phantom
from node.dicom import wirecodec

Array = np.ndarray[Any, Any]


def ct_slice_hu(rng: np.random.Generator, z: float, size: int = 512, noise: float = 12.0) -> Array:
    """One axial slice in Hounsfield units: the demo's head CT (node/demo/phantom.py) at
    height ``z`` mm, with scanner noise of ``noise`` HU."""
    return phantom.head_hu(size, z, rng=rng, noise=noise)


def ct_level(index: int) -> float:
    """The height (mm) of slice ``index`` of :func:`ct_series`: 1.25 mm steps down through
    the cerebrum (ventricles to the skull base), then again; every slice a full head, so
    slices cost about the same to code and to hold whatever the series' length."""
    return 25.0 - (index % 40) * 1.25


def ct_instance(
    rng: np.random.Generator,
    study_uid: str,
    series_uid: str,
    index: int,
    size: int = 512,
    noise: float = 12.0,
) -> bytes:
    """A complete CT Image Storage file (12 bits stored, unsigned, intercept -1024)."""
    z = ct_level(index)
    hu = ct_slice_hu(rng, z, size, noise)
    stored = np.clip(np.rint(hu + 1024.0), 0, 4095).astype("<u2")
    return _file(
        stored,
        study_uid,
        series_uid,
        index,
        bits_stored=12,
        signed=False,
        z=z,
        spacing=phantom.HEAD_FOV_MM / size,
    )


def _file(
    pixels: Array,
    study_uid: str,
    series_uid: str,
    index: int,
    bits_stored: int,
    signed: bool,
    *,
    z: float | None = None,
    spacing: float = 0.9765625,
) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    sop_uid = generate_uid()
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "CT"
    ds.PatientName = "Synthetic^Phantom"
    ds.PatientID = "SYN0001"
    ds.SeriesNumber = 2
    ds.InstanceNumber = index + 1
    ds.Rows, ds.Columns = pixels.shape[-2:]
    corner = round(-(ds.Rows - 1) / 2 * spacing, 4)
    ds.ImagePositionPatient = [corner, corner, -index * 1.25 if z is None else z]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.SliceThickness = 1.25
    ds.PixelSpacing = [round(spacing, 6), round(spacing, 6)]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.WindowCenter = 40
    ds.WindowWidth = 80
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.PixelData = pixels.tobytes()
    buffer = pydicom.filebase.DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return bytes(buffer.getvalue())


def ct_series(n: int, seed: int = 1, size: int = 512, noise: float = 12.0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    study, series = generate_uid(), generate_uid()
    return [ct_instance(rng, study, series, i, size, noise) for i in range(n)]


def random_instance(
    seed: int, size: int = 512, study_uid: str = "1.2.826.0.1.3680043.8.498.1"
) -> bytes:
    """Incompressible: uniformly random 16-bit pixel values."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 1 << 16, size=(size, size), dtype=np.uint16).astype("<u2")
    return _file(pixels, study_uid, study_uid + ".1", seed, bits_stored=16, signed=False)


def _measure(
    files: list[bytes], enc: Callable[[bytes], wirecodec.WireInstance]
) -> tuple[float, float, float]:
    total = sum(len(f) for f in files)
    t0 = time.perf_counter()
    wires = [enc(f) for f in files]
    t1 = time.perf_counter()
    for w in wires:
        wirecodec.decode(w)
    t2 = time.perf_counter()
    wire = sum(w.wire_size for w in wires)
    return total / wire, total / (t1 - t0) / 1e6, total / (t2 - t1) / 1e6


def _offer_time(files: list[bytes], cache: wirecodec.PixelCache | None) -> float:
    """Seconds until the study's manifest could be offered (the streaming sender path)."""
    from crypto.identity import Identity
    from peer_transport.transfer.prepared import PreparedStudy
    from peer_transport.transfer.spool import SenderSpool

    async def prepare() -> float:
        spool = SenderSpool()
        try:
            started = time.perf_counter()
            study = await PreparedStudy.from_source(
                iter(files), Identity.generate(), spool, cache=cache
            )
            await study.encode()  # the whole study, as a sender ends up doing
            return time.perf_counter() - started
        finally:
            spool.close()

    return asyncio.run(prepare())


def offer_times(slices: int) -> None:
    from node.dicom.deid import ShareContext, deidentify
    from node.dicom.wirecache import WireCache

    study = ct_series(slices, seed=3)
    share = ShareContext()
    copies = [deidentify(f, share) for f in study]
    size = sum(len(f) for f in study) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        cache = WireCache(Path(tmp) / "wirecache", os.urandom(32))
        plain = _offer_time(study, None)
        cold = _offer_time(study, cache)
        warm = _offer_time(study, cache)
        copy = _offer_time(copies, cache)
        cores = os.cpu_count()
        print(f"\nencode before offering, CT {slices}x512x512 ({size:.0f} MB), {cores} cores:")
        print(f"  no cache            {plain:6.2f} s")
        stored = cache.size / 1e6
        print(f"  cold cache          {cold:6.2f} s  (codes, verifies, stores {stored:.0f} MB)")
        print(f"  warm cache          {warm:6.2f} s  {cold / warm:5.1f}x sooner than cold")
        print(f"  de-identified copy  {copy:6.2f} s  {cold / copy:5.1f}x sooner than cold")


def main() -> None:
    ct = ct_series(40)
    noise = [random_instance(s) for s in range(10)]
    rows: list[tuple[str, str, list[bytes], Callable[[bytes], wirecodec.WireInstance]]] = [
        ("CT 40x512x512", "jpegls+zstd (encode verifies)", ct, wirecodec.encode),
        ("CT 40x512x512", "zstd-3 whole file", ct, wirecodec.encode_plain),
        ("random 10x512x512", "codec (falls back)", noise, wirecodec.encode),
        ("random 10x512x512", "zstd-3 whole file", noise, wirecodec.encode_plain),
    ]
    print(f"{'data':20} {'method':32} {'ratio':>7} {'enc MB/s':>9} {'dec MB/s':>9}")
    for data, method, files, enc in rows:
        ratio, enc_speed, dec_speed = _measure(files, enc)
        print(f"{data:20} {method:32} {ratio:7.2f} {enc_speed:9.1f} {dec_speed:9.1f}")
    print("raw baseline: ratio 1.00, no CPU")
    jls = _measure(ct, wirecodec.encode)[0]
    zs = _measure(ct, wirecodec.encode_plain)[0]
    print(f"CT: JPEG-LS codec sends {jls / zs:.2f}x less than zstd-only, {jls:.2f}x less than raw")
    offer_times(int(os.environ.get("BENCH_OFFER_SLICES", "200")))


if __name__ == "__main__":
    main()
