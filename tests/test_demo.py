"""The headless demo runs the whole clinical loop and says so; a failure exits non-zero."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from consult.shared import AnnotationKind
from node.app.studies import StudyDesk
from node.demo import story as demo
from node.demo.phantom import HAEMATOMA, head_hu
from tests.consult.test_live import wait_for


@pytest.mark.slow
async def test_headless_demo_runs_the_whole_loop(tmp_path: Path) -> None:
    out = io.StringIO()
    code = await demo.run_headless(tmp_path / "demo", slices=6, rows=128, out=out)
    text = out.getvalue()
    assert code == 0, text
    for step in (
        "STAT consult request",
        "pull the study over WebRTC",
        "the neurosurgeon's view follows: slice",
        "live session: both annotate",
        "sign the report",
        "demo complete",
    ):
        assert step in text
    assert "FAILED" not in text
    # The case in a few lines at the end: what was asked, measured, reported, for whom.
    case = text.split("\nThe case:\n", 1)[1]
    assert f"Question (STAT): {demo.QUESTION}" in case
    assert "Measurement: SDH thickness" in case
    assert "Finding: Crescentic hyperdense" in case
    assert "Impression: Acute left convexity subdural haematoma" in case
    assert "filed at the hospital under MURPHY^BRIDGET (ID SB4471093, sex F)" in case
    assert "the consultant saw only ANON^" in case
    assert "MURPHY" not in text.split("\nThe case:\n", 1)[0]  # only the hospital re-identifies


@pytest.mark.slow
async def test_the_story_holds_together_for_a_radiologist(tmp_path: Path) -> None:
    """The woman of the question is a woman in the DICOM; the thickness measured is the
    collection's; the surgeon's arrow points at it; the surgeon follows the presenter."""
    rows = 128
    net = demo.DemoNetwork(tmp_path / "demo", io.StringIO())
    try:
        await net.start(with_pacs=False)
        staged = await demo.stage(net, slices=6, rows=rows)
        await demo.finish(net, staged, rows=rows)
        rural = net.nodes[demo.RURAL.key]
        names = {s.study_uid: s.patient_name for s in rural.store.studies()}
        assert names == {
            demo.STUDY.study_uid: "MURPHY^BRIDGET",
            demo.PRIOR.study_uid: "MURPHY^BRIDGET",
        }
        # The prior went with the consult, under the study's pseudonymous patient.
        neuro = net.nodes[demo.NEURORAD.key]
        [prior] = neuro.consults.get(staged.consult_id).request.priors
        shared = neuro.consults.get(staged.consult_id).request.study_uid
        assert neuro.store.study(prior).patient_id == neuro.store.study(shared).patient_id
        assert neuro.store.study(prior).patient_name != "MURPHY^BRIDGET"
        assert demo.PATIENT.sex == "F"
        assert "84F" in demo.QUESTION
        chat = " ".join(m.text for m in staged.surgeon.chat())
        assert " her " in chat
        assert " him " not in chat
        hu = head_hu(rows, staged.middle_z, noise=0.0)
        marks = {a.kind: a for a in staged.neuroradiologist.annotations()}
        (c0, r0), (c1, r1) = marks[AnnotationKind.LENGTH].points
        thickness = marks[AnnotationKind.LENGTH].values["length_mm"]
        assert thickness == pytest.approx(HAEMATOMA.thickest_mm, abs=1.0)
        middle = hu[round((r0 + r1) / 2), round((c0 + c1) / 2)]
        assert middle == HAEMATOMA.hu  # measured across the collection, not the brain
        tail, head = marks[AnnotationKind.ARROW].points
        assert hu[round(head[1]), round(head[0])] == HAEMATOMA.hu  # the arrow's head is on it
        assert hu[round(tail[1]), round(tail[0])] < 50  # and it comes from the brain
        # A loaded machine can stall a connection past its heartbeat: the surgeon, dropped
        # from the presence, is heard again at the next heartbeat after the reconnection.
        await wait_for(
            lambda: demo.NEUROSURG.name in {p.name for p in staged.neuroradiologist.participants()},
            20,
        )
        surgeon = {p.name: p for p in staged.neuroradiologist.participants()}
        assert surgeon[demo.NEUROSURG.name].following
        assert surgeon[demo.NEURORAD.name].presenting
    finally:
        await net.stop()


async def test_headless_demo_reports_a_failing_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken_fetch(*args: object, **kwargs: object) -> object:
        raise demo.DemoFailed("the transfer broke")

    monkeypatch.setattr(StudyDesk, "fetch", broken_fetch)
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
