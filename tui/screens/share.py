"""Share a study / request a consult: a form over the selected study.

Only peers whose key was verified (or vouched for by a trusted organisation)
are offered. The form checks its fields, then the node sends the request; any
error stays inside the form, the outcome (how it was delivered) is returned.
"""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Label, Select, Static
from textual.worker import WorkType

from tui import safe_text
from tui.facade import PRIORITIES, ActionError, ConsultForm, NodeFacade, PeerInfo, StudyInfo
from tui.safe_text import MAX_NAME_CHARS, plain
from tui.screens.compare import priors_of

DEFAULT_HOURS = {"stat": 1.0, "urgent": 4.0, "routine": 48.0}
MAX_HOURS = 24.0 * 14
MAX_QUESTION = 2000


def check(form: ConsultForm) -> str:
    """What is wrong with the form, for the person filling it in; empty when it is fine."""
    if not form.peer_node_id:
        return "Pick the consultant to ask."
    if not form.question.strip():
        return "Write the clinical question."
    if len(form.question) > MAX_QUESTION:
        return f"The question is too long (at most {MAX_QUESTION} characters)."
    if form.priority not in PRIORITIES:
        return "Pick a priority: STAT, urgent or routine."
    if not form.subspecialty.strip():
        return "Give the subspecialty wanted (e.g. neuro)."
    if not 0 < form.deadline_hours <= MAX_HOURS:
        return f"The deadline is in hours, more than 0 and at most {MAX_HOURS:.0f}."
    return ""


def consultant_option(p: PeerInfo) -> Text:
    """name (SHORTID, trust) · institution · subspecialties, all literal."""
    option = safe_text.peer(p.name, p.node_id[:7], p.trust)
    option.append(f" · {plain(p.institution, MAX_NAME_CHARS)}")
    option.append(f" · {plain(', '.join(p.subspecialties), MAX_NAME_CHARS)}")
    return option


class ShareScreen(ModalScreen[str | None]):
    """Returns what happened to the request (sent directly, via mailbox) or None."""

    DEFAULT_CSS = """
    ShareScreen { align: center middle; }
    ShareScreen > VerticalScroll { width: 80; height: auto; max-height: 90%;
                                   border: round $accent; padding: 1 2; }
    ShareScreen #form-error { color: $error; }
    ShareScreen Input, ShareScreen Select { margin-bottom: 1; }
    """
    BINDINGS = [  # noqa: RUF012
        Binding("escape", "cancel", "cancel"),
        Binding("ctrl+s", "send", "send request"),
    ]

    def __init__(self, node: NodeFacade, study: StudyInfo) -> None:
        super().__init__()
        self.node = node
        self.study = study
        self.trusted: list[PeerInfo] = [p for p in node.peers() if p.trust != "unverified"]

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            head = Text("Request a consult", style="bold", end="")
            head.append(
                f" on {plain(self.study.patient, MAX_NAME_CHARS)} "
                f"{plain(self.study.description, MAX_NAME_CHARS)} "
                f"({plain(self.study.modalities, MAX_NAME_CHARS)})\n"
                "The study leaves de-identified.",
                style="not bold",
            )
            yield Static(head)
            yield Label("Consultant (verified peers only)")
            yield Select(
                [(consultant_option(p), p.node_id) for p in self.trusted],
                prompt="no verified peer: verify one on the Peers screen (F4)"
                if not self.trusted
                else "pick a consultant",
                id="peer",
            )
            yield Label("Clinical question")
            yield Input(placeholder="e.g. subdural haematoma? surgery needed?", id="question")
            yield Label("Priority")
            yield Select(
                [("STAT", "stat"), ("urgent", "urgent"), ("routine", "routine")],
                value="urgent",
                allow_blank=False,
                id="priority",
            )
            yield Label("Subspecialty")
            yield Input(placeholder="e.g. neuro", id="subspecialty")
            yield Label("Deadline (hours from now)")
            yield Input(str(DEFAULT_HOURS["urgent"]), id="deadline")
            yield Label("Patient's country (empty: this node's)")
            yield Input(placeholder="e.g. IE", id="jurisdiction")
            yield Checkbox("Pixels checked: no burned-in name, id or date", id="burned-in")
            earlier = len(priors_of(self.node.studies(), self.study))
            if earlier:  # offered only when there is something to send
                yield Checkbox(f"Send this patient's {earlier} earlier studies too", id="priors")
            yield Static("", id="form-error")
            with Horizontal():
                yield Button("Send (ctrl+s)", variant="primary", id="send")
                yield Button("Cancel (esc)", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#peer", Select).focus()

    @on(Select.Changed, "#peer")
    def _peer_chosen(self, event: Select.Changed) -> None:
        peer = next((p for p in self.trusted if p.node_id == event.value), None)
        box = self.query_one("#subspecialty", Input)
        if peer is not None and peer.subspecialties and not box.value:
            box.value = peer.subspecialties[0]

    @on(Select.Changed, "#priority")
    def _priority_chosen(self, event: Select.Changed) -> None:
        if isinstance(event.value, str):
            self.query_one("#deadline", Input).value = str(DEFAULT_HOURS[event.value])

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.focus_next()

    def form(self) -> ConsultForm | str:
        peer = self.query_one("#peer", Select).value
        priority = self.query_one("#priority", Select).value
        try:
            hours = float(self.query_one("#deadline", Input).value.strip())
        except ValueError:
            return "The deadline is a number of hours, e.g. 4 or 0.5."
        form = ConsultForm(
            self.study.study_uid,
            peer if isinstance(peer, str) else "",
            self.query_one("#question", Input).value.strip(),
            priority if isinstance(priority, str) else "",
            self.query_one("#subspecialty", Input).value.strip(),
            hours,
            self.query_one("#jurisdiction", Input).value.strip().upper(),
            self.query_one("#burned-in", Checkbox).value,
            with_priors=any(box.value for box in self.query("#priors").results(Checkbox)),
        )
        return check(form) or form

    def error(self, text: str) -> None:
        self.query_one("#form-error", Static).update(safe_text.safe(text))

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "send":
            self.action_send()
        else:
            self.action_cancel()

    def action_send(self) -> None:
        form = self.form()
        if isinstance(form, str):
            self.error(form)
            return
        self.error("sending…")

        async def send() -> None:
            try:
                outcome = await self.node.request_consult(form)
            except ActionError as exc:
                self.error(str(exc))
                return
            self.dismiss(outcome)

        job: WorkType[None] = send  # mypy cannot solve run_worker's union for an async def
        self.run_worker(job, exclusive=True, group="share")

    def action_cancel(self) -> None:
        self.dismiss(None)
