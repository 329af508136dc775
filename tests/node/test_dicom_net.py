"""The node's DICOM listener and SCU against real dcmtk tools on 127.0.0.1.

What is byte-exact: the stored file is preamble + a File Meta group pynetdicom
builds + the data set bytes exactly as they crossed the wire. So
``dataset_part(stored) == dataset_part(original)`` whenever the sender streams
the file unchanged (our SCU does); dcmtk's storescu decodes and re-encodes, so
for it we compare decoded data sets (less the trailing padding and group lengths
dcmtk drops), and bytes for a plain uncompressed series, which it keeps intact.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from node.core.config import DicomConfig
from node.dicom.net import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    BadInstanceError,
    DicomListener,
    DicomNetError,
    DicomPeerError,
    echo,
    send_to_pacs,
)
from tests.dcmtk import (
    comparable,
    dataset_part,
    echoscu,
    generated_ct,
    propose_option,
    require_dcmtk,
    sample_paths,
    storescp,
    storescu,
)

pytestmark = pytest.mark.system

NODE_AE = "RADMESH_T"
ALLOWED = ["STORESCU", "ECHOSCU", "RADMESH"]


class MemoryStore:
    """In-memory stand-in for node.dicom.store.Store.add_bytes: keeps what it was given."""

    def __init__(self, fail_with: Exception | None = None) -> None:
        self.received: list[tuple[bytes, str]] = []
        self.fail_with = fail_with
        self._lock = threading.Lock()

    def __call__(self, data: bytes, source: str) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        with self._lock:
            self.received.append((data, source))

    def datasets(self) -> list[Dataset]:
        return [pydicom.dcmread(io.BytesIO(data)) for data, _ in self.received]


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def listener(store: MemoryStore) -> Iterator[DicomListener]:
    config = DicomConfig(ae_title=NODE_AE, host="127.0.0.1", port=0, allowed_calling_aets=ALLOWED)
    with DicomListener(config, store) as running:
        yield running


def test_echoscu_from_allowed_ae_succeeds(listener: DicomListener) -> None:
    require_dcmtk("echoscu")
    result = echoscu(listener.port, NODE_AE, "ECHOSCU")
    assert result.returncode == 0, result.stderr


def test_unknown_calling_ae_is_refused_and_logged(
    listener: DicomListener, caplog: pytest.LogCaptureFixture
) -> None:
    require_dcmtk("echoscu")
    with caplog.at_level(logging.WARNING, logger="node.dicom.net"):
        result = echoscu(listener.port, NODE_AE, "INTRUDER")
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stderr
    assert any(
        "'INTRUDER'" in r.getMessage() and "allowed_calling_aets" in r.getMessage()
        for r in caplog.records
    )


def test_wrong_called_ae_is_refused(listener: DicomListener) -> None:
    require_dcmtk("echoscu")
    result = echoscu(listener.port, "SOMEONE_ELSE", "ECHOSCU")
    assert result.returncode != 0


def test_storescu_samples_arrive_intact(listener: DicomListener, store: MemoryStore) -> None:
    require_dcmtk("storescu")
    # One storescu run per file, each proposing the file's own transfer syntax.
    paths = sample_paths()
    for path in paths:
        result = storescu([path], listener.port, NODE_AE, extra=[propose_option(path)])
        assert result.returncode == 0, f"{path.name}: {result.stderr}"
    assert len(store.received) == len(paths)
    for path, (data, source) in zip(paths, store.received, strict=True):
        assert source == "STORESCU"
        original = pydicom.dcmread(path)
        stored = pydicom.dcmread(io.BytesIO(data))
        assert stored.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert comparable(stored) == comparable(original), path.name


def test_storescu_generated_series_is_byte_exact(
    listener: DicomListener, store: MemoryStore, tmp_path: Path
) -> None:
    require_dcmtk("storescu")
    files = []
    for index, data in enumerate(generated_ct(5)):
        files.append(tmp_path / f"ct{index}.dcm")
        files[-1].write_bytes(data)
    result = storescu(files, listener.port, NODE_AE)
    assert result.returncode == 0, result.stderr
    sent = {dataset_part(p.read_bytes()) for p in files}
    assert {dataset_part(data) for data, _ in store.received} == sent


def test_our_scu_sends_each_instance_byte_exact(
    listener: DicomListener, store: MemoryStore
) -> None:
    originals = [p.read_bytes() for p in sample_paths()] + generated_ct(3)
    report = send_to_pacs(originals, "127.0.0.1", listener.port, NODE_AE, "RADMESH")
    assert report.ok, report.failed
    assert report.sent == len(originals)
    assert [dataset_part(data) for data, _ in store.received] == [
        dataset_part(data) for data in originals
    ]
    # The reconstructed file meta names the instance's own transfer syntax.
    for (data, _), original in zip(store.received, originals, strict=True):
        got = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta
        want = pydicom.dcmread(io.BytesIO(original), stop_before_pixels=True).file_meta
        assert got.TransferSyntaxUID == want.TransferSyntaxUID
        assert got.MediaStorageSOPInstanceUID == want.MediaStorageSOPInstanceUID


def test_echo_scu(listener: DicomListener) -> None:
    assert echo("127.0.0.1", listener.port, NODE_AE, "ECHOSCU") == 0


def test_echo_scu_refused_raises_peer_error(listener: DicomListener) -> None:
    with pytest.raises(DicomPeerError, match="rejected"):
        echo("127.0.0.1", listener.port, NODE_AE, "INTRUDER")


def _listener_with(store: MemoryStore) -> DicomListener:
    config = DicomConfig(ae_title=NODE_AE, port=0, allowed_calling_aets=ALLOWED)
    return DicomListener(config, store)


def test_store_failure_returns_out_of_resources() -> None:
    with _listener_with(MemoryStore(fail_with=OSError("disk full"))) as failing:
        report = send_to_pacs(generated_ct(1), "127.0.0.1", failing.port, NODE_AE)
    assert [r.status for r in report.results] == [STATUS_OUT_OF_RESOURCES]
    assert not report.ok


def test_store_rejecting_data_returns_cannot_understand() -> None:
    with _listener_with(MemoryStore(fail_with=BadInstanceError("no pixel module"))) as picky:
        report = send_to_pacs(generated_ct(1), "127.0.0.1", picky.port, NODE_AE)
    assert [r.status for r in report.results] == [STATUS_CANNOT_UNDERSTAND]


def test_undecodable_dataset_returns_cannot_understand(
    listener: DicomListener, store: MemoryStore
) -> None:
    good = generated_ct(1)[0]
    # Keep the file meta, replace the data set by an element claiming 4 GiB.
    meta_end = len(good) - len(dataset_part(good))
    broken = good[:meta_end] + b"\x08\x00\x20\x00DA\x08\x0020240101" + b"\x10\x00\x10\x00PN\xff\xff"
    report = send_to_pacs([broken], "127.0.0.1", listener.port, NODE_AE)
    assert [r.status for r in report.results] == [STATUS_CANNOT_UNDERSTAND]
    assert store.received == []


def test_send_to_dcmtk_storescp_delivers_every_instance(tmp_path: Path) -> None:
    originals = generated_ct(4)
    with storescp(tmp_path / "scp") as scp:
        report = send_to_pacs(originals, "127.0.0.1", scp.port, scp.ae_title, "RADMESH")
        assert report.ok, report.failed
        received = [pydicom.dcmread(p) for p in scp.files()]
    by_uid = {str(ds.SOPInstanceUID): ds for ds in received}
    for data in originals:
        ds = pydicom.dcmread(io.BytesIO(data))
        assert by_uid[str(ds.SOPInstanceUID)].PixelData == ds.PixelData


def test_empty_allow_list_refuses_to_start() -> None:
    config = DicomConfig(ae_title=NODE_AE, port=0, allowed_calling_aets=[])
    with pytest.raises(DicomNetError, match="allowed_calling_aets"):
        DicomListener(config, MemoryStore()).start()


def test_stop_releases_the_port() -> None:
    listener = _listener_with(MemoryStore())
    listener.start()
    port = listener.port
    listener.stop()
    with pytest.raises(DicomPeerError):
        echo("127.0.0.1", port, NODE_AE, timeout=2)


def test_free_ports_are_distinct_while_picked_together() -> None:
    # Orthanc once got the same port for HTTP and DICOM (two picks, each released
    # before the next) and refused to start: the picks hold their sockets until all are made.
    from node.dicom.pacs import free_ports

    ports = free_ports(64)
    assert len(set(ports)) == 64
