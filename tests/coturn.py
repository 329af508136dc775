"""A real coturn (TURN server) on 127.0.0.1 for the tests that relay through one."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from node.core.children import die_with_parent, stop


@dataclass(frozen=True)
class Coturn:
    port: int
    log: Path
    proc: subprocess.Popen[bytes]


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def coturn_server(directory: Path, secret: str, relay_ports: tuple[int, int]) -> Iterator[Coturn]:
    """turnserver with a shared auth secret, relaying on ``relay_ports`` (each test module
    its own range, so two run at once), logging to ``directory``; up once its log says it
    listens. Skips the test where coturn is not installed."""
    binary = shutil.which("turnserver")
    if binary is None:
        pytest.skip("turnserver not found: install the Debian package coturn")
    port = _free_udp_port()
    log = directory / "turn.log"
    proc = subprocess.Popen(
        [
            binary, "-n", "--no-cli", "--no-tls", "--no-dtls",
            "--listening-ip=127.0.0.1", f"--listening-port={port}", "--relay-ip=127.0.0.1",
            f"--min-port={relay_ports[0]}", f"--max-port={relay_ports[1]}",
            "--allow-loopback-peers", "--use-auth-secret", f"--static-auth-secret={secret}",
            "--realm=radmesh.test", f"--pidfile={directory / 'turn.pid'}",
            f"--userdb={directory / 'turn.db'}", f"--log-file={log}", "--simple-log",
            "--no-stdout-log", "--verbose",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent(),  # no orphan server if the test run is killed
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if log.exists() and "listener" in log.read_text(errors="replace").lower():
                break
            if proc.poll() is not None:
                pytest.fail(f"turnserver exited with {proc.returncode}")
            time.sleep(0.1)
        time.sleep(0.3)
        yield Coturn(port, log, proc)
    finally:
        stop(proc, 5)
