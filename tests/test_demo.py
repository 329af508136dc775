"""The headless demo runs the whole clinical loop and says so; a failure exits non-zero."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from node.app import workflow
from node.demo import story as demo


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


async def test_interactive_demo_starts_with_the_request_waiting_in_the_worklist(
    tmp_path: Path,
) -> None:
    import asyncio

    from tui.node_facade import RuntimeNode

    net = demo.DemoNetwork(tmp_path / "demo", io.StringIO())
    try:
        await net.start(with_pacs=False)
        requested = await demo.send_request(net, slices=2, rows=64)
        neurorad = net.nodes[demo.NEURORAD.key]
        facade = RuntimeNode(neurorad)
        [item] = facade.consults()
        assert (item.incoming, item.priority, item.state) == (True, "stat", "requested")
        surgeon = asyncio.create_task(
            demo.surgeon_when_ready(net, requested, 64, within=30, moves=3, period=0.01)
        )
        # The surgeon joins once the study is at the neuroradiologist: it is not (no accept).
        assert not neurorad.store.instances(requested.shared_study_uid)
        assert not surgeon.done()
        assert not neurorad.live_hub().sessions  # nobody joins before the person accepts
        await facade.respond(item.consult_id, True)
        await demo.wait_until(lambda: facade.consults()[0].state == "accepted", "accepted")
        facade.fetch(item.consult_id)
        await asyncio.wait_for(surgeon, 30)
        surgeon_node = net.nodes[demo.NEUROSURG.key]
        assert item.consult_id in surgeon_node.live_hub().sessions
        assert facade.open_session(requested.shared_study_uid) is not None
    finally:
        await net.stop()
