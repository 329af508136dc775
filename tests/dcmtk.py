"""Helpers for tests that use the real dcmtk tools (Debian package ``dcmtk``).

``echoscu`` / ``storescu`` act as a hospital's DICOM clients, ``storescp`` as a
real receiving PACS. Everything runs on 127.0.0.1 with ports the OS picked.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from node.core.children import die_with_parent, stop
from node.demo.phantom import head_hu
from tests.ports import free_port

LOOPBACK = "127.0.0.1"
TOOL_TIMEOUT = 60.0


def require_dcmtk(*tools: str) -> None:
    """Skip the calling test, naming the Debian package, when a dcmtk tool is missing."""
    for tool in tools or ("echoscu", "storescu", "storescp"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found: install the Debian package dcmtk")


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {LOOPBACK}:{port} after {timeout} s")


def dataset_part(part10: bytes) -> bytes:
    """The bytes after the File Meta Information group: the data set as sent on the wire."""
    if part10[128:132] != b"DICM":
        raise ValueError("not a Part-10 file")
    # (0002,0000) UL, explicit VR little endian: tag 4 + VR 2 + length 2 + value 4.
    if part10[132:138] != b"\x02\x00\x00\x00UL":
        raise ValueError("file meta has no group length")
    group_length = int.from_bytes(part10[140:144], "little")
    return part10[144 + group_length :]


def echoscu(
    port: int, called_ae: str, calling_ae: str = "ECHOSCU"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["echoscu", "-aet", calling_ae, "-aec", called_ae, LOOPBACK, str(port)],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
        check=False,
    )


def storescu(
    files: Sequence[Path],
    port: int,
    called_ae: str,
    calling_ae: str = "STORESCU",
    extra: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Send files; pass ``extra=[propose_option(path)]`` for compressed files."""
    return subprocess.run(
        [
            "storescu",
            "-aet",
            calling_ae,
            "-aec",
            called_ae,
            *extra,
            LOOPBACK,
            str(port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
        check=False,
    )


# storescu's option that proposes a transfer syntax (with the uncompressed ones).
PROPOSE_OPTION = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}


def propose_option(path: Path) -> str:
    """The storescu option that proposes the file's own transfer syntax."""
    syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    return PROPOSE_OPTION[syntax]


@dataclass
class StoreSCP:
    """A running dcmtk ``storescp`` writing every received instance to ``directory``."""

    port: int
    ae_title: str
    directory: Path
    process: subprocess.Popen[bytes]

    def files(self) -> list[Path]:
        return sorted(p for p in self.directory.iterdir() if p.is_file())


@contextlib.contextmanager
def storescp(directory: Path, ae_title: str = "STORESCP") -> Iterator[StoreSCP]:
    require_dcmtk("storescp")
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    # +xa: accept every transfer syntax; -uf: file names from SOP instance UIDs.
    process = subprocess.Popen(
        ["storescp", "-aet", ae_title, "+xa", "-od", str(directory), "-uf", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent(),  # no orphan server if the test run is killed
        start_new_session=True,
    )
    try:
        wait_for_port(port)
        yield StoreSCP(port, ae_title, directory, process)
    finally:
        stop(process, 10)


# Sample files that ship inside pydicom (no download), one per transfer syntax family.
SAMPLE_FILES = (
    "CT_small.dcm",  # explicit VR LE
    "MR_small_implicit.dcm",  # implicit VR LE
    "MR_small_bigendian.dcm",  # explicit VR BE
    "image_dfl.dcm",  # deflated
    "JPEG-lossy.dcm",  # JPEG baseline
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline RGB
    "JPGExtended.dcm",  # JPEG extended 12-bit
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
    "JPEG2000.dcm",  # JPEG 2000
    "MR_small_RLE.dcm",  # RLE
    "rtplan.dcm",  # non-image storage class
)


def sample_paths(names: Sequence[str] = SAMPLE_FILES) -> list[Path]:
    paths = []
    for name in names:
        path = get_testdata_file(name, download=False)
        if path is None:
            raise FileNotFoundError(f"pydicom sample {name} is not shipped with pydicom")
        paths.append(Path(str(path)))
    return paths


def generated_ct(count: int) -> list[bytes]:
    """A small CT series with unique UIDs, as a modality would write it: 64 x 64 slices of
    the demo's head (node/demo/phantom.py), stored signed, under a minimal header."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(7)
    out = []
    for index in range(count):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.Modality = "Test^Patient", "P1", "CT"
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(index)]
        ds.Rows = ds.Columns = 64
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        hu = head_hu(64, 30.0 - index * 5.0, rng=rng)
        ds.PixelData = np.rint(hu + 1024.0).astype("<i2").tobytes()
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


def comparable(ds: Dataset) -> dict[int, object]:
    """What dcmtk keeps: it drops trailing padding and group lengths, may relabel OB/OW."""
    return {
        int(elem.tag): elem.value for elem in ds if elem.tag != 0xFFFCFFFC and elem.tag.element != 0
    }
