"""The TUI tests' shared state: none between tests."""

from __future__ import annotations

import pytest

from tui import graphics


@pytest.fixture(autouse=True)
def _graphics_chosen_per_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """`radmesh tui` decides the graphics mode once per process (tui.graphics.setup); a test
    that runs it must neither see another test's choice nor leave its own behind, whichever
    order the tests run in."""
    monkeypatch.setattr(graphics, "_chosen", None)
