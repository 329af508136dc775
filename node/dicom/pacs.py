"""A local Orthanc PACS (Debian package ``orthanc``) on loopback, for the demo and tests.

``orthanc_server(tmp_path, modalities={...})`` writes a JSON configuration in a
temporary directory (its own storage and index, free HTTP and DICOM ports, no
authentication), starts ``Orthanc``, waits for ``/system`` and always kills it
on exit. Orthanc dies with the process that started it however that ends
(:func:`node.core.children.die_with_parent`), so no orphan keeps accepting data.

Orthanc 1.10 cannot bind one address: its DICOM port listens on every
interface. So only this machine may use it: HTTP is loopback only
(``RemoteAccessAllowed`` false), a Lua filter refuses every received instance
whose sender is not 127.0.0.1 / ::1, and declared modalities must be on
loopback (``DicomCheckModalityHost``); find/get/move stay refused to unknown AEs.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.core.children import die_with_parent, stop
from node.core.errors import NodeError

LOOPBACK = "127.0.0.1"

START_TIMEOUT = 30.0
HTTP_TIMEOUT = 30.0


class PacsUnavailable(NodeError):
    """Orthanc is not installed or did not start."""


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports: every socket is held until all are picked
    (two picks in a row, each released before the next, may get the same port)."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((LOOPBACK, 0))
            ports.append(sock.getsockname()[1])
        return ports


def orthanc_binary() -> str:
    binary = shutil.which("Orthanc")
    if binary is None:
        raise PacsUnavailable("Orthanc not found: install the Debian package orthanc")
    return binary


@dataclass
class Orthanc:
    http_port: int
    dicom_port: int
    ae_title: str
    directory: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    def request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        req = urllib.request.Request(  # noqa: S310 - always http://127.0.0.1
            self.url + path, data=body, method=method
        )
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as response:  # noqa: S310
            data: bytes = response.read()
            return data

    def get_json(self, path: str) -> Any:
        return json.loads(self.request("GET", path))

    def post_json(self, path: str, payload: Any) -> Any:
        return json.loads(self.request("POST", path, json.dumps(payload).encode()))

    def upload(self, part10: bytes) -> str:
        """Store an instance through the REST API; returns Orthanc's instance id."""
        answer = json.loads(self.request("POST", "/instances", part10))
        return str(answer["ID"])

    def instance_ids(self) -> list[str]:
        return [str(i) for i in self.get_json("/instances")]

    def instance_file(self, instance_id: str) -> bytes:
        return self.request("GET", f"/instances/{instance_id}/file")


LOOPBACK_ONLY_LUA = """
function ReceivedInstanceFilter(dicom, origin, info)
  local ip = origin["RemoteIp"]
  return ip == "127.0.0.1" or ip == "::1" or ip == "::ffff:127.0.0.1"
end
"""
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def _config(
    directory: Path,
    http_port: int,
    dicom_port: int,
    ae_title: str,
    modalities: Mapping[str, tuple[str, str, int]],
) -> dict[str, Any]:
    return {
        "Name": "radmesh-test",
        "StorageDirectory": str(directory / "storage"),
        "IndexDirectory": str(directory / "index"),
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": ae_title,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        "DicomCheckModalityHost": True,
        "DicomAlwaysAllowFind": False,
        "DicomAlwaysAllowGet": False,
        "DicomAlwaysAllowMove": False,
        "DicomModalities": {name: list(value) for name, value in modalities.items()},
        "LuaScripts": [str(directory / "loopback-only.lua")],
        "Plugins": [],
        "StorageCompression": False,
        "OverwriteInstances": True,
        "HttpTimeout": 30,
        "DicomScuTimeout": 30,
        "StableAge": 1,
        "ConcurrentJobs": 1,
        "SaveJobs": False,
    }


@contextlib.contextmanager
def orthanc_server(
    directory: Path,
    *,
    ae_title: str = "ORTHANC",
    modalities: Mapping[str, tuple[str, str, int]] | None = None,
) -> Iterator[Orthanc]:
    """Run Orthanc; ``modalities`` maps a name to (AE title, host, port)."""
    binary = orthanc_binary()
    modalities = modalities or {}
    remote = sorted(name for name, (_, host, _) in modalities.items() if host not in LOOPBACK_HOSTS)
    if remote:
        raise PacsUnavailable(f"modalities {remote} are not on loopback: this Orthanc is local")
    directory.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_ports(2)
    config_path = directory / "orthanc.json"
    config = _config(directory, http_port, dicom_port, ae_title, modalities)
    (directory / "loopback-only.lua").write_text(LOOPBACK_ONLY_LUA)
    config_path.write_text(json.dumps(config, indent=2))
    log_path = directory / "orthanc.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(  # noqa: S603 - the Orthanc binary and our own config file
            [binary, "--no-jobs", str(config_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent(),  # prctl only, before exec
            start_new_session=True,  # the terminal's signals go to us; we stop it in order
        )
    server = Orthanc(http_port, dicom_port, ae_title, directory, process)
    try:
        _wait_until_up(server, log_path)
        yield server
    finally:
        stop(process, 15)


def _wait_until_up(server: Orthanc, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise PacsUnavailable(f"Orthanc exited at start: {log_path.read_text()[-2000:]}")
        try:
            server.get_json("/system")
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.1)
            continue
        return
    raise PacsUnavailable(f"Orthanc did not answer /system in {START_TIMEOUT} s")
