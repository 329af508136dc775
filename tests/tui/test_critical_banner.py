"""Home's critical-result banner stays until the report is acknowledged by name (k)."""

from __future__ import annotations

import time
from dataclasses import replace

from textual.widgets import DataTable, Input, Static

from crypto.identity import Identity
from tests.tui.pilots import press
from tui.app import RadmeshApp
from tui.facade import CriticalAlert
from tui.memory import InMemoryNode


async def test_banner_stays_until_k_acknowledges_the_outbox_report_by_name() -> None:
    node = InMemoryNode(Identity.generate())
    node.alerts.append(CriticalAlert("c-2", 1, time.time() - 600))
    app = RadmeshApp(node)
    async with app.run_test(size=(100, 30)) as pilot:
        banner = app.screen.query_one("#critical", Static)
        assert banner.display
        shown = str(banner.render())
        assert "CRITICAL RESULT: consult c-2, escalation 1" in shown
        assert "press k" in shown

        await press(pilot, "k")  # the inbox request is selected: nothing to acknowledge
        assert not any(a[0] == "ack" for a in node.actions)
        assert banner.display

        app.screen.query_one("#worklist", DataTable).move_cursor(row=1)  # the outbox consult
        await press(pilot, "k")
        app.screen.query_one(Input).value = "Dr Aoife Byrne"
        await pilot.press("enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert ("ack", "c-2", "Dr Aoife Byrne") in node.actions
        home_banner = app.screen.query_one("#critical", Static)
        assert not home_banner.display


async def test_an_empty_name_does_not_acknowledge_a_critical_result() -> None:
    node = InMemoryNode(Identity.generate())
    node.alerts.append(CriticalAlert("c-2", 0, time.time()))
    app = RadmeshApp(node)
    async with app.run_test(size=(100, 30)) as pilot:
        app.screen.query_one("#worklist", DataTable).move_cursor(row=1)
        await press(pilot, "k")
        await pilot.press("enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert not any(a[0] == "ack" for a in node.actions)
        assert app.screen.query_one("#critical", Static).display


async def test_f8_marks_the_report_critical_before_f9_signs_it() -> None:
    from tests.tui.pilots import open_viewer

    node = InMemoryNode(Identity.generate())
    app = RadmeshApp(node)
    async with app.run_test(size=(100, 30)) as pilot:
        viewer = await open_viewer(pilot, node)
        viewer.view.focus()
        await press(pilot, "f8")
        assert "CRITICAL" in viewer.message
        await press(pilot, "f9", "enter")  # the preview, then sign and send
        assert node.session.finalised()
        assert node.live.critical


def test_the_worklist_flags_critical_and_overdue_reports() -> None:
    from tui.facade import ConsultItem
    from tui.screens.home import state_cell

    item = ConsultItem("c-9", False, "CT head", "PEER", "stat", "reported", 0.0)
    assert str(state_cell(item)) == "reported"
    assert "ack overdue" in str(state_cell(replace(item, ack_overdue=True)))
    assert "CRITICAL" in str(state_cell(replace(item, critical=True)))
    assert str(state_cell(replace(item, critical=True, state="acknowledged"))) == "acknowledged"
