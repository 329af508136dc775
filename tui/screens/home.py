"""Home: who I am, how the node is doing, the worklist, transfers and notifications."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Header, ProgressBar, Static
from textual.worker import WorkType

from tui import safe_text
from tui.facade import ActionError, ConsultItem, GuestProposal, NodeFacade, TransferInfo
from tui.safe_text import MAX_LINE_CHARS, MAX_NAME_CHARS
from tui.screens.peers import TRUST_MARK
from tui.screens.prompt import TextPrompt
from tui.widgets.footer import Footer
from tui.widgets.overlay import age_sex

PRIORITY_STYLE = {"stat": "bold white on red", "urgent": "bold black on yellow", "routine": "green"}
REFRESH_SECONDS = 1.0
WORKLIST_TITLE_CHARS = 60


def countdown(deadline: float, now: float) -> str:
    left = int(deadline - now)
    if left < 0:
        return f"overdue {(-left) // 60}m"
    hours, rest = divmod(left, 3600)
    if hours >= 24:
        return f"{hours // 24}d {hours % 24}h"
    return f"{hours}h {rest // 60:02d}m"


def transfer_line(t: TransferInfo) -> Text:
    arrow = "←" if t.direction == "in" else "→"
    label, peer = safe_text.plain(t.label, MAX_NAME_CHARS), safe_text.plain(t.peer, MAX_NAME_CHARS)
    what = f"{arrow} {label} {'from' if t.direction == 'in' else 'to'} {peer}"
    numbers = f"{t.done_instances}/{t.total_instances} images, {t.done_bytes / 1e6:.1f}"
    numbers += f"/{t.total_bytes / 1e6:.1f} MB"
    if t.state == "running" and t.rate > 0:
        numbers += f", {t.rate / 1e6:.1f} MB/s"
        if t.eta is not None:
            numbers += f", {int(t.eta) // 60}:{int(t.eta) % 60:02d} left"
    state, short = safe_text.plain(t.state, 16), safe_text.plain(t.transfer_id, 8)
    return Text(f"{what}  {numbers}  [{state}]  #{short}", end="")


def peer_cell(c: ConsultItem) -> Text:
    """Who is on the other side: a name only with the short id and the trust state."""
    if c.peer_name or c.peer_trust:
        return safe_text.peer(c.peer_name, safe_text.plain(c.peer, 16), c.peer_trust)
    return safe_text.name(c.peer)


def site_cell(c: ConsultItem, width: int) -> Text:
    """The other side's institution with its short id and this node's trust in its key,
    marked as the Peers screen marks it: the institution is only what the peer publishes
    (anyone can publish any name), the id and the badge are what tell two apart."""
    badge = TRUST_MARK.get(c.peer_trust, c.peer_trust) if c.peer_trust else ""
    short = safe_text.plain(c.peer, 16)
    room = width - len(badge) - len(short) - 2
    if not c.peer_institution or room < 4:  # narrow: the id and the badge, never the name alone
        text = safe_text.name(short)
    else:
        text = safe_text.line(c.peer_institution, room)
        text.append(" ")
        text.append(safe_text.name(short, style="dim"))
    if badge:
        text.append(" ")
        text.append(safe_text.name(badge, style=safe_text.TRUST_STYLE.get(c.peer_trust, "")))
    return text


def study_cell(c: ConsultItem) -> Text:
    """Modality, image count, age and sex of the consult's study, once it is here."""
    if not (c.modality or c.images):
        return Text("-", style="dim", end="")
    parts = [safe_text.plain(c.modality, 12), f"{c.images} im" if c.images else ""]
    parts.append(age_sex(c.patient_age, c.patient_sex))
    return Text(" ".join(p for p in parts if p), end="", no_wrap=True)


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    width: int  # 0: what the others leave
    min_screen: int = 0  # shown on screens at least this wide


# Priority, question and due time stay at 80 columns; the rest give way, last first.
WORKLIST_COLUMNS = (
    Column("dir", "", 1),
    Column("priority", "priority", 8),
    Column("question", "question", 0),
    Column("site", "institution", 34),
    Column("study", "study", 15, 110),
    Column("peer", "peer", 36, 170),
    Column("state", "state", 12),
    Column("due", "due", 9),
)
NARROW_SITE = 20  # the institution column below NARROW_SCREEN
NARROW_SCREEN = 100
MIN_QUESTION = 16


