"""The live consult side panel: participants, annotations, chat, report, finalise."""

from __future__ import annotations

import time

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Input, Static, TextArea

from consult.shared import Annotation
from tui.session import SessionView


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
    return f"{a.kind.value} {a.text}".strip()


class ConsultPanel(Vertical):
    DEFAULT_CSS = """
    ConsultPanel { width: 46; border-left: solid $accent; }
    ConsultPanel #participants { height: auto; max-height: 6; }
    ConsultPanel #annotations { height: auto; max-height: 8; }
    ConsultPanel #chat-log { height: 1fr; min-height: 3; }
    ConsultPanel #report { height: 8; }
    """

    class Finalise(Message):
        pass

    def __init__(self, session: SessionView) -> None:
        super().__init__(id="consult")
        self.session = session
        self.selected: str | None = None

    def compose(self) -> ComposeResult:
        yield Static(id="participants")
        yield Static(id="annotations")
        yield Static(id="chat-log")
        yield Input(placeholder="chat (enter to send)", id="chat-input")
        yield TextArea(self.session.report_text(), id="report")
        yield Static(id="final")

    def on_mount(self) -> None:
        self.update_from_session()

    def names(self) -> dict[str, str]:
        return {p.node: p.name for p in self.session.participants()}

    def update_from_session(self) -> None:
        s = self.session
        names = self.names()
        people = Text("Participants\n", style="bold")
        for index, p in enumerate(s.participants()):
            me = " (you)" if index == 0 else ""
            flags = " presenting" if p.presenting else ""
            if p.following or (index == 0 and s.following()):
                flags += " following"
            people.append(f" ● {p.name}{me}{flags}\n", style=p.colour)
        self.query_one("#participants", Static).update(people)
        marks = Text("Annotations (click or [ ] select, x remove)\n", style="bold")
        for a in s.annotations():
            chosen = a.id == self.selected
            line = f"{'▶' if chosen else ' '}{names.get(a.author, a.author[:8])}: {describe(a)}"
            frame = f" (fr {a.frame + 1})" if a.frame else ""
            marks.append(line + frame + "\n", style="reverse" if chosen else "")
        self.query_one("#annotations", Static).update(marks)
        chat = Text("Chat\n", style="bold")
        for m in s.chat()[-50:]:
            stamp = time.strftime("%H:%M", time.localtime(m.at))
            chat.append(f"{stamp} {names.get(m.author, m.author[:8])}: {m.text}\n")
        self.query_one("#chat-log", Static).update(chat)
        report = self.query_one("#report", TextArea)
        if not report.has_focus and report.text != s.report_text():
            report.text = s.report_text()
        report.read_only = s.finalised()
        final = "FINAL — signed" if s.finalised() else "draft (F9 finalise)"
        self.query_one("#final", Static).update(final)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "chat-input" and event.value.strip():
            self.session.say(event.value.strip())
            event.input.value = ""

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
