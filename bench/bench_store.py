"""Store throughput: import of a generated CT series vs a plain file copy, and read latency.

Baseline: copying the same files with shutil.copyfile plus fsync (what any
atomic, durable write costs on this disk). The store additionally parses the
header, hashes (SHA-256), encrypts (secretstream), renames and commits the index.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from node.demo.phantom import generate_ct
from node.dicom.store import Store

SLICES = 100
KEY = bytes(range(32))


def _copy_baseline(files: list[Path], out: Path) -> float:
    out.mkdir()
    start = time.perf_counter()
    for path in files:
        target = out / path.name
        shutil.copyfile(path, target)
        with target.open("rb+") as fp:
            os.fsync(fp.fileno())
    return time.perf_counter() - start


def multiframe(path: Path, frames: int, rows: int = 512, seed: int = 1) -> Path:
    """A multi-frame grayscale word secondary capture of ``frames`` random ``rows`` x
    ``rows`` 12-bit frames, written to ``path`` (also used by tests/node/test_import.py)."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"  # multi-frame grayscale word SC
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.Rows = ds.Columns = rows
    ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    rng = np.random.default_rng(seed)
    ds.PixelData = rng.integers(0, 4096, (frames, rows, rows), dtype="<u2").tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = generate_ct(root / "ct", slices=SLICES, rows=512, seed=1)
        total = sum(p.stat().st_size for p in files) / 1e6
        copy_s = _copy_baseline(files, root / "copy")
        with Store.open(root / "store", KEY) as store:
            start = time.perf_counter()
            results = [store.add_file(p, source="bench") for p in files]
            import_s = time.perf_counter() - start
            start = time.perf_counter()
            for p in files[:20]:
                store.add_file(p, source="bench")
            dup_s = (time.perf_counter() - start) / 20
            start = time.perf_counter()
            for r in results:
                store.read_instance(r.sop_instance_uid)
            read_s = time.perf_counter() - start

            big = multiframe(root / "mf.dcm", frames=200)  # 100 MiB, 100 chunks
            uid = store.add_file(big, source="bench").sop_instance_uid
            frame_bytes = 512 * 512 * 2
            first_frame = big.stat().st_size - 200 * frame_bytes  # native pixels end the file
            latencies = []
            for frame in range(0, 200, 7):
                start = time.perf_counter()
                with store.open_instance(uid) as stream:
                    stream.seek(first_frame + frame * frame_bytes)
                    stream.read(frame_bytes)
                latencies.append(time.perf_counter() - start)
            start = time.perf_counter()
            whole = pydicom.dcmread(store.open_instance(uid)).PixelData[512 * 512 * 2 * 100 :][:10]
            whole_s = time.perf_counter() - start
            assert whole
        print(f"CT series: {SLICES} x 512x512 16-bit, {total:.1f} MB")
        print(f"{'operation':42} {'MB/s':>8} {'vs copy':>8}")
        print(f"{'plain copy + fsync (baseline)':42} {total / copy_s:8.1f} {1.0:8.2f}")
        print(
            f"{'store import (parse+sha256+encrypt+index)':42} {total / import_s:8.1f} "
            f"{copy_s / import_s:8.2f}"
        )
        print(
            f"{'store read_instance (decrypt+verify)':42} {total / read_s:8.1f} "
            f"{copy_s / read_s:8.2f}"
        )
        print(f"duplicate re-import: {dup_s * 1000:.1f} ms per instance")
        median = statistics.median(latencies) * 1000
        print(
            f"one frame's bytes of a 200-frame 100 MiB instance: median {median:.2f} ms, "
            f"max {max(latencies) * 1000:.2f} ms; decoding the whole instance "
            f"to reach a frame: {whole_s * 1000:.0f} ms ({whole_s * 1000 / median:.0f}x slower)"
        )


if __name__ == "__main__":
    main()
