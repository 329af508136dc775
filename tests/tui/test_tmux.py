"""The real `radmesh` executable in a real terminal (tmux): it opens, shows help, quits."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.core.config import NodeHome

RADMESH = Path(sys.executable).with_name("radmesh")
WAIT_SECONDS = 20.0

pytestmark = [
    pytest.mark.slow,
    pytest.mark.system,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (Debian package tmux)"),
]


def tmux(*args: str) -> str:
    return subprocess.run(
        ["tmux", *args], check=True, capture_output=True, text=True, timeout=10
    ).stdout


def wait_for(session: str, text: str) -> str:
    deadline = time.monotonic() + WAIT_SECONDS
    screen = ""
    while time.monotonic() < deadline:
        screen = tmux("capture-pane", "-p", "-t", session)
        if text in screen:
            return screen
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared; screen was:\n{screen}")


def new_home(tmp_path: Path) -> Path:
    """``radmesh init`` of a home named "Tmux Node" under ``tmp_path``."""
    home = tmp_path / "home"
    subprocess.run(
        [str(RADMESH), "--home", str(home), "init", "--name", "Tmux Node", "--no-passphrase"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    # `radmesh` now starts the node: keep it on loopback, no multicast on the host's interfaces.
    node_home = NodeHome(home)
    config = node_home.load_config()
    config.network.listen_host, config.network.mdns = "127.0.0.1", False
    node_home.save_config(config)
    return home


@pytest.fixture
def session(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    home = new_home(tmp_path)
    name = f"radmesh-test-{uuid.uuid4().hex[:8]}"
    yield name, home
    subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True, timeout=10)


def test_radmesh_without_a_command_opens_the_tui_shows_help_and_quits(
    session: tuple[str, Path],
) -> None:
    name, home = session
    marker = home / "exited"
    command = f"{RADMESH} --home {home}; echo $? > {marker}; sleep 30"
    tmux("new-session", "-d", "-s", name, "-x", "120", "-y", "40", command)
    screen = wait_for(name, "Tmux Node")
    assert "Node id:" in screen
    tmux("send-keys", "-t", name, "?")
    screen = wait_for(name, "radmesh — keys")
    assert "mediastinum" in screen
    tmux("send-keys", "-t", name, "q")
    deadline = time.monotonic() + WAIT_SECONDS
    while "radmesh — keys" in tmux("capture-pane", "-p", "-t", name):
        assert time.monotonic() < deadline, "help did not close"
        time.sleep(0.2)
    tmux("send-keys", "-t", name, "C-q")
    deadline = time.monotonic() + WAIT_SECONDS
    while not marker.exists():
        assert time.monotonic() < deadline, "radmesh did not exit on ctrl+q"
        time.sleep(0.2)
    time.sleep(0.2)
    assert marker.read_text().strip() == "0"
