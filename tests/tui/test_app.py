"""Pilot tests of each screen's main flows against the in-memory node and session."""

from __future__ import annotations

import time

import pytest
from textual import events

from consult.presence import Cursor
from consult.shared import AnnotationKind
from tests.tui.pilots import make_node, open_viewer, press, svg_text, viewer_app
from tui.app import RadmeshApp
from tui.imaging import PRESETS, Window
from tui.memory import STUDY_UID
from tui.screens.help import HelpScreen
from tui.screens.peers import VerifyScreen
from tui.screens.viewer import ViewerScreen
from tui.widgets.consult_panel import ConsultPanel
from tui.widgets.image_view import ImageView

# Most tests look at what a screen does, not how it is laid out: the smallest screen
# that shows it all renders fastest. FULL is for the tests that need the panels unfolded.
SIZE = (100, 30)
FULL = (150, 45)


async def test_home_shows_identity_worklist_and_transfers() -> None:
    node = make_node()
    app = RadmeshApp(node)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        svg = svg_text(app)
        assert str(node.node_id)[:7] in svg
        assert "STAT" in svg
        assert "CT head: bleed?" in svg
        assert "CT CHEST (ANON-0001)" in svg
        assert "New STAT request" in svg


async def test_timers_that_fire_while_the_app_tears_down_do_nothing() -> None:
    # CI once failed when the home screen's refresh timer fired while the app was closing and
    # its widgets were already gone (NoMatches '#identity').
    node = make_node()
    app = RadmeshApp(node)
    async with app.run_test(size=SIZE) as pilot:
        home = app.screen
        await press(pilot, "f3")  # home stays installed, not current
        viewer = await open_viewer(pilot, node, live=False)
    assert not home.query("#identity")  # torn down, as when the timer raced the shutdown
    home._tick()  # type: ignore[attr-defined]
    viewer._poll_loading()


async def test_help_opens_on_question_mark_and_closes_on_q() -> None:
    app = RadmeshApp(make_node())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        assert "mediastinum" in svg_text(app)
        await pilot.press("q")
        assert not isinstance(app.screen, HelpScreen)


