"""A received report, read-only (Home, ``v`` on an outbox consult).

Thin: the node checks the report's signature again and lays it out
(:mod:`consult.report_view`, :mod:`consult.report_text`); this screen only shows the
sections. Every line is peer text and reaches the widget as a Rich ``Text`` built by
:mod:`tui.safe_text`, never as markup, so ``[b]`` or ``[@click=app.quit]`` in a
report shows as written.
"""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from tui import safe_text
from tui.facade import ReportSection

MAX_REPORT_CHARS = 64_000  # more than any report a person writes; the screen stays responsive
_WARN = ("Signature:  NOT VERIFIED", "Critical:", "Addendum signature:  NOT VERIFIED")


def report_text(consult_id: str, sections: list[ReportSection]) -> Text:
    """The sections as one literal ``Text``: headings bold, warnings red, nothing parsed."""
    out = Text(end="")
    out.append(f"Report of consult {safe_text.plain(consult_id, 8)}\n", style="bold")
    for section in sections:
        if section.heading != "Report":
            out.append(f"\n{safe_text.plain(section.heading, 80)}\n", style="bold underline")
        for line in section.lines:
            warn = any(line.startswith(w) for w in _WARN) or "NOT acknowledged" in line
            out.append_text(
                safe_text.safe(f"  {line}", MAX_REPORT_CHARS, style="bold red" if warn else "")
            )
            out.append("\n")
    return out


class ReportScreen(ModalScreen[None]):
    """The report as the node verified it just now; q or escape closes it."""

    DEFAULT_CSS = """
    ReportScreen { align: center middle; }
    ReportScreen > VerticalScroll { width: 100; height: 90%; border: round $accent;
        padding: 1 2; }
    """
    BINDINGS = [Binding("q,escape", "close", "close")]  # noqa: RUF012

    def __init__(self, consult_id: str, sections: list[ReportSection]) -> None:
        super().__init__()
        self.consult_id = consult_id
        self.sections = sections

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(report_text(self.consult_id, self.sections), id="report-text")

    def action_close(self) -> None:
        self.dismiss(None)
