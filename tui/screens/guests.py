"""Guests of a live session: pick one to propose (viewer, ``g``), answer the other party's
proposals (Home, ``g``). Thin: the rules are in :mod:`node.app.guests`; every peer-written
string (names, consult titles) is shown through :mod:`tui.safe_text`, never as markup."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList
from textual.widgets.option_list import Option

from tui import safe_text
from tui.facade import GuestProposal, PeerInfo

SHORT_ID_CHARS = 7
GUEST_TITLE_CHARS = 40

_CSS = """
{name} {{ align: center middle; }}
{name} > Vertical {{ width: 80; height: auto; max-height: 80%; border: round $accent;
    padding: 1; }}
{name} OptionList {{ height: auto; max-height: 16; }}
"""


def guest_candidates(peers: list[PeerInfo]) -> list[PeerInfo]:
    """Peers this node may vouch for: their keys are verified (or signed by a trusted
    organisation). The node checks again, and refuses a party of the consult."""
    return [p for p in peers if p.trust in ("verified", "organisation")]


class GuestPicker(ModalScreen[str | None]):
    """Choose a trusted peer to propose as a guest; dismisses with its node id."""

    DEFAULT_CSS = _CSS.format(name="GuestPicker")
    BINDINGS = [Binding("escape", "cancel", "cancel")]  # noqa: RUF012

    def __init__(self, consult_id: str, peers: list[PeerInfo]) -> None:
        super().__init__()
        self.consult_id = consult_id
        self.peers = peers

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(
                Text(
                    f"Propose a guest for the live session on consult "
                    f"{safe_text.plain(self.consult_id[:8])} (the other party must approve "
                    "it too). enter proposes, escape cancels:"
                )
            )
            yield OptionList(
                *[
                    Option(
                        safe_text.peer(
                            p.name, safe_text.plain(p.node_id[:SHORT_ID_CHARS]), p.trust
                        ),
                        id=p.node_id,
                    )
                    for p in self.peers
                ],
                id="guest-candidates",
            )

    def on_mount(self) -> None:
        self.query_one(OptionList).focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    def action_cancel(self) -> None:
        self.dismiss(None)


def proposal_line(p: GuestProposal) -> Text:
    line = Text(end="", no_wrap=True)
    line.append(
        safe_text.peer(p.guest_name, safe_text.plain(p.guest[:SHORT_ID_CHARS]), p.guest_trust)
    )
    line.append(f"  proposed by {safe_text.plain(p.proposed_by, SHORT_ID_CHARS)} for consult ")
    line.append(f"{safe_text.plain(p.consult_id[:8])}: ")
    line.append(safe_text.line(p.title, GUEST_TITLE_CHARS))
    return line


class GuestAnswers(ModalScreen[tuple[GuestProposal, bool] | None]):
    """The other party's proposals: ``a`` approves, ``r`` refuses the highlighted one."""

    DEFAULT_CSS = _CSS.format(name="GuestAnswers")
    BINDINGS = [  # noqa: RUF012
        Binding("a", "answer(True)", "approve"),
        Binding("r", "answer(False)", "refuse"),
        Binding("escape", "cancel", "close"),
    ]

    def __init__(self, proposals: list[GuestProposal]) -> None:
        super().__init__()
        self.proposals = proposals

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Guests proposed for your consults' live sessions: a approve, r refuse")
            yield OptionList(*[proposal_line(p) for p in self.proposals], id="guest-proposals")

    def on_mount(self) -> None:
        options = self.query_one(OptionList)
        options.focus()
        if self.proposals:
            options.highlighted = 0

    def action_answer(self, approve: bool) -> None:
        index = self.query_one(OptionList).highlighted
        if index is not None and 0 <= index < len(self.proposals):
            self.dismiss((self.proposals[index], approve))

    def action_cancel(self) -> None:
        self.dismiss(None)
