"""Current and prior side by side, linked by slice position (tui.linking, the compare
screen), on a real NodeRuntime's store."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path

import pydicom
import pytest

from node.app.runtime import NodeRuntime
from tests.consult.test_live import start_node
from tests.dcmtk import generated_ct
from tests.tui.pilots import press
from tui.app import RadmeshApp
from tui.facade import SeriesInfo, StudyInfo
from tui.linking import linked_index, nearest, slice_location
from tui.node_facade import RuntimeNode
from tui.screens.compare import CompareScreen, matching_series, priors_of
from tui.screens.studies import StudiesScreen

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def test_slice_location_is_the_position_along_the_normal() -> None:
    assert slice_location((10.0, 20.0, -35.5), AXIAL) == pytest.approx(-35.5)
    assert slice_location((10.0, 42.0, -35.5), CORONAL) == pytest.approx(42.0)
    assert slice_location((1.0, 2.0, 3.0), None) is None
    assert slice_location((1.0, 2.0, 3.0), (0, 0, 0, 0, 0, 0)) is None  # degenerate


def test_the_prior_follows_by_location_not_index() -> None:
    current = [0.0, 5.0, 10.0, 15.0]
    prior = [14.0, 11.0, 8.0, 5.0, 2.0]  # other spacing, other order
    assert [linked_index(current, prior, i) for i in range(4)] == [4, 3, 1, 0]
    assert linked_index(current, prior, 1, offset=3.0) == 2  # "these are the same level"
    assert linked_index([None, 1.0], prior, 0) is None
    assert nearest([None, None], 3.0) is None


def _study(label: str, uid: str, date: str) -> StudyInfo:
    return StudyInfo(uid, label, date, "CT HEAD", "CT", 1, 10)


def test_priors_are_earlier_studies_of_the_same_patient_most_recent_first() -> None:
    now = _study("PATIENT-0001", "1", "20261120")
    studies = [
        now,
        _study("PATIENT-0001", "2", "20240101"),
        _study("PATIENT-0001", "3", "20250601"),
        _study("PATIENT-0002", "4", "20250601"),
        _study("PATIENT-0001", "5", "20270101"),  # later: not a prior
    ]
    assert [s.study_uid for s in priors_of(studies, now)] == ["3", "2"]


def test_the_priors_series_matches_modality_then_description() -> None:
    def series(modality: str, description: str) -> SeriesInfo:
        return SeriesInfo(description, "s", 1, modality, description, 10)

    prior = [series("CR", "SCOUT"), series("CT", "BONE"), series("CT", "BRAIN")]
    assert matching_series(prior, series("CT", "BRAIN")) == 2
    assert matching_series(prior, series("CT", "SOFT")) == 1
    assert matching_series(prior, series("MR", "T1")) == 0


def _import(runtime: NodeRuntime, date: str, z0: float, step: float, count: int) -> str:
    """A CT study of one patient, slice i at z0 + i*step (axial), instance order reversed."""
    study_uid = ""
    for index, data in enumerate(generated_ct(count)):
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.StudyDate, ds.PatientID = date, "PAT-CMP"
        ds.ImageOrientationPatient = list(AXIAL)
        ds.ImagePositionPatient = [0.0, 0.0, z0 + index * step]
        ds.InstanceNumber = count - index
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        study_uid = runtime.store.add_bytes(buffer.getvalue(), source="test").study_uid
    return study_uid


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[NodeRuntime]:
    runtime = await start_node(tmp_path, "ana")
    yield runtime
    await runtime.stop()


async def test_p_opens_current_and_prior_linked_by_position(node: NodeRuntime) -> None:
    current = _import(node, "20261120", z0=0.0, step=5.0, count=8)  # 0..35 mm
    _import(node, "20250302", z0=1.0, step=2.5, count=12)  # 1..28.5 mm
    app = RadmeshApp(RuntimeNode(node))
    async with app.run_test(size=(160, 45)) as pilot:
        await press(pilot, "f3")
        studies = app.screen
        assert isinstance(studies, StudiesScreen)
        studies.query_one("#studies").move_cursor(  # type: ignore[attr-defined]
            row=[s.study_uid for s in studies.studies].index(current)
        )
        await press(pilot, "p")
        screen = app.screen
        assert isinstance(screen, CompareScreen)

        def prior_z() -> float | None:
            return screen.prior.slices[screen.prior.index].location

        def current_z() -> float | None:
            return screen.current.slices[screen.current.index].location

        for _ in range(3):
            await press(pilot, "j")
            here, there = current_z(), prior_z()
            assert here is not None
            assert there is not None
            assert abs(there - here) <= 1.25  # the nearest prior slice, by position
        start = screen.prior.index
        await pilot.press("o")  # take the two on screen as one level, then step
        await press(pilot, "k")
        assert screen.prior.index != start
        await press(pilot, "t")
        assert screen.query_one("#pane-current").has_class("hidden")
        await press(pilot, "v")  # no report for the prior on this node: says so
        assert any("no report" in str(n.message) for n in app._notifications)
        text = app.export_screenshot()
        assert "PRIOR" in text
        assert "2025" in text  # the prior's date on its label


async def test_p_without_a_prior_says_so(node: NodeRuntime) -> None:
    _import(node, "20261120", z0=0.0, step=5.0, count=3)
    app = RadmeshApp(RuntimeNode(node))
    async with app.run_test(size=(120, 40)) as pilot:
        await press(pilot, "f3")
        await press(pilot, "p")
        assert not isinstance(app.screen, CompareScreen)
        assert any("no earlier study" in str(n.message) for n in app._notifications)


async def test_the_share_form_offers_the_patients_earlier_studies(node: NodeRuntime) -> None:
    from textual.widgets import Checkbox

    from tui.screens.share import ShareScreen

    current = _import(node, "20261120", z0=0.0, step=5.0, count=2)
    app = RadmeshApp(RuntimeNode(node))
    async with app.run_test(size=(160, 50)) as pilot:
        await press(pilot, "f3")
        studies = app.screen
        assert isinstance(studies, StudiesScreen)
        await press(pilot, "s")
        assert isinstance(app.screen, ShareScreen)
        assert not app.screen.query("#priors")  # nothing earlier: nothing offered
        await press(pilot, "escape")
        _import(node, "20250302", z0=0.0, step=5.0, count=2)
        studies.reload()
        row = [s.study_uid for s in studies.studies].index(current)
        studies.query_one("#studies").move_cursor(row=row)  # type: ignore[attr-defined]
        await press(pilot, "s")
        box = app.screen.query_one("#priors", Checkbox)
        assert "1 earlier" in str(box.label)
