"""Home: who I am, how the node is doing, the worklist, transfers and notifications."""

from __future__ import annotations

import time

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, ProgressBar, Static

from tui.facade import ConsultItem, NodeFacade

PRIORITY_STYLE = {"stat": "bold white on red", "urgent": "bold black on yellow", "routine": "green"}
REFRESH_SECONDS = 1.0


def countdown(deadline: float, now: float) -> str:
    left = int(deadline - now)
    if left < 0:
        return f"overdue {(-left) // 60}m"
    hours, rest = divmod(left, 3600)
    if hours >= 24:
        return f"{hours // 24}d {hours % 24}h"
    return f"{hours}h {rest // 60:02d}m"


class HomeScreen(Screen[None]):
    BINDINGS = [Binding("enter", "open", "open consult")]  # noqa: RUF012

    def __init__(self, node: NodeFacade) -> None:
        super().__init__()
        self.node = node
        self.items: list[ConsultItem] = []

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical():
            yield Static(id="identity")
            yield Static("[b]Worklist[/b] (inbox ← / outbox →)")
            yield DataTable(id="worklist", cursor_type="row")
            yield Static("[b]Transfers[/b]")
            yield Vertical(id="transfers")
            yield Static(id="notifications")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#worklist", DataTable)
        table.add_columns("", "priority", "request", "peer", "state", "due")
        table.styles.height = "auto"
        table.styles.max_height = 12
        self.query_one("#transfers").styles.height = "auto"
        self.refresh_data()
        self.set_interval(REFRESH_SECONDS, self.refresh_data)

    def refresh_data(self) -> None:
        status = self.node.status()
        ident = Text()
        ident.append(f"{status.display_name}", style="bold")
        ident.append(f"  {status.institution}\n")
        ident.append(f"Node id: {status.node_id}\n")
        for what, state, ok in status.lines:
            ident.append("● " if ok else "○ ", style="green" if ok else "red")
            ident.append(f"{what}: {state}   ")
        self.query_one("#identity", Static).update(ident)
        now = time.time()
        table = self.query_one("#worklist", DataTable)
        row = table.cursor_row
        table.clear()
        self.items = self.node.consults()
        for c in self.items:
            table.add_row(
                "←" if c.incoming else "→",
                Text(c.priority.upper(), style=PRIORITY_STYLE.get(c.priority, "")),
                c.title,
                c.peer,
                c.state,
                countdown(c.deadline, now),
            )
        if self.items:
            table.move_cursor(row=min(row, len(self.items) - 1))
        self._transfers()
        notes = self.node.notifications()
        self.query_one("#notifications", Static).update(
            "[b]Notifications[/b]\n" + ("\n".join(f"• {n}" for n in notes) or "none")
        )

    def _transfers(self) -> None:
        box = self.query_one("#transfers", Vertical)
        transfers = self.node.transfers()
        bars = list(box.query(ProgressBar))
        if len(bars) != len(transfers):
            box.remove_children()
            for t in transfers:
                box.mount(Static(f"{t.label} ← {t.peer}"))
                box.mount(ProgressBar(total=max(1, t.total_bytes), show_eta=False))
            return
        for bar, t in zip(bars, transfers, strict=True):
            bar.update(total=max(1, t.total_bytes), progress=t.done_bytes)

    def on_screen_resume(self) -> None:
        self.refresh_data()

    def action_open(self) -> None:
        table = self.query_one("#worklist", DataTable)
        if not self.items or not self.items[table.cursor_row].study_uid:
            self.notify("this request has no study on this node yet")
            return
        uid = self.items[table.cursor_row].study_uid
        study = next((s for s in self.node.studies() if s.study_uid == uid), None)
        if study is None:
            self.notify("the study has not arrived yet")
            return
        from tui.screens.viewer import ViewerScreen

        self.app.push_screen(ViewerScreen(self.node, study, live=True))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_open()
