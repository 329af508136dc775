"""The referrer reads the report in the TUI: Home, an outbox consult, ``v``."""

from __future__ import annotations

import dataclasses

from textual.widgets import DataTable, Input, Static

from consult import report_text
from crypto.identity import Identity
from tests.consult.test_report_text import make_report
from tests.tui.pilots import press
from tui.app import RadmeshApp
from tui.facade import ReportSection
from tui.memory import InMemoryNode
from tui.screens.prompt import TextPrompt
from tui.screens.report import ReportScreen

MARKUP = "[b]bold?[/b] [@click=app.quit]quit[/] [link=file:///etc/passwd]x[/link] [/]"


def sections_for(author: Identity) -> list[ReportSection]:
    report = dataclasses.replace(
        make_report(author, text=f"Findings with {MARKUP}\nsecond line"),
        author_name="Dr [red]Mallory[/red]",
        critical=True,
    )
    laid_out = report_text.report_sections(
        report, report_text.Signature(True, ""), trust="verified"
    )
    laid_out.append(
        report_text.Section("Acknowledgement", ("CRITICAL result, NOT acknowledged yet",))
    )
    return [ReportSection(s.heading, s.lines) for s in laid_out]


async def test_v_on_an_outbox_consult_shows_its_report_literally() -> None:
    author = Identity(bytes([3]) * 32)
    node = InMemoryNode(Identity.generate())
    node.reports["c-2"] = sections_for(author)
    app = RadmeshApp(node)
    async with app.run_test(size=(150, 50)) as pilot:
        await press(pilot, "v")  # the inbox request is selected: no report to read there
        assert not isinstance(app.screen, ReportScreen)

        app.screen.query_one("#worklist", DataTable).move_cursor(row=1)  # the outbox consult
        await press(pilot, "v")
        assert isinstance(app.screen, ReportScreen)
        shown = str(app.screen.query_one("#report-text", Static).render())
        assert f"Dr [red]Mallory[/red] (node {author.node_id.short()}, verified)" in shown
        assert "Signature:  verified" in shown
        assert "Signed at:  2027-01-15 08:00 UTC" in shown
        assert f"Findings with {MARKUP}" in shown  # markup characters shown as written
        assert "Acute left subdural haematoma." in shown
        assert "thickness: length 9.0 mm (image 12)" in shown
        assert "collection: ellipse ROI: area 63 mm², mean 61.2 HU, SD 4.5 HU (image 12)" in shown
        assert report_text.CRITICAL_LINE in shown
        assert "CRITICAL result, NOT acknowledged yet" in shown
        assert app.is_running  # [@click=app.quit] bound nothing

        await press(pilot, "escape")
        assert not isinstance(app.screen, ReportScreen)


async def test_v_without_a_report_says_none_arrived() -> None:
    node = InMemoryNode(Identity.generate())
    app = RadmeshApp(node)
    async with app.run_test(size=(100, 30)) as pilot:
        app.screen.query_one("#worklist", DataTable).move_cursor(row=1)
        await press(pilot, "v")
        assert not isinstance(app.screen, ReportScreen)


def test_an_unverified_report_is_shown_as_a_warning_without_its_content() -> None:
    from tui.screens.report import report_text as laid_out

    sections = [
        ReportSection(s.heading, s.lines)
        for s in report_text.unverified_sections("c-2", "signature does not match [b]x[/b]")
    ]
    text = laid_out("c-2", sections)
    assert "Signature:  NOT VERIFIED: signature does not match [b]x[/b]" in text.plain
    assert any(span.style == "bold red" for span in text.spans)


async def test_e_on_a_reported_inbox_consult_adds_a_signed_addendum() -> None:
    node = InMemoryNode(Identity.generate())
    app = RadmeshApp(node)
    async with app.run_test(size=(100, 30)) as pilot:
        await press(pilot, "e")  # c-1 is only offered: nothing signed to amend
        assert not isinstance(app.screen, TextPrompt)

        node.states["c-1"] = "reported"
        app.screen.refresh_data()  # type: ignore[attr-defined]
        await press(pilot, "e")
        app.screen.query_one(Input).value = "Correction: [b]right[/b] side."
        await pilot.press("enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert ("addendum", "c-1", "Correction: [b]right[/b] side.") in node.actions


async def test_the_report_screen_lists_addenda_under_the_report() -> None:
    author = Identity(bytes([3]) * 32)
    node = InMemoryNode(Identity.generate())
    node.reports["c-2"] = [
        *sections_for(author),
        ReportSection("Addendum 1", ("Signed at:  2027-01-15 09:00 UTC", f"Right, {MARKUP}")),
    ]
    app = RadmeshApp(node)
    async with app.run_test(size=(150, 60)) as pilot:
        app.screen.query_one("#worklist", DataTable).move_cursor(row=1)
        await press(pilot, "v")
        shown = str(app.screen.query_one("#report-text", Static).render())
        assert shown.index("Addendum 1") > shown.index("Impression")
        assert f"Right, {MARKUP}" in shown
