"""The TUI on a real NodeRuntime: studies from its store, a live session with a remote node."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pydicom
import pytest

from consult.measure import PixelSpacing, length_mm
from consult.presence import Cursor
from consult.shared import AnnotationKind
from node.demo_data import generate_ct, random_study
from node.runtime import NodeRuntime
from tests.consult.test_live import introduce, start_node, wait_for
from tui.app import RadmeshApp
from tui.node_facade import LiveSessionView, RuntimeNode
from tui.screens.viewer import ViewerScreen
from tui.widgets.consult_panel import ConsultPanel
from tui.widgets.image_view import ImageView

SIZE = (150, 45)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[NodeRuntime]:
    runtime = await start_node(tmp_path, "ana")
    yield runtime
    await runtime.stop()


def import_ct(runtime: NodeRuntime, root: Path, slices: int = 4) -> list[Path]:
    paths = generate_ct(root / "ct", slices=slices, rows=64, study=random_study(3))
    for path in paths:
        runtime.store.add_file(path, source="test")
    return paths


def svg_text(app: RadmeshApp) -> str:
    return app.export_screenshot().replace("&#160;", " ")


async def test_the_facade_reads_studies_and_frames_from_the_store(
    node: NodeRuntime, tmp_path: Path
) -> None:
    paths = import_ct(node, tmp_path)
    facade = RuntimeNode(node)
    [study] = facade.studies()
    assert study.instance_count == len(paths)
    assert study.patient.startswith("PATIENT-")
    real = pydicom.dcmread(paths[1])
    assert str(real.PatientName) not in study.patient
    [series] = facade.series(study.study_uid)
    refs = facade.instances(series.series_uid)
    assert [r.sop_uid for r in refs] == [str(pydicom.dcmread(p).SOPInstanceUID) for p in paths]
    frame = await asyncio.to_thread(facade.load_frame, str(real.SOPInstanceUID))
    assert frame is not None
    assert np.array_equal(frame.pixels, real.pixel_array)
    assert frame.intercept == float(real.RescaleIntercept)
    assert frame.has_spacing
    assert frame.spacing == tuple(float(v) for v in real.PixelSpacing)
    assert facade.load_frame("2.25.999") is None


async def test_the_app_lists_a_stored_study_and_opens_it_in_the_viewer(
    node: NodeRuntime, tmp_path: Path
) -> None:
    import_ct(node, tmp_path)
    app = RadmeshApp(RuntimeNode(node))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert str(node.identity.node_id)[:7] in svg_text(app)
        await pilot.press("f3")
        await pilot.pause()
        assert "PATIENT-0001" in svg_text(app)
        await pilot.press("enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert isinstance(app.screen, ViewerScreen)
        assert app.screen.query_one(ImageView).frame is not None
        assert "Im 1/4" in svg_text(app)


async def test_a_remote_participants_annotation_and_cursor_appear_in_the_tui(
    node: NodeRuntime, tmp_path: Path
) -> None:
    paths = import_ct(node, tmp_path)
    remote = await start_node(tmp_path, "ben")
    try:
        introduce([node, remote])
        facade = RuntimeNode(node)
        study = facade.studies()[0]
        app = RadmeshApp(facade)
        async with app.run_test(size=SIZE) as pilot:
            screen = ViewerScreen(facade, study, live=True)
            await app.push_screen(screen)
            await app.workers.wait_for_complete()
            await pilot.pause()
            session = screen.session
            assert isinstance(session, LiveSessionView)
            await node.live_hub().invite(session.consult_id, remote.identity.public_key)
            theirs = remote.live_hub().sessions[session.consult_id]
            assert theirs.study_uid == study.study_uid

            sop = str(pydicom.dcmread(paths[0]).SOPInstanceUID)
            mm = length_mm((5, 5), (25, 5), PixelSpacing(0.5, 0.5))
            drawn = theirs.add_annotation(
                AnnotationKind.LENGTH, sop, 0, ((5, 5), (25, 5)), values={"length_mm": mm}
            )
            theirs.say("see the crescent on the left")
            theirs.move_cursor(Cursor(sop, 0, 30.0, 20.0))
            await wait_for(lambda: [a.id for a in session.annotations()] == [drawn.id])
            await wait_for(
                lambda: any(p.cursor == Cursor(sop, 0, 30.0, 20.0) for p in session.participants())
            )
            await pilot.pause()
            shown = svg_text(app)
            assert "ben" in shown
            assert "10.0 mm" in shown or "10.00 mm" in shown
            assert "see the crescent on the left" in shown
            panel = screen.query_one(ConsultPanel)
            assert panel.session is session
            # ...and what the TUI types reaches the remote node.
            session.say("agreed, subdural")
            await wait_for(lambda: [m.text for m in theirs.chat()][-1:] == ["agreed, subdural"])
    finally:
        await remote.stop()
