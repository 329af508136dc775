"""Peers: directory with search and trust state; key verification by safety number."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Header, Input, Static

from tui import safe_text
from tui.facade import NodeFacade, PeerInfo
from tui.safe_text import MAX_NAME_CHARS
from tui.widgets.footer import Footer

SHORT_ID_CHARS = 7

TRUST_MARK = {
    "verified": "✔ verified",
    "organisation": "✔ org-signed",
    "unverified": "! unverified",
}


def short_id(peer: PeerInfo) -> str:
    """The key's first group: two peers publishing the same name differ here."""
    return peer.node_id[:SHORT_ID_CHARS]


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
            "name", "id", "institution", "subspecialties", "jurisdictions", "online", "trust"
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
                safe_text.name(p.name),
                safe_text.name(short_id(p)),
                safe_text.name(p.institution),
                safe_text.name(", ".join(p.subspecialties)),
                safe_text.name(", ".join(p.jurisdictions)),
                "online" if p.online else "offline",
                safe_text.name(TRUST_MARK.get(p.trust, p.trust)),
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
            title = Text("Verify ", style="bold", end="")
            title.append(safe_text.peer(self.peer.name, short_id(self.peer), self.peer.trust))
            title.append(f" {safe_text.plain(self.peer.institution, MAX_NAME_CHARS)}")
            yield Static(title)
            yield Static(Text(f"Node id: {safe_text.plain(self.peer.node_id, 80)}"))
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
