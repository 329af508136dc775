"""Attacks on the DICOM side: the node's listener (sizes, who may send) and the demo's
local PACS (an orphan Orthanc left listening)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import pytest

from node.app.runtime import NodeRuntime
from node.core.config import DicomConfig
from node.dicom import pacs
from node.dicom.guard import A_ABORT, AllowList, AllowListError, OverCap, PduMeter
from node.dicom.net import DicomListener
from node.dicom.sealed_spool import SpoolCorrupted, SpoolReader, SpoolWriter, new_key
from tests.dcmtk import dataset_part, generated_ct, require_dcmtk, storescu
from tests.node.test_runtime import FAST, make_home
from tests.orthanc import require_orthanc

ROOT = Path(__file__).resolve().parents[2]
WAIT = 20.0

# -- the demo's Orthanc ---------------------------------------------------------------------

_LAUNCHER = """
import sys, time
from pathlib import Path
from node.dicom import pacs
from node.core.config import DicomConfig
from node.dicom.guard import A_ABORT, AllowList, AllowListError, OverCap, PduMeter
from node.dicom.net import DicomListener
with pacs.orthanc_server(Path(sys.argv[1])) as server:
    print(server.process.pid, server.dicom_port, flush=True)
    time.sleep(600)
"""


def _gone(pid: int) -> bool:
    """No such process, or a zombie (dead, only waiting for its reaper)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return "\nState:\tZ" in status


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGKILL], ids=["hangup", "kill"])
def test_orthanc_dies_with_the_process_that_started_it(tmp_path: Path, sig: int) -> None:
    require_orthanc()
    launcher = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER, str(tmp_path / "pacs")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert launcher.stdout is not None
    line = launcher.stdout.readline()
    assert line, "the launcher did not start Orthanc"
    pid, port = (int(n) for n in line.split())
    try:
        assert _listening(port)
        launcher.send_signal(sig)  # a terminal closed under `make demo`, or a kill -9
        launcher.wait(timeout=WAIT)
        deadline = time.monotonic() + WAIT
        while not _gone(pid) or _listening(port):  # its threads exit after the leader
            assert time.monotonic() < deadline, "Orthanc outlived the process that started it"
            time.sleep(0.05)
    finally:
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_orthanc_takes_instances_from_this_machine_only(tmp_path: Path) -> None:
    require_orthanc()
    with pacs.orthanc_server(tmp_path / "pacs", modalities={"node": ("RADMESH", "::1", 104)}):
        config = json.loads((tmp_path / "pacs" / "orthanc.json").read_text())
    assert config["RemoteAccessAllowed"] is False  # HTTP: loopback only
    assert config["DicomCheckModalityHost"] is True
    assert not any(config[f"DicomAlwaysAllow{verb}"] for verb in ("Find", "Get", "Move"))
    (script,) = config["LuaScripts"]
    assert 'ip == "127.0.0.1"' in Path(script).read_text()  # C-STORE from elsewhere refused
    with (
        pytest.raises(pacs.PacsUnavailable, match="not on loopback"),
        pacs.orthanc_server(tmp_path / "p2", modalities={"x": ("PACS", "10.0.0.5", 104)}),
    ):
        pass


# -- the node's DICOM listener ---------------------------------------------------------------

NODE_AE = "RADMESH_T"
CAP = 8 * 1024 * 1024

# The listener alone in a process, so its peak memory (VmHWM) is its own. Prints its port,
# then "stored <uid>" per instance; stdin: "hwm" -> peak RSS in KiB, "stats" -> aborted
# associations and spooled files left.
_LISTENER = """
import sys
from pathlib import Path
from node.core.config import DicomConfig
from node.dicom.net import DicomListener

spool = Path(sys.argv[2])
def stored(data, calling):
    print("stored", len(data), flush=True)

config = DicomConfig(ae_title="RADMESH_T", host="127.0.0.1", port=0,
                     allowed_calling_aets=["STORESCU"])
kwargs = {"spool_dir": spool} if "spool_dir" in DicomListener.__init__.__code__.co_varnames else {}
with DicomListener(config, stored, max_instance_bytes=int(sys.argv[1]), **kwargs) as listener:
    print(listener.port, flush=True)
    for line in sys.stdin:
        if line.strip() == "hwm":
            status = Path("/proc/self/status").read_text()
            print(next(l.split()[1] for l in status.splitlines() if l.startswith("VmHWM")),
                  flush=True)
        elif line.strip() == "stats":
            left = len(list(spool.glob("rx-*"))) if spool.exists() else 0
            print(getattr(listener, "over_cap", -1), left, flush=True)
"""


