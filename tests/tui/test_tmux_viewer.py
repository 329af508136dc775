"""The viewer in a real terminal (tmux) at 80×24 and 200×55 (issue 19 items 4 and 6): the
image takes the width the panels leave, and the overlay's facts and orientation letters
are on screen around it."""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.demo.phantom import generate_ct
from tests.tui.test_tmux import RADMESH, new_home, tmux, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.system,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (Debian package tmux)"),
]


@pytest.fixture
def study(tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    home = new_home(tmp_path)
    generate_ct(tmp_path / "ct", slices=4, rows=64)
    subprocess.run(  # the study in the home's store, as a PACS or `radmesh import` puts it
        [str(RADMESH), "--home", str(home), "import", str(tmp_path / "ct")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    name = f"radmesh-test-{uuid.uuid4().hex[:8]}"
    yield name, home, tmp_path / "ct"
    subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True, timeout=10)


def image_width(screen: str) -> int:
    """Columns between the image's focused (heavy) border corners, borders included."""
    line = next(x for x in screen.splitlines() if "┏" in x and "┓" in x)
    return line.index("┓") - line.index("┏") + 1


@pytest.mark.parametrize(("columns", "rows", "narrowest"), [(80, 24, 76), (200, 55, 160)])
def test_the_viewer_fills_the_terminal_and_shows_its_overlay(
    study: tuple[str, Path, Path], columns: int, rows: int, narrowest: int
) -> None:
    name, home, _ = study
    # COLUMNS/LINES reach the pane from the environment pytest runs in (80 and 24), and the
    # app would take them over the pane's own size.
    radmesh = f"env -u COLUMNS -u LINES {RADMESH} --home {home}"
    command = f"{radmesh} tui --graphics halfblock; sleep 30"
    tmux("new-session", "-d", "-s", name, "-x", str(columns), "-y", str(rows), command)
    wait_for(name, "Tmux Node")
    tmux("send-keys", "-t", name, "F3")
    wait_for(name, "AX HEAD")
    tmux("send-keys", "-t", name, "Enter")
    wait_for(name, "Im 1/4")
    # the slice's own facts (window, zoom, orientation) come with its pixels, which the
    # node sends a moment after the viewer opened on the slice list
    screen = wait_for(name, "zoom 1.00")
    assert image_width(screen) >= narrowest
    for shown in ("PATIENT-0001  M", "Se 2 AX HEAD", "Im 1/4", "SL", "ST ", "W ", "VIEW"):
        assert shown in screen
    lines = screen.splitlines()
    middle = next(x for x in lines if " R┃" in x or x.startswith("R┃"))  # the left edge
    assert middle.rstrip().endswith("┃L")
    assert re.search(r"(^| )W \d+ L .* P( |$)", screen, re.MULTILINE)  # the bottom edge's
    assert re.search(r"PATIENT-0001 .* A ", screen, re.MULTILINE)  # and the top's
    tmux("send-keys", "-t", name, "j")
    assert "Im 2/4" in wait_for(name, "Im 2/4")
