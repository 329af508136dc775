"""F9: what signing will send, shown before it is signed; enter/y signs, escape/n edits on."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from consult.report_text import Section, as_text
from tui import safe_text

PROMPT = "enter/y: sign and send     escape/n: back to editing"


class SignPreview(ModalScreen[bool]):
    """The report exactly as it will be sent (peer text shown literally, never markup)."""

    DEFAULT_CSS = """
    SignPreview { align: center middle; }
    SignPreview > Vertical {
        width: 84; max-width: 100%; height: 90%; border: heavy $accent; padding: 0 1;
    }
    SignPreview #preview-prompt { dock: bottom; height: 1; background: $accent; }
    """
    BINDINGS = [  # noqa: RUF012 - Textual's API
        Binding("enter,y", "answer(True)", "sign and send"),
        Binding("escape,n", "answer(False)", "back to editing"),
    ]

    def __init__(self, sections: list[Section]) -> None:
        super().__init__()
        self.text = as_text(sections)

    def compose(self) -> ComposeResult:
        with Vertical():
            with VerticalScroll():
                yield Static(safe_text.safe(self.text), id="preview-text")
            yield Static(PROMPT, id="preview-prompt")

    def action_answer(self, sign: bool) -> None:
        self.dismiss(sign)
