"""The node and a real Orthanc PACS on loopback: push to the PACS, and the PACS pushes to us.

Orthanc (dcmtk inside) re-serialises what it stores, so "intact" is checked as:
every instance is there, its decoded elements equal what we sent (less trailing
padding and group lengths), and plain uncompressed modality output is byte-exact
at the data set level.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from node.core.config import DicomConfig
from node.dicom.net import DicomListener, send_to_pacs
from tests.dcmtk import comparable, dataset_part, generated_ct, sample_paths
from tests.orthanc import Orthanc, orthanc_server

pytestmark = [pytest.mark.system, pytest.mark.slow]

NODE_AE = "RADMESH_T"
# Samples with distinct SOP Instance UIDs (several pydicom samples share one).
SAMPLES = (
    "CT_small.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "JPGExtended.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "JPEG2000.dcm",
)


def _uid(part10: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(part10), stop_before_pixels=True).SOPInstanceUID)


class Received:
    def __init__(self) -> None:
        self.items: list[bytes] = []
        self.lock = threading.Lock()

    def __call__(self, data: bytes, source: str) -> None:
        assert source == "ORTHANC"
        with self.lock:
            self.items.append(data)


@pytest.fixture
def received() -> Received:
    return Received()


@pytest.fixture
def listener(received: Received) -> Iterator[DicomListener]:
    config = DicomConfig(ae_title=NODE_AE, port=0, allowed_calling_aets=["ORTHANC"])
    with DicomListener(config, received) as running:
        yield running


@pytest.fixture
def orthanc(tmp_path: Path, listener: DicomListener) -> Iterator[Orthanc]:
    modalities = {"radmesh": (NODE_AE, "127.0.0.1", listener.port)}
    with orthanc_server(tmp_path / "orthanc", modalities=modalities) as server:
        yield server


def _orthanc_files(orthanc: Orthanc) -> dict[str, bytes]:
    files = [orthanc.instance_file(i) for i in orthanc.instance_ids()]
    return {_uid(data): data for data in files}


def test_push_to_orthanc_every_instance_intact(orthanc: Orthanc) -> None:
    series = generated_ct(4)
    sent = [p.read_bytes() for p in sample_paths(SAMPLES)] + series
    report = send_to_pacs(sent, "127.0.0.1", orthanc.dicom_port, orthanc.ae_title, NODE_AE)
    assert report.ok, report.failed
    stored = _orthanc_files(orthanc)
    assert set(stored) == {_uid(data) for data in sent}
    for data in sent:
        theirs = pydicom.dcmread(io.BytesIO(stored[_uid(data)]))
        ours = pydicom.dcmread(io.BytesIO(data))
        assert theirs.file_meta.TransferSyntaxUID == ours.file_meta.TransferSyntaxUID
        assert comparable(theirs) == comparable(ours)
    for data in series:
        digest = hashlib.sha256(dataset_part(data)).hexdigest()
        assert hashlib.sha256(dataset_part(stored[_uid(data)])).hexdigest() == digest


def test_orthanc_pushes_a_study_to_the_node(orthanc: Orthanc, received: Received) -> None:
    originals = [p.read_bytes() for p in sample_paths(SAMPLES)] + generated_ct(3)
    ids = [orthanc.upload(data) for data in originals]
    answer = orthanc.post_json("/modalities/radmesh/store", {"Resources": ids, "Synchronous": True})
    assert answer["FailedInstancesCount"] == 0
    assert answer["InstancesCount"] == len(originals)
    assert len(received.items) == len(originals)
    in_pacs = _orthanc_files(orthanc)
    for data in received.items:
        pacs_copy = in_pacs[_uid(data)]
        ours = pydicom.dcmread(io.BytesIO(data))
        assert comparable(ours) == comparable(pydicom.dcmread(io.BytesIO(pacs_copy)))
    byte_exact = {
        _uid(d) for d in received.items if dataset_part(d) == dataset_part(in_pacs[_uid(d)])
    }
    # The generated uncompressed series must come through the PACS unchanged.
    assert {_uid(d) for d in originals[len(SAMPLES) :]} <= byte_exact


def test_no_orthanc_process_outlives_the_server(tmp_path: Path) -> None:
    with orthanc_server(tmp_path / "o") as server:
        process = server.process
        assert server.get_json("/system")["DicomAet"] == "ORTHANC"
    assert process.poll() is not None
