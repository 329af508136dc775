"""The TUI attached to a node that runs headless in another process (tui.remote): a real
`radmesh node run` subprocess on a home, and the app on the same home."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest

from node.app import control
from node.cli import main
from node.cli.tui import NodeChild, NodeStartFailed, node_running
from node.core.config import NodeHome
from node.demo.phantom import generate_ct
from tests.tui.pilots import press
from tui.app import RadmeshApp
from tui.facade import ActionError, ConsultItem, Frame, NodeStatus
from tui.imaging import Window
from tui.remote import OPERATION, RemoteNode, decode, encode
from tui.screens.viewer import ViewerScreen

STARTUP_SECONDS = 60.0


def test_facade_values_cross_as_msgpack_and_come_back_equal() -> None:
    pixels = np.arange(12, dtype=np.int16).reshape(3, 4)
    frame = Frame(pixels, 1.0, -1024.0, (0.5, 0.5), True, (1.0, 2.0, 3.0), None, Window(40, 80))
    back = decode(encode(frame))
    assert isinstance(back, Frame)
    assert np.array_equal(back.pixels, pixels)
    assert back.pixels.dtype == np.int16
    assert back.window == Window(40, 80)
    assert back.origin == (1.0, 2.0, 3.0)
    item = ConsultItem("c" * 32, True, "q", "ABCDEFG", "stat", "offered", 1.0)
    assert decode(encode([item])) == [item]
    status = NodeStatus("id", "name", "inst", (("registry", "up", True),))
    assert decode(encode(status)).lines[0][1] == "up"


@pytest.fixture(scope="module")
def running_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeHome, list[Path]]]:
    """One headless node for the module: the tests below only read from it."""
    tmp_path = tmp_path_factory.mktemp("remote")
    root = tmp_path / "home"
    init = ["init", "--name", "Night Node", "--country", "IE", "--no-passphrase", "--no-mdns"]
    assert main(["--home", str(root), *init]) == 0
    # 1024² slices: one frame (2 MiB) is larger than a command's answer may be
    files = generate_ct(tmp_path / "ct", slices=3, rows=1024)
    assert main(["--home", str(root), "import", str(tmp_path / "ct")]) == 0
    node = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "--home", str(root), "node", "run"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    home = NodeHome(root)
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:  # until the headless node answers the TUI's operation
            try:
                running, _ = asyncio.run(
                    control.ask(home, OPERATION, {"method": "status", "args": []}, print)
                )
            except control.ControlError:
                running = False
            if running:
                break
            assert node.poll() is None, "the headless node exited"
            assert time.monotonic() < deadline, "the headless node did not start"
            time.sleep(0.2)
        yield home, files
    finally:
        node.terminate()
        node.wait(20)


@pytest.mark.slow
def test_the_facade_reads_the_running_nodes_store(
    running_home: tuple[NodeHome, list[Path]],
) -> None:
    home, files = running_home
    node = RemoteNode(home)
    try:
        assert "attached through its control socket" in str(node.status().lines)
        [study] = node.studies()
        assert study.instance_count == 3
        [series] = node.series(study.study_uid)
        refs = node.instances(series.series_uid)
        frame = node.load_frame(refs[0].sop_uid)
        assert frame is not None
        original = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in files}
        assert np.array_equal(frame.pixels, pydicom.dcmread(original[refs[0].sop_uid]).pixel_array)
        assert node.consults() == []
        with pytest.raises(ActionError, match="no consult request"):  # as the node said it
            node.fetch("0" * 32)
    finally:
        node.close()


@pytest.mark.slow
async def test_the_app_on_the_running_node_opens_a_study(
    running_home: tuple[NodeHome, list[Path]],
) -> None:
    home, _ = running_home
    node = RemoteNode(home)
    try:
        app = RadmeshApp(node)
        async with app.run_test(size=(140, 42)) as pilot:
            await pilot.pause()
            await press(pilot, "f3")
            await pilot.press("enter")
            viewer = app.screen
            assert isinstance(viewer, ViewerScreen)
            deadline = asyncio.get_running_loop().time() + 30
            while viewer.view.frame is None:  # the frame came through the control socket
                assert asyncio.get_running_loop().time() < deadline, "no frame arrived"
                await pilot.pause(0.1)
    finally:
        node.close()


@pytest.mark.slow
def test_radmesh_tui_on_a_running_home_attaches_instead_of_refusing(
    running_home: tuple[NodeHome, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    home, _ = running_home
    opened: list[str] = []
    monkeypatch.setattr(RadmeshApp, "run", lambda self: opened.append(type(self.node).__name__))
    assert main(["--home", str(home.root), "tui"]) == 0
    assert opened == ["RemoteNode"]
    assert node_running(home)  # the user's own node: left running


@pytest.mark.slow
def test_radmesh_tui_runs_its_node_as_a_child_and_stops_it_on_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "home"
    init = ["init", "--name", "Day Node", "--country", "IE", "--no-passphrase", "--no-mdns"]
    assert main(["--home", str(root), *init]) == 0
    home = NodeHome(root)
    seen: list[tuple[str, bool, int]] = []

    def run(app: RadmeshApp) -> None:  # what the app would see, while it would run
        node = app.node
        assert isinstance(node, RemoteNode)
        seen.append((node.status().display_name, node_running(home), os.getpid()))

    monkeypatch.setattr(RadmeshApp, "run", run)
    assert main(["--home", str(root), "tui"]) == 0
    assert seen == [("Day Node", True, os.getpid())]  # the app here, the node elsewhere
    assert not node_running(home)  # stopped with the app
    assert "running" in (home.data_dir / "tui-node.log").read_text()


@pytest.mark.slow
def test_a_child_node_that_cannot_start_is_an_error_naming_its_log(tmp_path: Path) -> None:
    root = tmp_path / "home"
    assert main(["--home", str(root), "init", "--name", "X", "--no-passphrase"]) == 0
    home = NodeHome(root)
    with pytest.raises(NodeStartFailed, match=r"exited with code \d+; see .*tui-node\.log"):
        NodeChild.start(home, ["--home", str(root), "no-such-command"])


@pytest.mark.slow
def test_a_call_after_the_child_node_died_says_what_to_do(tmp_path: Path) -> None:
    root = tmp_path / "home"
    assert main(["--home", str(root), "init", "--name", "X", "--no-passphrase", "--no-mdns"]) == 0
    home = NodeHome(root)
    child = NodeChild.start(home, ["--home", str(root), "node", "run", "--no-mdns"])
    node = RemoteNode(home, stopped=child.exited)
    try:
        assert node.status().display_name == "X"
        child.process.kill()
        child.process.wait(10)
        with pytest.raises(ActionError, match=r"exited with code -9.*ctrl\+q.*radmesh tui"):
            node.fetch("0" * 32)  # an action says what happened
        assert node.studies() == []  # a read is empty: the screens stay up
        assert "exited with code -9" in str(node.status().lines)
    finally:
        node.close()
        child.stop()
