"""Every key, on one page (`?`)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

HELP = """\
[b]radmesh — keys[/b]   (q or escape closes this page; ctrl+p opens the command palette)

[b]Anywhere[/b]   ?/F1 help   F2 home   F3 studies   F4 peers   ctrl+q quit
[b]Home[/b]       enter opens the request's study in a live consult (even while it streams in)
           inbox ←: a accept  d decline (with a reason)  f fetch study    outbox →: w withdraw
           inbox ←, while its study arrives: z pause / go on   c cancel (f fetches the rest)
           g guests the other party proposed for a live session: a approve  r refuse
[b]Studies[/b]    enter view   l live consult   s request a consult (tab moves, ctrl+s sends)
[b]Peers[/b]      / search (words: name, subspecialty, jurisdiction, online)   v verify key
[b]Viewer[/b]
  j/k ↓/↑ wheel   next/previous slice      PgDn/PgUp ±10      Home/End first/last
  n/N             next/previous series (each keeps its own window and slice)   C cine on/off
  1-8             presets: brain, subdural, stroke, bone, lung, abdomen, liver, mediastinum
  drag (mouse)    window: right = wider, down = higher level
  i invert   +/- zoom   H/J/K/L or shift+arrows pan   R reset
  P point  A arrow(+text)  M length  G angle  E ellipse ROI   escape: no tool
  with a tool: arrows/hjkl move the keyboard cursor (shift or HJKL: 8 steps), space places
  a point (no mouse needed); a click also places one. Values (mm, °, HU) show on the image
  without a tool, a click selects an annotation (also [ ])
  x/del removes your own   p present   f follow the presenter (your own move stops it)
  g propose a guest (a verified peer) for the live session; the other party approves it
  multi-frame: j/k walk frames   images: --graphics kitty|sixel|halfblock|auto
  r type in the report   c type in the chat (enter sends)   escape: back to the image
  the focused pane has a bold border; the bottom line says VIEW / REPORT / CHAT / SERIES
  F8 critical   F9 finalise
  q close the viewer
"""


class HelpScreen(ModalScreen[None]):
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 96; height: 80%; border: round $accent; padding: 1 2; }
    """
    BINDINGS = [Binding("q,escape,question_mark", "close", "close")]  # noqa: RUF012

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(HELP, id="help-text")

    def action_close(self) -> None:
        self.dismiss(None)