def _big_ct(path: Path, rows: int, columns: int) -> Path:
    """One CT image of rows x columns 16-bit pixels (a 96 MiB instance at 6144 x 8192)."""
    import numpy as np
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "Big^Instance", "P9", "CT"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = np.zeros((rows, columns), dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    del ds
    pydicom.dcmread(path, stop_before_pixels=True)  # it is a readable instance
    return path


class _ListenerProcess:
    def __init__(self, cap: int, spool: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LISTENER, str(cap), str(spool)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.stored: list[str] = []
        self.port = int(self._line())

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "the listener process died"
        return line.strip()

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        while (line := self._line()).startswith("stored"):
            self.stored.append(line)
        return line

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=WAIT)


def test_an_instance_over_the_cap_is_aborted_as_it_streams_and_memory_stays_bounded(
    tmp_path: Path,
) -> None:

    require_dcmtk("storescu")
    big = _big_ct(tmp_path / "big.dcm", 6144, 8192)
    canary = tmp_path / "canary.dcm"
    canary.write_bytes(generated_ct(1)[0])
    spool = tmp_path / "incoming"
    listener = _ListenerProcess(CAP, spool)
    try:
        before = int(listener.ask("hwm"))
        sent = storescu([big], listener.port, NODE_AE)
        assert sent.returncode != 0  # cut off mid-send
        assert "Store Failed" in sent.stderr
        peak = int(listener.ask("hwm"))
        done = storescu([canary], listener.port, NODE_AE)  # the same listener still serves
        assert done.returncode == 0, done.stderr
        deadline = time.monotonic() + WAIT
        while True:
            aborted, left = (int(n) for n in listener.ask("stats").split())
            if listener.stored and left == 0:
                break
            assert time.monotonic() < deadline, f"stored {listener.stored}, {left} spooled left"
            time.sleep(0.05)
    finally:
        listener.close()
    assert aborted == 1  # the big one, cut off at the cap
    assert len(listener.stored) == 1  # only the canary
    grown_mib = (peak - before) / 1024
    assert grown_mib < 32, f"the listener grew by {grown_mib:.0f} MiB for a refused 96 MiB"


def _collecting_listener(**config: object) -> tuple[DicomListener, list[str]]:
    got: list[str] = []
    settings = DicomConfig(ae_title=NODE_AE, host="127.0.0.1", port=0, **config)  # type: ignore[arg-type]
    return DicomListener(settings, lambda data, calling: got.append(calling)), got


def test_an_allowed_ae_title_from_another_address_is_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:

    require_dcmtk("storescu")
    listener, got = _collecting_listener(
        allowed=["STORESCU@10.0.0.5", "CANARY@127.0.0.1", "ANYWHERE@::1"]
    )
    with listener, tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ct.dcm"
        path.write_bytes(generated_ct(1)[0])
        with caplog.at_level(logging.WARNING, logger="node.dicom.net"):
            refused = storescu([path], listener.port, NODE_AE, calling_ae="STORESCU")
        assert refused.returncode != 0
        assert "Association Rejected" in refused.stderr + refused.stdout
        assert "only from 10.0.0.5; add STORESCU@127.0.0.1" in caplog.text
        canary = storescu([path], listener.port, NODE_AE, calling_ae="CANARY")
        assert canary.returncode == 0, canary.stderr
    assert got == ["CANARY"]  # the same AE logic let the right address in


def test_allow_list_entries_must_name_an_ae_and_an_ip_address() -> None:
    for bad in ("PACS", "PACS@pacs.example.org", "@10.0.0.5", "A_TITLE_OF_17_CHAR@10.0.0.5"):
        with pytest.raises(AllowListError, match=r"is not AE@address.*PACS@10\.0\.0\.5"):
            _collecting_listener(allowed=[bad])
    allow = AllowList.parse(["ANY"], ["PACS@10.0.0.5", "V6@::1"])
    assert allow.allows("ANY", "192.0.2.7")
    assert allow.allows("PACS", "10.0.0.5")
    assert allow.allows("PACS", "::ffff:10.0.0.5")
    assert not allow.allows("PACS", "10.0.0.6")
    assert not allow.allows("OTHER", "10.0.0.5")
    assert allow.allows("V6", "::1")


def test_a_pdu_header_claiming_gigabytes_closes_the_connection_unread() -> None:
    listener, got = _collecting_listener(allowed_calling_aets=["STORESCU"])
    with listener, socket.create_connection(("127.0.0.1", listener.port), timeout=WAIT) as conn:
        # an A-ASSOCIATE-RQ header announcing a 2 GiB body, and the first bytes of it
        conn.sendall(bytes([0x01, 0x00]) + (2**31).to_bytes(4, "big") + b"\x00" * 1024)
        answer = b""
        while chunk := conn.recv(65536):  # closed by the listener, not by a timeout
            answer += chunk
    assert answer == A_ABORT
    assert listener.over_cap == 1
    assert got == []


def test_pdu_meter_counts_data_set_fragments_across_pdus() -> None:
    meter = PduMeter(max_pdu=1024, max_instance=100)

    def p_data(*pdvs: tuple[int, bytes]) -> bytes:
        body = b"".join(
            (len(data) + 2).to_bytes(4, "big") + bytes([1, control]) + data
            for control, data in pdvs
        )
        meter.header(bytes([0x04, 0]) + len(body).to_bytes(4, "big"))
        return body

    meter.body(p_data((0x03, b"c" * 50)))  # a command set: not counted
    meter.body(p_data((0x00, b"d" * 60)))
    assert meter.data_set == 60
    with pytest.raises(OverCap, match="more than 100 bytes"):
        meter.body(p_data((0x02, b"d" * 41)))
    meter.body(p_data((0x03, b"c" * 10)))  # the next message starts from zero
    assert meter.data_set == 0
    with pytest.raises(OverCap, match="a 1025-byte PDU"):
        meter.header(bytes([0x04, 0]) + (1025).to_bytes(4, "big"))


async def test_a_running_node_stores_what_its_pacs_sends_through_its_private_spool(
    tmp_path: Path,
) -> None:
    require_dcmtk("storescu")
    home, identity = make_home(tmp_path, "hospital", "", [])
    config = home.load_config()
    config.dicom.enabled, config.dicom.port = True, 0
    config.dicom.ae_title, config.dicom.allowed = NODE_AE, ["STORESCU@127.0.0.1"]
    path = tmp_path / "ct.dcm"
    path.write_bytes(generated_ct(1)[0])
    node = NodeRuntime(home, identity, config, transport_options=FAST)
    await node.start()
    try:
        assert node.dicom is not None
        sent = await asyncio.to_thread(storescu, [path], node.dicom.port, NODE_AE)
        assert sent.returncode == 0, sent.stderr
        (study,) = node.store.studies()
        (row,) = node.store.instances(study.study_uid)
        stored = node.store.read_instance(row.sop_instance_uid)
        spool = home.data_dir / "incoming"
        assert os.stat(spool).st_mode & 0o777 == 0o700
        assert list(spool.iterdir()) == []  # stored, then deleted
    finally:
        await node.stop()
    assert dataset_part(stored) == dataset_part(path.read_bytes())


def test_doctor_warns_when_ae_titles_alone_admit_senders_from_the_network(tmp_path: Path) -> None:
    from node.cli.doctor import run_checks

    home, _ = make_home(tmp_path, "hospital", "", [])
    config = home.load_config()
    config.dicom.enabled, config.dicom.host = True, "0.0.0.0"
    config.dicom.allowed_calling_aets = ["PACS"]
    home.save_config(config)
    (check,) = [c for c in run_checks(home) if c.name == "DICOM senders"]
    assert not check.ok
    assert "PACS may send from any address" in check.detail
    assert "PACSAE@10.0.0.5" in check.fix
    config.dicom.allowed_calling_aets, config.dicom.allowed = [], ["PACS@10.0.0.5"]
    home.save_config(config)
    (check,) = [c for c in run_checks(home) if c.name == "DICOM senders"]
    assert check.ok


def test_a_received_instance_is_never_in_clear_on_disk(tmp_path: Path) -> None:
    require_dcmtk("storescu")
    original = generated_ct(1)[0]
    path = tmp_path / "ct.dcm"
    path.write_bytes(original)
    spool = tmp_path / "incoming"
    seen: list[tuple[bytes, list[bytes]]] = []

    def sink(stream: IO[bytes], size: int, calling: str) -> None:
        on_disk = [p.read_bytes() for p in spool.iterdir()]  # the file being stored
        seen.append((stream.read(size), on_disk))

    config = DicomConfig(ae_title=NODE_AE, host="127.0.0.1", port=0, allowed=["STORESCU@127.0.0.1"])
    with DicomListener(config, on_stream=sink, spool_dir=spool) as listener:
        sent = storescu([path], listener.port, NODE_AE)
        assert sent.returncode == 0, sent.stderr
    ((received, on_disk),) = seen
    assert dataset_part(received) == dataset_part(original)
    (spooled,) = on_disk
    assert len(spooled) >= len(dataset_part(original))
    for clear in (b"Test^Patient", dataset_part(original)[-4096:]):
        assert clear in received
        assert clear not in spooled
    assert list(spool.iterdir()) == []


def test_a_spool_file_altered_cut_or_read_with_another_key_is_refused(tmp_path: Path) -> None:
    key = new_key()
    writer = SpoolWriter(tmp_path, "rx-", key)
    for piece in (b"\0" * 128, b"DICM", b"x" * 5000, b"y" * 3):  # as pynetdicom writes
        writer.write(piece)
    writer.file.flush()
    writer.close()
    path = Path(writer.name)
    assert os.stat(path).st_mode & 0o777 == 0o600
    with SpoolReader(path, key) as reader:
        assert reader.size == 5135
        reader.seek(132)
        assert reader.read(4) == b"xxxx"
        reader.seek(-3, io.SEEK_END)
        assert reader.read() == b"yyy"
    with pytest.raises(SpoolCorrupted, match="authentication"), SpoolReader(path, new_key()) as r:
        r.read()
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(SpoolCorrupted, match="authentication"), SpoolReader(path, key) as r:
        r.read()
    path.write_bytes(bytes(data[:-10]))
    with pytest.raises(SpoolCorrupted, match="cut short"):
        SpoolReader(path, key)
