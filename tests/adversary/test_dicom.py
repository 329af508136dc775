"""Attacks on the DICOM side: the node's listener (sizes, who may send) and the demo's
local PACS (an orphan Orthanc left listening)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node import pacs
from tests.orthanc import require_orthanc

ROOT = Path(__file__).resolve().parents[2]
WAIT = 20.0

# -- the demo's Orthanc ---------------------------------------------------------------------

_LAUNCHER = """
import sys, time
from pathlib import Path
from node import pacs
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