async def test_studies_screen_opens_the_study_in_the_viewer() -> None:
    node = make_node()
    app = RadmeshApp(node)
    async with app.run_test(size=SIZE) as pilot:
        await press(pilot, "f3")
        assert "ANON-0001" in svg_text(app)
        await pilot.press("enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert isinstance(app.screen, ViewerScreen)
        view = app.screen.query_one(ImageView)
        assert view.frame is not None
        assert "Im 1/12" in svg_text(app)


async def test_viewer_scrolls_with_keys_and_wheel() -> None:
    node = make_node()
    app = RadmeshApp(node)
    async with app.run_test(size=SIZE) as pilot:
        viewer = await open_viewer(pilot, node, live=False)
        await pilot.press("j", "j", "pagedown")
        await app.workers.wait_for_complete()
        assert viewer.index == 11  # 2 + 10, clamped at the last of 12
        await pilot.press("home")
        assert viewer.index == 0
        await pilot.press("end")
        assert viewer.index == 11
        view = viewer.view
        view.post_message(events.MouseScrollUp(view, 40, 10, 0, -1, 0, False, False, False))
        await pilot.pause()
        assert viewer.index == 10
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert "Im 11/12" in svg_text(app)


async def test_presets_invert_zoom_and_reset_change_the_rendered_image() -> None:
    node = make_node()
    app = RadmeshApp(node)
    async with app.run_test(size=SIZE) as pilot:
        viewer = await open_viewer(pilot, node, live=False)
        view = viewer.view
        before = [list(s) for s in view._strips]
        await pilot.press("5")
        assert view.window == dict(PRESETS)["lung"]
        assert "W 1500 L -600" in svg_text(app)
        assert [list(s) for s in view._strips] != before
        await pilot.press("i", "plus")
        assert view.invert
        assert view.zoom == pytest.approx(1.25)
        await pilot.press("R")  # reset (r types into the report)
        assert not view.invert
        assert view.zoom == 1.0
        assert view.window == Window(40, 400)  # the file's own window


async def test_dragging_changes_window_and_level() -> None:
    node = make_node()
    app = RadmeshApp(node)
    async with app.run_test(size=SIZE) as pilot:
        viewer = await open_viewer(pilot, node, live=False)
        start = viewer.view.window
        await pilot.mouse_down(ImageView, offset=(40, 10))
        await pilot.hover(ImageView, offset=(50, 12))
        await pilot.mouse_up(ImageView, offset=(50, 12))
        await pilot.pause()
        w = viewer.view.window
        assert w.width > start.width  # dragged right
        assert w.center > start.center  # dragged down


async def test_missing_slices_show_loading_and_are_requested_first() -> None:
    node = make_node(missing=2)
    app = RadmeshApp(node)
    async with app.run_test(size=SIZE) as pilot:
        viewer = await open_viewer(pilot, node, live=False)
        await pilot.press("end")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert viewer.view.waiting
        assert "loading" in svg_text(app)
        assert node.requested[-1] == node.instances(viewer.instances[0].series_uid)[11].sop_uid
        node.arrive(11)
        viewer.load_current()
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert not viewer.view.waiting


async def click_image(pilot, x: int, y: int) -> None:  # type: ignore[no-untyped-def]
    await pilot.click(ImageView, offset=(x, y))
    await pilot.pause()


@pytest.mark.parametrize(
    ("key", "kind", "clicks", "value"),
    [
        ("P", AnnotationKind.POINT, [(40, 12)], None),
        ("M", AnnotationKind.LENGTH, [(40, 12), (48, 12)], "length_mm"),
        ("G", AnnotationKind.ANGLE, [(40, 12), (48, 12), (40, 18)], "angle_deg"),
        ("E", AnnotationKind.ELLIPSE, [(40, 12), (46, 16)], "mean"),
    ],
)
async def test_each_annotation_tool_adds_a_measured_annotation(
    key: str, kind: AnnotationKind, clicks: list[tuple[int, int]], value: str | None
) -> None:
    async with viewer_app(SIZE) as (node, _, pilot, viewer):
        await pilot.press(key)
        for x, y in clicks:
            await click_image(pilot, x, y)
        (a,) = node.session.annotations()
        assert a.kind == kind
        assert a.author == str(node.node_id)
        assert a.sop_instance_uid == viewer.current.sop_uid  # type: ignore[union-attr]
        if value:
            assert a.values[value] != 0
        if kind == AnnotationKind.ELLIPSE:
            # the phantom's soft tissue is 40 HU; the ROI sits inside the body
            assert a.values["min"] >= -1000
            assert a.values["area_mm2"] > 0


async def test_length_is_in_mm_using_pixel_spacing() -> None:
    async with viewer_app(SIZE) as (node, _, pilot, viewer):
        await pilot.press("M")
        await click_image(pilot, 40, 12)
        await click_image(pilot, 50, 12)
        (a,) = node.session.annotations()
        (x0, y0), (x1, y1) = a.points
        assert y0 == y1
        assert a.values["length_mm"] == pytest.approx(abs(x1 - x0) * 0.8)
        geom = viewer.view.geometry()
        assert geom is not None
        assert abs(x1 - x0) == pytest.approx(10 / geom.scale[0])


async def test_arrow_asks_for_its_text() -> None:
    node = make_node()
    app = RadmeshApp(node)
    async with app.run_test(size=SIZE) as pilot:
        await open_viewer(pilot, node)
        await pilot.press("A")
        await click_image(pilot, 40, 12)
        await click_image(pilot, 46, 16)
        await press(pilot, *"bleed", "enter")
        (a,) = node.session.annotations()
        assert a.kind == AnnotationKind.ARROW
        assert a.text == "bleed"


async def test_remote_cursor_and_annotation_appear_and_own_cursor_is_coalesced() -> None:
    async with viewer_app(SIZE) as (node, app, pilot, viewer):
        sop = viewer.current.sop_uid  # type: ignore[union-attr]
        neuro = node.live.join("Dr Neuro", "#ff00ff")
        neuro.cursor(Cursor(sop, 0, 60.0, 60.0))
        neuro.live.add_annotation(AnnotationKind.POINT, sop, 0, ((30.0, 30.0),), text="look here")
        await node.live.settle()
        await pilot.pause()
        svg = svg_text(app)
        assert "Dr Neuro" in svg  # name tag on the image and the participants panel
        assert "look here" in svg
        kinds = {m.kind for m in viewer.view.marks}
        assert kinds == {"cursor", "point"}
        # 30 pointer moves within one coalescing period go out as at most a few updates.
        sent_before = neuro.from_node.presence_sent
        for i in range(30):
            viewer.view.post_message(ImageView.Pointer((20.0 + i, 10.0)))
        await pilot.pause(0.15)
        sent = neuro.from_node.presence_sent - sent_before
        assert 1 <= sent < 30
        me = node.session.participants()[0]
        assert me.cursor is not None
        assert me.cursor.sop_instance_uid == sop


async def test_chat_report_finalise_and_author_only_removal() -> None:
    async with viewer_app(FULL) as (node, app, pilot, viewer):
        sop = viewer.current.sop_uid  # type: ignore[union-attr]
        panel = viewer.query_one(ConsultPanel)
        await pilot.click("#chat-input")
        await pilot.press(*"agree", "enter")
        neuro = node.live.join("Dr Neuro", "#ff00ff")
        await node.live.settle()  # the peer has caught up (read "agree") before it answers
        neuro.live.say("see slice 3")
        await node.live.settle()
        await pilot.pause()
        assert [m.text for m in node.session.chat()] == ["agree", "see slice 3"]
        assert "see slice 3" in svg_text(app)
        await pilot.click("#report")
        await press(pilot, *"No bleed.")
        assert node.session.report_text() == "No bleed."
        theirs = neuro.live.add_annotation(AnnotationKind.POINT, sop, 0, ((3.0, 3.0),))
        await node.live.settle()
        viewer.view.focus()
        await press(pilot, "right_square_bracket", "x")
        assert panel.selected == theirs.id
        assert len(node.session.annotations()) == 1  # not ours: refused, and said so
        assert "only the author" in svg_text(app)
        await press(pilot, "f9")  # a preview first; enter signs and sends
        assert not node.session.finalised()
        await press(pilot, "enter")
        assert node.session.finalised()
        assert "FINAL" in svg_text(app)


async def test_peers_search_and_verify_with_the_safety_number() -> None:
    node = make_node()
    app = RadmeshApp(node)
    async with app.run_test(size=SIZE) as pilot:
        await press(pilot, "f4")
        await press(pilot, "slash", *"msk")
        svg = svg_text(app)
        assert "Dr Bones" in svg
        assert "Dr Neuro" not in svg
        await press(pilot, "enter", "v")
        assert isinstance(app.screen, VerifyScreen)
        assert node.safety_number("PEER-MSK") in svg_text(app)
        await press(pilot, "y")
        assert next(p for p in node.peers() if p.node_id == "PEER-MSK").trust == "verified"
        assert "verified" in svg_text(app)


async def test_home_enter_opens_the_incoming_request_as_a_live_consult() -> None:
    node = make_node()
    app = RadmeshApp(node)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        app.screen.query_one("#worklist").focus()
        await pilot.press("enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert isinstance(app.screen, ViewerScreen)
        assert app.screen.study.study_uid == STUDY_UID
        assert app.screen.session is node.session
        assert time.time() > 0


def toasts(app: RadmeshApp) -> str:
    return "\n".join(n.message for n in app._notifications)


async def worklist_row(pilot, row: int) -> None:  # type: ignore[no-untyped-def]
    from textual.widgets import DataTable

    table = pilot.app.screen.query_one("#worklist", DataTable)
    table.focus()
    table.move_cursor(row=row)
    await pilot.pause()


async def test_home_accepts_declines_with_a_reason_and_fetches_an_inbox_request() -> None:
    from tui.screens.prompt import TextPrompt

    node = make_node()
    app = RadmeshApp(node)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await worklist_row(pilot, 0)  # c-1, incoming STAT
        await pilot.press("a")
        await app.workers.wait_for_complete()
        await press(pilot, "d")
        assert isinstance(app.screen, TextPrompt)
        await pilot.press(*"out of my field", "enter")
        await app.workers.wait_for_complete()
        await press(pilot, "f", "z", "c")
        assert node.actions == [
            ("accept", "c-1", ""),
            ("decline", "c-1", "out of my field"),
            ("fetch", "c-1"),
            ("pause", "c-1"),
            ("cancel", "c-1"),
        ]
        assert "fetching the study of consult c-1" in toasts(app)
        # The footer shows the worklist keys.
        assert "accept" in svg_text(app)
        assert "withdraw" in svg_text(app)


async def test_decline_without_a_reason_is_not_sent() -> None:
    node = make_node()
    app = RadmeshApp(node)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await worklist_row(pilot, 0)
        await pilot.press("d", "enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert node.actions == []
        assert "needs a reason" in toasts(app)


async def test_withdraw_applies_to_the_outbox_and_accept_only_to_the_inbox() -> None:
    node = make_node()
    app = RadmeshApp(node)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await worklist_row(pilot, 1)  # c-2, outgoing
        await press(pilot, "a", "f", "z", "c")
        assert node.actions == []
        assert "select a request in your inbox" in toasts(app)
        await pilot.press("w")
        await app.workers.wait_for_complete()
        await worklist_row(pilot, 0)
        await pilot.press("w")
        await app.workers.wait_for_complete()
        assert node.actions == [("withdraw", "c-2")]


async def test_home_transfers_show_a_progress_bar_with_the_numbers() -> None:
    from textual.widgets import ProgressBar

    node = make_node()
    app = RadmeshApp(node)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        [bar] = app.screen.query(ProgressBar)
        assert bar.total == 12_000_000
        assert bar.progress == 3_000_000
        assert "3.0/12.0 MB" in svg_text(app)


async def test_the_share_form_offers_only_verified_peers_checks_fields_and_sends() -> None:
    from textual.widgets import Input, Select

    from tui.screens.share import ShareScreen

    node = make_node()
    app = RadmeshApp(node)
    async with app.run_test(size=FULL) as pilot:
        await press(pilot, "f3")
        await press(pilot, "s")
        form = app.screen
        assert isinstance(form, ShareScreen)
        assert [p.node_id for p in form.trusted] == ["PEER-NEURO"]  # Dr Bones is unverified
        await press(pilot, "ctrl+s")
        assert "Pick the consultant" in svg_text(app)
        # Keyboard only: open the peer list, take the first peer, then the question.
        await press(pilot, "enter", "down", "enter")
        assert form.query_one("#peer", Select).value == "PEER-NEURO"
        assert "Dr Bones" not in svg_text(app)
        await press(pilot, "ctrl+s")
        assert "Write the clinical question" in svg_text(app)
        form.query_one("#question").focus()
        await press(pilot, *"bleed?", "tab", "tab")
        deadline = form.query_one("#deadline", Input)
        deadline.focus()
        deadline.value = ""
        await press(pilot, *"soon", "ctrl+s")
        assert "deadline is a number of hours" in svg_text(app)
        assert node.actions == []
        deadline.value = ""
        await pilot.press("2", "ctrl+s")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert not isinstance(app.screen, ShareScreen)
        assert node.actions == [("request", STUDY_UID, "PEER-NEURO", "urgent")]
        assert "delivered (LAN)" in toasts(app)


async def test_opening_a_study_records_a_view() -> None:
    node = make_node()
    app = RadmeshApp(node)
    async with app.run_test(size=SIZE) as pilot:
        await press(pilot, "f3")
        assert node.views == []
        await pilot.press("enter")
        await app.workers.wait_for_complete()
        assert node.views == [STUDY_UID]
