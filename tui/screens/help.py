"""Every key, on one page (`?`)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

HELP = """\
[b]radmesh — keys[/b]   (q/escape closes; ctrl+p opens the command palette)
[b]Anywhere[/b]  ?/F1 help  F2 home  F3 studies  F4 peers  ctrl+q quit
[b]Viewer[/b]
  j/k ↓/↑ wheel  next/previous slice   PgDn/PgUp ±10   Home/End first/last
  n/N            next/previous series (each keeps its window, slice)  C cine
  1-8            presets: brain, subdural, stroke, bone, lung, abdomen,
                 liver, mediastinum
  drag (mouse)   window: right = wider, down = higher level
  i invert   +/- zoom   H/J/K/L or shift+arrows pan   R reset
  P point  A arrow(+text)  M length  G angle  E ellipse ROI  escape: no tool
  with a tool: arrows/hjkl move the cursor (shift/HJKL ×8), space places a
  point (or click); values (mm, °, HU) show on the image. No tool: a click
  selects an annotation (also [ ])   x/del removes your own
  p present   f follow the presenter (your own move stops it)
  g propose a guest (a verified peer); the other party approves it
  r type in the report  c type in the chat (enter sends)  escape: back
  the focused pane has a bold border; the bottom line: VIEW/REPORT/CHAT
  under 120 columns: t shows/folds the consult panel, s the series list
  overlay: age/sex, accession, slice location/thickness, R/L/A/P/S/I on the
  edges, HU (or value) under the pointer or keyboard cursor, W/L, zoom
  multi-frame: j/k walk frames   images: --graphics kitty|sixel|halfblock|auto
  ctrl+t template  F8 critical  F9 preview, enter signs+sends, esc edits  q close
[b]Home[/b]  enter opens the request's study in a live consult (even as it arrives)
  inbox ←: a accept  d decline (with a reason)  f fetch study
  inbox ←, while its study arrives: z pause / go on  c cancel (f fetches the rest)
  outbox →: w withdraw  v read the report and its addenda  k acknowledge it by
  name (required if critical)   inbox ←, reported by you: e signed addendum
  g guests the other party proposed for a live session: a approve  r refuse
  o availability: online / on call / away
[b]Studies[/b]  enter view  l live consult  s request a consult (tab moves, ctrl+s sends)
  p compare with the prior: j/k step both (linked by slice position)  o these two
  slices are the same level  t flip current/prior  v the prior's report  s series
[b]Peers[/b]    / search (name, subspecialty, jurisdiction, online)  v verify key
"""


class HelpScreen(ModalScreen[None]):
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll {
        width: 84; max-width: 100%; height: 100%; border: round $accent; padding: 0 1;
    }
    """
    BINDINGS = [Binding("q,escape,question_mark", "close", "close")]  # noqa: RUF012

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(HELP, id="help-text")

    def action_close(self) -> None:
        self.dismiss(None)