def worklist_columns(screen_width: int) -> list[tuple[Column, int]]:
    """The columns shown at this screen width, with their widths (cell padding aside)."""
    shown = [c for c in WORKLIST_COLUMNS if screen_width >= c.min_screen]
    widths = {c.key: c.width for c in shown}
    if screen_width < NARROW_SCREEN:
        widths["site"] = NARROW_SITE
    padding = 2 * len(shown) + 2  # DataTable pads each cell by one; the scrollbar
    widths["question"] = max(MIN_QUESTION, screen_width - padding - sum(widths.values()))
    return [(c, widths[c.key]) for c in shown]


def state_cell(c: ConsultItem) -> Text:
    state = safe_text.name(c.state)
    if c.critical and c.state == "reported":
        state = safe_text.name("CRITICAL, not acked", style="bold white on red")
    elif c.ack_overdue:
        state = safe_text.name("reported, ack overdue", style="bold black on yellow")
    return state


class HomeScreen(Screen[None]):
    BINDINGS = [  # noqa: RUF012
        Binding("enter", "open", "open study"),
        Binding("a", "accept", "accept"),
        Binding("d", "decline", "decline"),
        Binding("f", "fetch", "fetch study"),
        Binding("w", "withdraw", "withdraw"),
        Binding("z", "pause", "pause/go on"),
        Binding("c", "cancel_transfer", "cancel transfer"),
        Binding("o", "availability", "online/on call/away"),
        Binding("g", "guests", "guest proposals"),
        Binding("k", "acknowledge", "acknowledge report"),
        Binding("v", "view_report", "read report"),
        Binding("e", "addendum", "addendum"),
    ]

    def __init__(self, node: NodeFacade) -> None:
        super().__init__()
        self.node = node
        self.items: list[ConsultItem] = []
        self._transfer_ids: list[str] | None = None
        self.columns: list[tuple[Column, int]] = []
        self._shown: tuple[object, ...] | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical():
            yield Static(id="critical")
            yield Static(id="identity")
            yield Static("[b]Worklist[/b] (inbox ← / outbox →)")
            yield DataTable(id="worklist", cursor_type="row")
            yield Static("[b]Transfers[/b]")
            yield Vertical(id="transfers")
            yield Static(id="notifications")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#worklist", DataTable)
        self._layout_columns(self.app.size.width)
        table.styles.height = "auto"
        table.styles.max_height = 12
        self.query_one("#transfers").styles.height = "auto"
        self.refresh_data()
        self.set_interval(REFRESH_SECONDS, self._tick)

    def on_resize(self, event: events.Resize) -> None:
        if self._layout_columns(event.size.width):
            self.refresh_data()

    def _layout_columns(self, width: int) -> bool:
        """Fit the worklist's columns to the screen; True when they changed."""
        columns = worklist_columns(width)
        if columns == self.columns:
            return False
        self.columns = columns
        table = self.query_one("#worklist", DataTable)
        table.clear(columns=True)
        for column, size in columns:
            table.add_column(column.label, width=size, key=column.key)
        return True

    def _cells(self, c: ConsultItem, now: float) -> dict[str, Text | str]:
        site_width = dict((col.key, size) for col, size in self.columns).get("site", 0)
        return {
            "dir": "←" if c.incoming else "→",
            "priority": safe_text.name(
                c.priority.upper(), style=PRIORITY_STYLE.get(c.priority, "")
            ),
            "question": safe_text.line(c.title, WORKLIST_TITLE_CHARS),
            "site": site_cell(c, site_width),
            "study": study_cell(c),
            "peer": peer_cell(c),
            "state": state_cell(c),
            "due": countdown(c.deadline, now),
        }

    def _tick(self) -> None:
        # Another screen is up (it refreshes on resume), or the app is closing and tearing the
        # widgets down under the timer: a query would then find nothing.
        try:
            if self.is_attached and self.is_current and self._snapshot() != self._shown:
                self.refresh_data()
        except ActionError:
            pass  # the node stopped: the app shows that error by itself (tui.remote)

    def _snapshot(self) -> tuple[object, ...]:
        """What the screen shows: redrawn only when this changed (each redraw rewrites the
        worklist and the transfers on the terminal, which over SSH is every second)."""
        now, consults = time.time(), self.node.consults()
        return (
            self.node.status(),
            consults,
            [countdown(c.deadline, now) for c in consults],
            self.node.transfers(),
            self.node.notifications(),
            self.node.critical_alerts(),
            len(self.node.guest_proposals()),
        )

    def refresh_data(self) -> None:
        self._shown = self._snapshot()
        status = self.node.status()
        ident = Text()
        ident.append(safe_text.name(status.display_name, style="bold"))
        ident.append(f"  {safe_text.plain(status.institution, MAX_NAME_CHARS)}\n")
        ident.append(f"Node id: {safe_text.plain(status.node_id)}\n")
        for what, state, ok in status.lines:
            ident.append("● " if ok else "○ ", style="green" if ok else "red")
            ident.append(f"{safe_text.plain(what)}: {safe_text.plain(state)}   ")
        self.query_one("#identity", Static).update(ident)
        self._critical()
        now = time.time()
        table = self.query_one("#worklist", DataTable)
        row = table.cursor_row
        table.clear()
        self.items = self.node.consults()
        for c in self.items:
            cells = self._cells(c, now)
            table.add_row(*(cells[column.key] for column, _ in self.columns))
        if self.items:
            table.move_cursor(row=min(row, len(self.items) - 1))
        self._transfers()
        notes = self.node.notifications()
        shown = Text(end="")
        shown.append("Notifications\n", style="bold")
        shown.append("\n".join(f"• {safe_text.plain(n, MAX_LINE_CHARS)}" for n in notes) or "none")
        shown.append(self._guest_line())
        self.query_one("#notifications", Static).update(shown)

    def _critical(self) -> None:
        """The banner of critical results not acknowledged yet: it stays until one is."""
        banner = self.query_one("#critical", Static)
        alerts = self.node.critical_alerts()
        banner.display = bool(alerts)
        text = Text(end="")
        for alert in alerts:
            level = f", escalation {alert.level}" if alert.level else ""
            text.append(
                f"CRITICAL RESULT: consult {safe_text.plain(alert.consult_id, 8)}{level}: "
                "select it in the outbox (→) and press k to acknowledge by name\n",
                style="bold white on red" if alert.level == 0 else "bold blink white on red",
            )
        banner.update(text)

    def _transfers(self) -> None:
        box = self.query_one("#transfers", Vertical)
        transfers = self.node.transfers()
        ids = [t.transfer_id for t in transfers]
        if ids != self._transfer_ids:  # new or gone: rebuild; else update in place
            self._transfer_ids = ids
            self._shown = None  # bars just mounted take their values on the next refresh
            box.remove_children()
            if not transfers:
                box.mount(Static("none", classes="transfer-line"))
            for t in transfers:
                box.mount(Static(transfer_line(t), classes="transfer-line"))
                box.mount(
                    ProgressBar(total=max(1, t.total_bytes), show_eta=False, classes="transfer-bar")
                )
        lines = list(box.query(".transfer-line").results(Static))
        bars = list(box.query(ProgressBar))
        for line, bar, t in zip(lines, bars, transfers, strict=False):
            line.update(transfer_line(t))
            bar.update(total=max(1, t.total_bytes), progress=t.done_bytes)

    def on_screen_resume(self) -> None:
        self.refresh_data()

    def selected(self) -> ConsultItem | None:
        row = self.query_one("#worklist", DataTable).cursor_row
        return self.items[row] if 0 <= row < len(self.items) else None

    def action_open(self) -> None:
        item = self.selected()
        if item is None or not item.study_uid:
            self.notify("this request has no study on this node yet")
            return
        study = next((s for s in self.node.studies() if s.study_uid == item.study_uid), None)
        if study is None:
            hint = (
                "it is not in this node's store"
                if not item.incoming
                else "press f to fetch it"
                if item.state in ("accepted", "transferring", "in_review")
                else "press a to accept the consult, then f to fetch it"
            )
            self.notify(f"the study has not arrived yet: {hint}")
            return
        from tui.screens.viewer import ViewerScreen

        self.node.record_view(study.study_uid, live=True)
        self.app.push_screen(ViewerScreen(self.node, study, live=True))

    def _incoming(self, verb: str) -> ConsultItem | None:
        item = self.selected()
        if item is None or not item.incoming or item.state == "live":
            self.notify(f"select a request in your inbox (←) to {verb} it", severity="warning")
            return None
        return item

    def _run(self, call: Callable[[], Awaitable[str]]) -> None:
        """Run a node action off the key handler; its outcome or error is a notification."""

        async def work() -> None:
            try:
                self.notify(await call())
            except ActionError as exc:
                self.notify(str(exc), severity="error", timeout=10)
            self.refresh_data()

        job: WorkType[None] = work  # mypy cannot solve run_worker's union for an async def
        self.run_worker(job, group="action")

    def action_accept(self) -> None:
        item = self._incoming("accept")
        if item is not None:
            self._run(lambda: self.node.respond(item.consult_id, True))

    def action_decline(self) -> None:
        item = self._incoming("decline")
        if item is None:
            return

        def answered(reason: str | None) -> None:
            if reason is None:
                return
            if not reason.strip():
                self.notify("declining needs a reason for the requester", severity="warning")
                return
            self._run(lambda: self.node.respond(item.consult_id, False, reason.strip()))

        self.app.push_screen(TextPrompt("Reason for declining (sent to the requester):"), answered)

    def action_fetch(self) -> None:
        item = self._incoming("fetch the study of")
        if item is None:
            return
        try:
            self.notify(self.node.fetch(item.consult_id))
        except ActionError as exc:
            self.notify(str(exc), severity="error", timeout=10)
        self.refresh_data()

    def _transfer_action(self, act: Callable[[str], str]) -> None:
        item = self._incoming("pause or cancel the study of")
        if item is None:
            return
        try:
            self.notify(act(item.consult_id))
        except ActionError as exc:
            self.notify(str(exc), severity="error", timeout=10)
        self.refresh_data()

    def action_pause(self) -> None:
        self._transfer_action(self.node.pause_transfer)

    def action_cancel_transfer(self) -> None:
        self._transfer_action(self.node.cancel_transfer)

    def action_withdraw(self) -> None:
        item = self.selected()
        if item is None or item.incoming:
            self.notify("select a request in your outbox (→) to withdraw it", severity="warning")
            return
        self._run(lambda: self.node.withdraw(item.consult_id))

    def action_acknowledge(self) -> None:
        item = self.selected()
        if item is None or item.incoming or item.state != "reported":
            self.notify("select a reported consult in your outbox (→) to acknowledge its report",
                        severity="warning")  # fmt: skip
            return

        def answered(name: str | None) -> None:
            if name is None:
                return
            self._run(lambda: self.node.acknowledge(item.consult_id, name.strip()))

        self.app.push_screen(TextPrompt("Acknowledged by (your name):"), answered)

    def action_view_report(self) -> None:
        """``v``: read the report received for the selected outbox consult."""
        from tui.screens.report import ReportScreen

        item = self.selected()
        if item is None or item.incoming:
            self.notify("select a consult in your outbox (→) to read its report",
                        severity="warning")  # fmt: skip
            return
        sections = self.node.report(item.consult_id)
        if sections is None:
            self.notify(f"no report has arrived for consult {safe_text.plain(item.consult_id, 8)}")
            return
        self.app.push_screen(ReportScreen(item.consult_id, sections))

    def action_addendum(self) -> None:
        """``e``: amend the report this node signed for the selected inbox consult."""
        item = self.selected()
        if item is None or not item.incoming or item.state not in ("reported", "acknowledged"):
            self.notify("select a consult in your inbox (←) that you reported to add an "
                        "addendum to its signed report", severity="warning")  # fmt: skip
            return

        def answered(text: str | None) -> None:
            if text is None:
                return
            if not text.strip():
                self.notify("an addendum needs its text", severity="warning")
                return
            self._run(lambda: self.node.add_addendum(item.consult_id, text.strip()))

        self.app.push_screen(
            TextPrompt("Addendum to your signed report (signed and sent on enter):"), answered
        )

    def action_availability(self) -> None:
        self._run(self.node.cycle_availability)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_open()

    def _guest_line(self) -> Text:
        """The worklist's marker for guest proposals waiting for this node's answer."""
        waiting = len(self.node.guest_proposals())
        if not waiting:
            return Text(end="")
        return Text(
            f"\n{waiting} guest proposal(s) wait for your answer: press g",
            style="bold yellow",
            end="",
        )

    def action_guests(self) -> None:
        """``g``: approve or refuse the guests the other party proposed."""
        from tui.screens.guests import GuestAnswers

        proposals = self.node.guest_proposals()
        if not proposals:
            self.notify("no guest proposals wait for your answer")
            return

        def answered(choice: tuple[GuestProposal, bool] | None) -> None:
            if choice is not None:
                proposal, approve = choice
                self._run(
                    lambda: self.node.answer_guest(proposal.consult_id, proposal.guest, approve)
                )

        self.app.push_screen(GuestAnswers(proposals), answered)
