"""The headless demo runs the whole clinical loop and says so; a failure exits non-zero."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from node import demo, workflow


@pytest.mark.slow
async def test_headless_demo_runs_the_whole_loop(tmp_path: Path) -> None:
    out = io.StringIO()
    code = await demo.run_headless(tmp_path / "demo", slices=6, rows=128, out=out)
    text = out.getvalue()
    assert code == 0, text
    for step in (
        "STAT consult request",
        "pull the study over WebRTC",
        "live session: both annotate",
        "sign the report",
        "demo complete",
    ):
        assert step in text
    assert "FAILED" not in text


async def test_headless_demo_reports_a_failing_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken_fetch(*args: object, **kwargs: object) -> object:
        raise demo.DemoFailed("the transfer broke")

    monkeypatch.setattr(workflow, "fetch_study", broken_fetch)
    out = io.StringIO()
    code = await demo.run_headless(tmp_path / "demo", slices=2, rows=64, with_pacs=False, out=out)
    assert code == 1
    assert "FAILED: the transfer broke" in out.getvalue()
