"""The live consult side panel: participants, annotations, chat, report, finalise."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Input, Static, TextArea

from consult.shared import MAX_CHAT_CHARS, Annotation
from node.core.display import peer_label, printable
from tui.safe_text import MAX_LINE_CHARS, colour, plain, safe
from tui.session import SessionView

SHORT_ID_CHARS = 7
TrustOf = Callable[[str], str]  # node id -> trust label ("" when not known)


def report_shown(text: str) -> str:
    """The shared report as the editor shows it: lines kept, control characters not."""
    return printable(text, multiline=True)


def value_text(a: Annotation) -> str:
    """The measured value of an annotation, short, as drawn beside its mark on the image
    ("" for marks without one). Values come from peers: only finite numbers are shown."""
    v = {k: x for k, x in a.values.items() if isinstance(x, int | float) and math.isfinite(x)}
    if "length_mm" in v:
        return f"{v['length_mm']:.1f} mm"
    if "angle_deg" in v:
        return f"{v['angle_deg']:.1f}°"
    if "mean" in v:
        return f"{v['mean']:.0f}±{v.get('sd', 0):.0f} HU {v.get('area_mm2', 0):.0f} mm²"
    return ""


def mark_label(a: Annotation) -> str:
    """What is drawn next to an annotation on the image: its value, then its text."""
    return " ".join(t for t in (value_text(a), plain(a.text, MAX_LINE_CHARS)) if t)


def describe(a: Annotation) -> str:
    v = a.values
    if "length_mm" in v:
        return f"length {v['length_mm']:.1f} mm"
    if "angle_deg" in v:
        return f"angle {v['angle_deg']:.1f}°"
    if "mean" in v:
        return (
            f"ROI {v.get('area_mm2', 0):.0f} mm² mean {v['mean']:.1f} SD {v.get('sd', 0):.1f} "
            f"min {v.get('min', 0):.0f} max {v.get('max', 0):.0f} HU"
        )
    return f"{a.kind.value} {plain(a.text, MAX_LINE_CHARS)}".strip()


class ConsultPanel(Vertical):
    DEFAULT_CSS = """
    ConsultPanel { width: 46; border-left: solid $accent; }
    ConsultPanel #participants { height: auto; max-height: 6; }
    ConsultPanel #annotations { height: auto; max-height: 8; }
    ConsultPanel #chat-log { height: 1fr; min-height: 3; }
    ConsultPanel #report { height: 8; border: round $panel; }
    ConsultPanel #report:focus { border: heavy $accent; }
    ConsultPanel #chat-input { border: round $panel; }
    ConsultPanel #chat-input:focus { border: heavy $accent; }
    """

    class Finalise(Message):
        pass

    def __init__(self, session: SessionView, trust_of: TrustOf | None = None) -> None:
        super().__init__(id="consult")
        self.session = session
        self.selected: str | None = None
        self.trust_of: TrustOf = trust_of or (lambda node: "")
        self._shown: dict[str, Text | str] = {}

    def compose(self) -> ComposeResult:
        yield Static(id="participants")
        yield Static(id="annotations")
        yield Static(id="chat-log")
        yield Input(placeholder="chat (enter to send)", id="chat-input")
        yield TextArea(report_shown(self.session.report_text()), id="report")
        yield Static(id="final")

    def on_mount(self) -> None:
        self.update_from_session()

    def names(self) -> dict[str, str]:
        """Node id -> how to show that participant: name, short id and trust, never the
        name alone (presence names are whatever the peer typed)."""
        local = self.session.local_node
        return {
            p.node: peer_label(p.name, plain(p.node[:SHORT_ID_CHARS]), self._trust(p.node, local))
            for p in self.session.participants()
        }

    def _trust(self, node: str, local: str) -> str:
        return "you" if node == local else self.trust_of(node) or "unverified"

    def who(self, node: str, names: dict[str, str]) -> str:
        return names.get(node) or f"({plain(node[:SHORT_ID_CHARS])}, not in the session)"

    def update_from_session(self) -> None:
        s = self.session
        names = self.names()
        people = Text("Participants\n", style="bold")
        for index, p in enumerate(s.participants()):
            flags = " presenting" if p.presenting else ""
            if p.following or (index == 0 and s.following()):
                flags += " following"
            people.append(f" ● {names[p.node]}{flags}\n", style=colour(p.colour))
        self._show("participants", people)
        marks = Text("Annotations (click or [ ] select, x remove)\n", style="bold")
        for a in s.annotations():
            chosen = a.id == self.selected
            line = f"{'▶' if chosen else ' '}{self.who(a.author, names)}: {describe(a)}"
            frame = f" (fr {a.frame + 1})" if a.frame else ""
            marks.append(line + frame + "\n", style="reverse" if chosen else "")
        self._show("annotations", marks)
        chat = Text("Chat\n", style="bold")
        for m in s.chat()[-50:]:
            stamp = time.strftime("%H:%M", time.localtime(m.at))
            # The author on a line of its own: name, id and trust leave no room beside it.
            chat.append(f"{stamp} {self.who(m.author, names)}\n", style="dim")
            chat.append(safe(m.text, MAX_CHAT_CHARS))
            chat.append("\n")
        self._show("chat-log", chat)
        report = self.query_one("#report", TextArea)
        shown = report_shown(s.report_text())
        if not report.has_focus and report.text != shown:
            report.text = shown
        report.read_only = s.finalised()
        final = "FINAL — signed" if s.finalised() else "draft (F9 preview & sign)"
        self._show("final", final)

    def _show(self, widget_id: str, content: Text | str) -> None:
        """Update a part only when it changed: every move of a participant's cursor calls
        back here, and each update repaints the part (over SSH, the panel's whole height)."""
        if self._shown.get(widget_id) != content:
            self._shown[widget_id] = content
            self.query_one(f"#{widget_id}", Static).update(content)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "chat-input" and event.value.strip():
            self.session.say(event.value.strip())
            event.input.value = ""
            self.update_from_session()  # a live session does not call back for own edits

    def on_text_area_changed(self, event: TextArea.Changed) -> None:
        if event.text_area.has_focus and not self.session.finalised():
            self.session.set_report_text(event.text_area.text)

    def select_id(self, annotation_id: str | None) -> None:
        self.selected = annotation_id
        self.update_from_session()

    def select(self, step: int) -> None:
        ids = [a.id for a in self.session.annotations()]
        if not ids:
            self.selected = None
        elif self.selected not in ids:
            self.selected = ids[-1] if step < 0 else ids[0]
        else:
            self.selected = ids[(ids.index(self.selected) + step) % len(ids)]
        self.update_from_session()
