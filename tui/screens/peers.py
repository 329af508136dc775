"""Peers: directory with search and trust state; key verification by safety number."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Footer, Header, Input, Static

from tui.facade import NodeFacade, PeerInfo

TRUST_MARK = {
    "verified": "✔ verified",
    "organisation": "✔ org-signed",
    "unverified": "! unverified",
}


class PeersScreen(Screen[None]):
    BINDINGS = [  # noqa: RUF012
        Binding("slash", "search", "search"),
        Binding("v", "verify", "verify key"),
    ]

    def __init__(self, node: NodeFacade) -> None:
        super().__init__()
        self.node = node
        self.shown: list[PeerInfo] = []

    def compose(self) -> ComposeResult:
        yield Header()
        yield Input(placeholder="search: name, subspecialty, jurisdiction, online", id="search")
        yield DataTable(id="peers", cursor_type="row")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#peers", DataTable).add_columns(
            "name", "institution", "subspecialties", "jurisdictions", "online", "trust"
        )
        self.reload()
        self.query_one("#peers", DataTable).focus()

    def on_screen_resume(self) -> None:
        self.reload()

    def reload(self) -> None:
        query = self.query_one("#search", Input).value
        table = self.query_one("#peers", DataTable)
        table.clear()
        self.shown = [p for p in self.node.peers() if p.matches(query)]
        for p in self.shown:
            table.add_row(
                p.name,
                p.institution,
                ", ".join(p.subspecialties),
                ", ".join(p.jurisdictions),
                "online" if p.online else "offline",
                TRUST_MARK.get(p.trust, p.trust),
            )

    def on_input_changed(self, event: Input.Changed) -> None:
        self.reload()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.query_one("#peers", DataTable).focus()

    def action_search(self) -> None:
        self.query_one("#search", Input).focus()

    def action_verify(self) -> None:
        row = self.query_one("#peers", DataTable).cursor_row
        if 0 <= row < len(self.shown):
            peer = self.shown[row]
            self.app.push_screen(VerifyScreen(self.node, peer), lambda _: self.reload())


class VerifyScreen(ModalScreen[bool]):
    """Both people read the same number aloud; if it matches, the key is the right one."""

    DEFAULT_CSS = """
    VerifyScreen { align: center middle; }
    VerifyScreen > Vertical { width: 72; height: auto; border: round $accent; padding: 1 2; }
    """
    BINDINGS = [  # noqa: RUF012
        Binding("y", "confirm", "numbers match"),
        Binding("n,escape", "cancel", "do not match / cancel"),
    ]

    def __init__(self, node: NodeFacade, peer: PeerInfo) -> None:
        super().__init__()
        self.node = node
        self.peer = peer

    def compose(self) -> ComposeResult:
        number = self.node.safety_number(self.peer.node_id)
        with Vertical():
            yield Static(f"[b]Verify {self.peer.name}[/b] ({self.peer.institution})")
            yield Static(
                "Call them on a channel you already trust and read this number aloud.\n"
                "They see the same number on their screen for you."
            )
            yield Static(f"\n[b]{number}[/b]\n", id="safety-number")
            yield Static("y: the numbers match, trust this key    n: they differ, do not trust")

    def action_confirm(self) -> None:
        self.node.mark_verified(self.peer.node_id)
        self.dismiss(True)

    def action_cancel(self) -> None:
        self.dismiss(False)
