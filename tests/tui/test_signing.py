"""Issue 19 item 7: F9 previews what will be signed and asks; Findings and Impression are
separate; templates; accidental duplicate measurements are not sent."""

from __future__ import annotations

from pathlib import Path

from textual.widgets import TextArea

from consult.report_draft import (
    duplicates,
    join_report,
    preview_sections,
    split_report,
    template_for,
)
from consult.shared import Annotation, AnnotationKind
from crypto.identity import Identity
from tests.tui.pilots import open_viewer, press
from tui.app import RadmeshApp
from tui.memory import SERIES_UID, InMemoryNode
from tui.screens.sign_preview import SignPreview

SIZE = (100, 30)  # what the screens do, not their layout: the smallest screen renders fastest
KEYS = {" ": "space", "\n": "enter", ":": "colon", ".": "full_stop"}


def keys(text: str) -> list[str]:
    return [KEYS.get(ch, ch) for ch in text]


def make() -> tuple[InMemoryNode, RadmeshApp]:
    node = InMemoryNode(Identity.generate())
    return node, RadmeshApp(node)


def measure(node: InMemoryNode, x: float, slice_no: int = 3) -> Annotation:
    return node.session.add_annotation(
        AnnotationKind.LENGTH,
        f"{SERIES_UID}.{slice_no}",
        0,
        ((10.0 + x, 10.0), (40.0 + x, 10.0)),
        values={"length_mm": 21.0},
    )


# --- pure ---------------------------------------------------------------------------------


def test_split_report_reads_both_sections_and_round_trips_the_wire_text() -> None:
    text = join_report("No bleed.\nVentricles normal.", "Normal CT head.")
    assert text.startswith("FINDINGS:\n")
    assert split_report(text) == ("No bleed.\nVentricles normal.", "Normal CT head.")
    assert split_report("Findings\nA\nImpression: B\nC") == ("A", "B\nC")
    # No headings: all findings, nothing moved to the impression unasked.
    assert split_report("One.\n\nTwo.") == ("One.\n\nTwo.", "")
    # A sentence that starts with the word is not a heading.
    assert split_report("findings of note none\nIMPRESSION:\nok") == (
        "findings of note none",
        "ok",
    )
    assert split_report("") == ("", "")


def _ann(kind: AnnotationKind, sop: str, points: tuple[tuple[float, float], ...]) -> Annotation:
    return Annotation(f"id{points}{kind}{sop}", kind, sop, 0, points, "me", 1.0)


def test_duplicates_same_kind_slice_within_1_mm_only() -> None:
    first = _ann(AnnotationKind.LENGTH, "1.2.3", ((0, 0), (10, 0)))
    near = _ann(AnnotationKind.LENGTH, "1.2.3", ((0.5, 0.5), (10.5, 0)))  # ≤ 0.71 mm
    far = _ann(AnnotationKind.LENGTH, "1.2.3", ((2, 0), (12, 0)))  # 2 mm at 1 mm/px
    other_slice = _ann(AnnotationKind.LENGTH, "1.2.4", ((0, 0), (10, 0)))
    other_kind = _ann(AnnotationKind.ARROW, "1.2.3", ((0, 0), (10, 0)))

    def one_mm(_: Annotation) -> tuple[float, float]:
        return (1.0, 1.0)

    assert duplicates([first, near, far, other_slice, other_kind], one_mm) == [near]
    # At 0.5 mm per pixel, "far" (2 px) is 1 mm away: a duplicate too.
    assert duplicates([first, far], lambda _: (0.5, 0.5)) == [far]


def test_templates_per_modality_and_region() -> None:
    assert (t := template_for("CT", "CT HEAD w/o")) is not None
    assert t.name == "CT head"
    assert (t := template_for("CT", "CT CHEST")) is not None
    assert t.name == "CT chest"
    assert (t := template_for("MR", "MRI Brain")) is not None
    assert t.name == "MR brain"
    assert (t := template_for("DX", "Chest PA")) is not None
    assert t.name == "CR chest"
    assert template_for("US", "abdomen") is None
    assert split_report(t.text())[0].startswith("Lungs:")


def test_preview_sections_show_peer_text_cleaned() -> None:
    sections = preview_sections("Impression: a\x1b[31mb", [], critical=True)
    impression = next(s for s in sections if s.heading == "Impression")
    assert "\x1b" not in "".join(impression.lines)


# --- Pilot ----------------------------------------------------------------------------------


