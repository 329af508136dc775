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

Lossless options (issue 18 item 5; BENCH_CODEC_SLICES, default 8): JPEG-XL lossless
at efforts 1-7, HTJ2K reversible and inter-slice prediction (the difference to the
previous slice, or to its 3x3 mean, coded with JPEG-LS or JPEG-XL) against JPEG-LS,
pixels only, CPU MB/s on one core. Data: *synthetic* series from the demo phantom (its
white noise; the same with CT-like spatially correlated noise; that noise correlated
0.5 with the previous slice as overlapping reconstructions give; the demo MR; and the
noiseless anatomy as a bound no scan reaches) and the *real* CT and MR images installed
packages ship (pydicom's CT_small, J2K_pixelrep_mismatch 512² CT, MR_small,
examples_overlay, dicom3tools' 0051 MR): single slices, so no real inter-slice figure.
Measured here (2 cores, load ~8): JPEG-XL effort 3 saves a median 8% (best 16%, the
512² CT, where it decodes at 27 MB/s: slower than the loopback link needs) and effort
5-7 at most 28% at 1-4 MB/s encode (0.4-1.6 MB/s of output, under a 20 Mbit/s link);
HTJ2K is 11% larger; the previous-slice difference is 6-16% larger on every noisy
series (the two slices' noise adds up), 14% smaller only on the noiseless bound; the
smoothed reference is 0-3% larger. JPEG-LS stays. The phantom's noise is white; real CT
noise is correlated in-plane (the CT-like series model it) and, for overlapping
reconstructions, between slices (the rho .5 series): neither changes the verdict.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import pydicom
import pydicom.encaps
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
                iter(files),
                Identity.generate(),
                spool,
                count=len(files),
                total=sum(map(len, files)),
                source=b"",
                cache=cache,
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


# -- lossless options beyond JPEG-LS (issue 18 item 5) --------------------------------------
#
# Pixels only: the zstd-coded rest of the file (header, preamble) costs the same whatever
# codes the pixels, so each ratio below is raw pixel bytes / coded pixel bytes. Speeds are
# CPU seconds of this process (time.process_time: one core, every codec single-threaded),
# so other load on the machine does not bend them much.

LINK_20_MBIT = 2.5e6  # bytes/s a 20 Mbit/s link drains
ADOPT_GAIN = 0.15  # of size saved against JPEG-LS
LOOPBACK = 10e6  # bytes/s of the aiortc data channel on loopback with uvloop (DESIGN.md)


@dataclass(frozen=True)
class PixelSet:
    """One series' frames (uint16 samples in acquisition order) and where they come from."""

    name: str
    origin: str  # "synthetic" or "real"
    frames: list[Array]
    bound: bool = False  # a best case no scan reaches: shown, left out of the verdict


@dataclass(frozen=True)
class Method:
    """A lossless coding of one frame, optionally against the previous frame of its series."""

    name: str
    encode: Callable[[Array, Array | None], bytes]
    decode: Callable[[bytes, Array | None, tuple[int, int]], Array]
    inter: bool = False


def samples(values: Array) -> tuple[Array, int]:
    """``values`` as unsigned JPEG-LS/JPEG-XL samples the way the wire codec maps them:
    ``(value - low) mod 2**16`` in whichever view (unsigned or two's complement) has
    the smaller span; returns the samples and ``low``."""
    unsigned = values.astype("<u2", copy=False)
    signed = unsigned.view("<i2")
    if int(signed.max()) - int(signed.min()) < int(unsigned.max()) - int(unsigned.min()):
        low = int(signed.min()) & 0xFFFF
    else:
        low = int(unsigned.min())
    return np.subtract(unsigned, np.uint16(low), dtype=np.uint16), low


def _intra(enc: Callable[[Array], Any], dec: Callable[[bytes], Array], name: str) -> Method:
    def encode(frame: Array, _prev: Array | None) -> bytes:
        coded, low = samples(frame)
        return low.to_bytes(2, "little") + bytes(enc(coded))

    def decode(stream: bytes, _prev: Array | None, shape: tuple[int, int]) -> Array:
        out: Array = dec(stream[2:]).reshape(shape).astype("<u2")
        return np.add(out, np.uint16(int.from_bytes(stream[:2], "little")), dtype=np.uint16)

    return Method(name, encode, decode)


def box3(frame: Array) -> Array:
    """The 3x3 box mean of ``frame`` in integers (floor), edges repeated: a reference with
    the previous slice's noise mostly averaged away, computed the same on both sides."""
    padded = np.pad(frame.astype(np.int64), 1, mode="edge")
    rows, columns = frame.shape
    total = sum(padded[y : y + rows, x : x + columns] for y in range(3) for x in range(3))
    return np.asarray(total // 9).astype("<u2")


def _inter(intra: Method, name: str, reference: Callable[[Array], Array] | None = None) -> Method:
    """Code ``frame - reference(previous frame)`` wrapped to 16 bits (every difference of
    two 16-bit values is representable mod 2**16) with ``intra``; the first frame of a
    series is coded alone. Decoding needs the previous frame: the structural cost."""

    def ref(prev: Array) -> Array:
        return (reference or (lambda a: a))(prev.astype("<u2"))

    def encode(frame: Array, prev: Array | None) -> bytes:
        if prev is None:
            return b"I" + intra.encode(frame, None)
        diff = np.subtract(frame.astype("<u2"), ref(prev), dtype=np.uint16)
        return b"P" + intra.encode(diff, None)

    def decode(stream: bytes, prev: Array | None, shape: tuple[int, int]) -> Array:
        body = intra.decode(stream[1:], None, shape)
        if stream[:1] == b"I":
            return body
        if prev is None:
            raise wirecodec.CorruptInstance("a predicted frame arrived without its reference")
        return np.add(body, ref(prev), dtype=np.uint16)

    return Method(name, encode, decode, inter=True)


def _jxl(effort: int) -> Method:
    return _intra(
        lambda a: imagecodecs.jpegxl_encode(a, lossless=True, effort=effort, numthreads=1),
        lambda b: imagecodecs.jpegxl_decode(b, numthreads=1),
        f"JPEG-XL effort {effort}",
    )


JPEGLS = _intra(imagecodecs.jpegls_encode, imagecodecs.jpegls_decode, "JPEG-LS (today)")
HTJ2K = _intra(
    lambda a: imagecodecs.htj2k_encode(a, reversible=True),
    imagecodecs.htj2k_decode,
    "HTJ2K reversible",
)
METHODS = [
    JPEGLS,
    HTJ2K,
    *(_jxl(e) for e in (1, 2, 3, 5, 7)),
    _inter(JPEGLS, "prev-slice diff + JPEG-LS"),
    _inter(JPEGLS, "prev 3x3-mean diff + JPEG-LS", box3),
    _inter(_jxl(3), "prev-slice diff + JPEG-XL e3"),
]


def _nps_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> Array:
    """Gaussian noise with a CT-like noise power spectrum (ramp x Gaussian apodisation,
    peak near 0.1 cycles/pixel): neighbouring pixels correlate as after filtered back
    projection with a soft-tissue kernel, unlike the demo's white noise."""
    white = rng.normal(0.0, 1.0, shape)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    f = np.hypot(fx, fy)
    shaped = np.fft.irfft2(np.fft.rfft2(white) * np.sqrt(f * np.exp(-((f / 0.15) ** 2))), s=shape)
    return np.asarray(shaped * (sigma / shaped.std()))


def phantom_ct(n: int, kind: str, rho: float = 0.0, size: int = 512, seed: int = 5) -> list[Array]:
    """The demo head CT (1.25 mm steps, 12 HU noise) as stored values. ``kind`` "white" is
    the demo's noise; "nps" is spatially correlated noise of the same strength, and
    ``rho`` correlates it with the previous slice's (overlapping reconstructions); "none"
    is the anatomy alone, the best case for inter-slice prediction (no real scan has it)."""
    rng = np.random.default_rng(seed)
    frames: list[Array] = []
    previous: Array | None = None
    for i in range(n):
        hu = phantom.head_hu(size, ct_level(i), rng=rng, noise=0.0).astype(np.float64)
        if kind == "none":
            frames.append(np.clip(np.rint(hu + 1024.0), 0, 4095).astype("<u2"))
            continue
        white = kind == "white"
        fresh = rng.normal(0.0, 12.0, hu.shape) if white else _nps_noise(rng, hu.shape, 12.0)
        noise = fresh if previous is None else rho * previous + np.sqrt(1 - rho * rho) * fresh
        previous = noise
        hu = np.where(hu <= -1023.5, hu, hu + noise)  # padding outside the circle stays flat
        frames.append(np.clip(np.rint(hu + 1024.0), 0, 4095).astype("<u2"))
    return frames


def phantom_mr(n: int) -> list[Array]:
    """The demo's T2 head MR (node/demo/phantom.py generate_mr: 256², 5 mm steps)."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = phantom.generate_mr(Path(tmp), slices=n)
        return [_stored_values(p) for p in paths]


def _stored_values(path: Path) -> Array:
    ds = pydicom.dcmread(path)
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:  # JPEG 2000 lossless: decode it
        fragments = [
            f for f in pydicom.encaps.generate_fragments(ds.PixelData) if f[:2] == b"\xff\x4f"
        ]
        decoded = imagecodecs.jpeg2k_decode(b"".join(fragments))
        return np.asarray(decoded).astype(np.int64).astype("<u2")  # two's complement kept
    return np.frombuffer(ds.PixelData, "<u2").reshape(int(ds.Rows), int(ds.Columns))


#: Real CT and MR images that ship with installed packages (no downloads): single slices,
#: so they compare the codecs but cannot show inter-slice prediction.
REAL_FILES = [
    ("CT 128² (pydicom CT_small)", "pydicom", "CT_small.dcm"),
    ("CT 512² (pydicom J2K_pixelrep_mismatch)", "pydicom", "J2K_pixelrep_mismatch.dcm"),
    ("MR 64² (pydicom MR_small)", "pydicom", "MR_small.dcm"),
    ("MR 484x300 (pydicom examples_overlay)", "pydicom", "examples_overlay.dcm"),
    ("MR 360² (dicom3tools example 0051)", "/usr/share/doc/dicom3tools/examples", "0051.dcm"),
]


def pixel_sets(slices: int) -> list[PixelSet]:
    sets = [
        PixelSet("CT phantom, white noise (demo)", "synthetic", phantom_ct(slices, "white")),
        PixelSet("CT phantom, CT-like noise", "synthetic", phantom_ct(slices, "nps")),
        PixelSet("CT phantom, CT-like, rho .5", "synthetic", phantom_ct(slices, "nps", 0.5)),
        PixelSet("MR phantom (demo)", "synthetic", phantom_mr(slices)),
        PixelSet("CT phantom, no noise (bound)", "synthetic", phantom_ct(slices, "none"), True),
    ]
    for name, where, file in REAL_FILES:
        folder = (
            Path(pydicom.__file__).parent / "data" / "test_files"
            if where == "pydicom"
            else Path(where)
        )
        if (folder / file).is_file():
            sets.append(PixelSet(name, "real", [_stored_values(folder / file)]))
    return sets


@dataclass(frozen=True)
class Outcome:
    ratio: float
    encode: float  # original bytes per CPU second
    decode: float


def code_set(pixels: PixelSet, method: Method, timed_bytes: float = 4e6) -> Outcome:
    """Code every frame, decode it again (checked equal), time both on CPU; small sets
    are repeated until ``timed_bytes`` have gone through, so the timer sees something."""
    raw = sum(f.nbytes for f in pixels.frames)
    reps = max(1, int(timed_bytes // raw))
    method.encode(pixels.frames[0], None)  # warm up the library
    streams: list[bytes] = []
    started = time.process_time()
    for _ in range(reps):
        streams = [
            method.encode(f, pixels.frames[i - 1] if i and method.inter else None)
            for i, f in enumerate(pixels.frames)
        ]
    encoded = time.process_time()
    for _ in range(reps):
        for i, (stream, frame) in enumerate(zip(streams, pixels.frames, strict=True)):
            prev = pixels.frames[i - 1] if i and method.inter else None
            out = method.decode(stream, prev, frame.shape)
            if not np.array_equal(out, frame.astype("<u2")):
                raise AssertionError(f"{method.name} is not lossless on {pixels.name}")
    decoded = time.process_time()
    coded = sum(len(s) for s in streams)
    return Outcome(raw / coded, raw * reps / (encoded - started), raw * reps / (decoded - encoded))


def lossless_options(slices: int) -> None:
    print(f"\nlossless pixel coding (pixels only; {slices}-slice series; CPU MB/s, one core):")
    print(
        f"{'data':40} {'origin':9} {'method':29} {'ratio':>6} {'saved':>7} "
        f"{'enc MB/s':>8} {'wire MB/s':>9} {'dec MB/s':>8}"
    )
    gains: dict[str, list[float]] = {m.name: [] for m in METHODS}
    slow: dict[str, set[str]] = {m.name: set() for m in METHODS}
    for pixels in pixel_sets(slices):
        base = None
        for method in METHODS:
            if method.inter and len(pixels.frames) < 2:
                continue
            out = code_set(pixels, method)
            base = base or out.ratio
            smaller = 1 - base / out.ratio  # share of JPEG-LS's size saved (negative: larger)
            wire = out.encode / out.ratio
            if not pixels.bound:
                gains[method.name].append(smaller)
                if wire < LINK_20_MBIT:
                    slow[method.name].add("encode")
                if out.decode < LOOPBACK * out.ratio:
                    slow[method.name].add("decode")
            print(
                f"{pixels.name:40} {pixels.origin:9} {method.name:29} {out.ratio:6.2f} "
                f"{smaller:+7.0%} {out.encode / 1e6:8.1f} {wire / 1e6:9.1f} "
                f"{out.decode / 1e6:8.1f}",
                flush=True,
            )
    print(
        f"adopt only if >= {ADOPT_GAIN:.0%} smaller than JPEG-LS, encode output >= "
        f"{LINK_20_MBIT / 1e6} MB/s (20 Mbit/s) and decode >= {LOOPBACK / 1e6:.0f} MB/s of "
        "wire (loopback) x ratio, on every data set but the bound:"
    )
    for name, saved in gains.items():
        if name == JPEGLS.name:
            continue
        median = float(np.median(saved))
        why = [f"saves a median {median:+.0%}"] if median < ADOPT_GAIN else []
        why += [f"too slow to {what} on some data" for what in sorted(slow[name])]
        print(
            f"  {name:29} saved: median {median:+4.0%}, best {max(saved):+4.0%}: "
            + ("adopt" if not why else "no (" + "; ".join(why) + ")")
        )


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
    lossless_options(int(os.environ.get("BENCH_CODEC_SLICES", "8")))
    offer_times(int(os.environ.get("BENCH_OFFER_SLICES", "200")))


if __name__ == "__main__":
    main()