async def test_f9_previews_both_sections_and_measurement_escape_edits_enter_sends_once() -> None:
    node, app = make()
    async with app.run_test(size=SIZE) as pilot:
        viewer = await open_viewer(pilot)
        measure(node, 0.0, slice_no=3)
        await press(pilot, "r", *keys("Findings\nno bleed.\nImpression\nnormal study."))
        assert split_report(node.session.report_text()) == ("no bleed.", "normal study.")

        await press(pilot, "f9")
        preview = app.screen
        assert isinstance(preview, SignPreview)
        assert "Findings:\n  no bleed." in preview.text
        assert "Impression:\n  normal study." in preview.text
        assert "length 21.0 mm (image 3)" in preview.text
        assert "Critical:   no" in preview.text

        await press(pilot, "escape")  # back to editing: nothing signed or sent
        assert app.screen is viewer
        assert not node.session.finalised()
        assert node.live.sent == []
        assert viewer.query_one("#report").has_focus
        await press(pilot, *keys(" ok"))  # still typing into the impression
        assert split_report(node.session.report_text())[1] == "normal study. ok"

        await press(pilot, "f8", "f9")
        assert isinstance(app.screen, SignPreview)
        assert "Critical:   YES" in app.screen.text
        await press(pilot, "enter")
        assert app.screen is viewer
        assert node.session.finalised()
        assert node.live.critical
        assert node.live.sent == [("no bleed.", "normal study. ok", frozenset())]
        await press(pilot, "f9")  # signed already: no second preview, no second send
        assert app.screen is viewer
        assert len(node.live.sent) == 1


async def test_a_duplicate_measurement_is_said_in_the_preview_and_not_sent() -> None:
    node, app = make()
    async with app.run_test(size=SIZE) as pilot:
        await open_viewer(pilot)
        kept = measure(node, 0.0)
        twin = measure(node, 0.2)  # the same length again, a fraction of a pixel off
        other = measure(node, 30.0)
        await press(pilot, "f9")
        preview = app.screen
        assert isinstance(preview, SignPreview)
        assert "Duplicates not sent:" in preview.text
        assert preview.text.count("length 21.0 mm") == 3  # two sent, one said dropped
        await press(pilot, "y")
        assert node.live.sent[0][2] == frozenset({twin.id})
        assert kept.id not in node.live.sent[0][2]
        assert other.id not in node.live.sent[0][2]


async def test_ctrl_t_inserts_the_template_skeleton_into_an_empty_report_only() -> None:
    node, app = make()
    async with app.run_test(size=SIZE) as pilot:
        viewer = await open_viewer(pilot)
        await press(pilot, "r", "ctrl+t")  # the study is a CT CHEST
        findings, _impression = split_report(node.session.report_text())
        assert findings.startswith("Lungs:")
        assert "Mediastinum" in findings
        assert viewer.query_one("#report", TextArea).text == node.session.report_text()
        before = node.session.report_text()
        await press(pilot, "ctrl+t")  # not twice: the report is not empty any more
        assert node.session.report_text() == before
        assert "empty report only" in viewer.message


# --- the real signing path: two nodes on loopback ------------------------------------------


async def test_the_signed_report_has_both_sections_and_leaves_the_dropped_duplicate_out(
    tmp_path: Path,
) -> None:
    from consult.report import verify_report
    from registry.server import RegistryServer
    from tests.node.pair import accepted_consult
    from tests.node.test_runtime import wait_for
    from tui.node_facade import LiveSessionView, RuntimeNode

    server = RegistryServer(tmp_path / "registry.sqlite")
    registry = await server.start("127.0.0.1", 0)
    try:
        async with accepted_consult(tmp_path, registry) as pair:
            a, b, request = pair.a, pair.b, pair.request
            study_uid = b.consults.get(b.consults.resolve(request.id)).request.study_uid
            await b.consulting.studies.fetch(request.id)
            await wait_for(lambda: len(b.store.instances(study_uid)) == 2, 30.0)
            sop = b.store.instances(study_uid)[0].sop_instance_uid
            live = b.live_hub().open(request.id)
            live.set_report_text(join_report("No haemorrhage.", "Normal CT head."))
            points = ((2.0, 2.0), (20.0, 2.0))
            live.add_annotation(AnnotationKind.LENGTH, sop, 0, points, values={"length_mm": 9.0})
            twin = live.add_annotation(
                AnnotationKind.LENGTH, sop, 0, points, values={"length_mm": 9.0}
            )
            LiveSessionView(live, RuntimeNode(b)._finalise).finalise(drop=frozenset({twin.id}))
            await wait_for(lambda: request.id in a.reports)
            wire = a.consults.report_wire(request.id)
            assert wire is not None
            report = verify_report(wire, consult_id=request.id)
            assert report.text == "No haemorrhage."
            assert report.impression == "Normal CT head."
            assert len(report.measurements) == 1  # the twin was left out
    finally:
        await server.stop()
