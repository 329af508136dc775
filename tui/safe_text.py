"""Peer text -> a Rich ``Text`` that is shown literally: the one way such text reaches a widget.

A ``str`` handed to ``Static``, ``Label``, ``DataTable``, ``OptionList`` or ``notify``
is parsed as markup: ``[/]`` in a consult question raises and takes the app down
(at every start, since the question is stored), ``[@click=app.quit]`` binds an
action, ``[link=...]`` a link. A ``Text`` is never parsed. Control characters are
neutralised by :func:`node.core.display.printable` (the CLI uses the same function).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from rich.text import Text

from node.core.display import MAX_LINE_CHARS, MAX_NAME_CHARS, peer_label, printable

TRUST_STYLE = {
    "verified": "green",
    "organisation": "green",
    "trusted-by-org": "green",
    "unverified": "bold yellow",
    "unknown": "bold yellow",
    "pending": "bold yellow",
    "revoked": "bold red",
}

__all__ = [
    "MAX_LINE_CHARS",
    "MAX_NAME_CHARS",
    "colour",
    "finite",
    "line",
    "name",
    "peer",
    "plain",
    "safe",
]

DEFAULT_COLOUR = "#ffff00"
_HEX_COLOUR = re.compile(r"#[0-9a-fA-F]{6}")


def safe(text: object, max_chars: int | None = None, *, style: str = "") -> Text:
    """Multi-line peer text (chat, report, notification) as literal ``Text``."""
    return Text(printable(text, max_chars, multiline=True), style=style, end="")


def line(text: object, max_chars: int = MAX_LINE_CHARS, *, style: str = "") -> Text:
    """One line of peer text (a question, a title, a reason), cut with an ellipsis."""
    return Text(printable(text, max_chars), style=style, end="", no_wrap=True)


def name(text: object, *, style: str = "") -> Text:
    """A short peer field in one line: institution, subspecialty, modality, a UID."""
    return line(text, MAX_NAME_CHARS, style=style)


def plain(text: object, max_chars: int | None = None) -> str:
    """The neutralised string, for widgets that draw characters themselves."""
    return printable(text, max_chars)


def peer(display_name: str, short_id: str, trust: str, *, style: str = "") -> Text:
    """A peer as ``name (SHORTID, trust)``: a display name is never shown alone."""
    text = Text(peer_label(display_name, short_id, trust), style=style, end="", no_wrap=True)
    if trust:
        text.highlight_words([f", {trust})"], style=TRUST_STYLE.get(trust, "bold yellow"))
    return text


def colour(value: str, default: str = DEFAULT_COLOUR) -> str:
    """A participant's colour as a style: ``#rrggbb`` only. Anything else a peer sends
    would be parsed as a Rich style (``link file:///...``) or make the style raise."""
    return value if _HEX_COLOUR.fullmatch(value) else default


MAX_COORD = 1e9  # larger than any image or window value; the difference of two stays finite


def finite(values: Iterable[Iterable[float]]) -> bool:
    """Every coordinate a real number of a sane size: NaN or infinity from a peer, or
    huge finite points whose difference is infinite (1e308 - -1e308), must not reach
    the pixel maths (``int(nan)`` raises and takes the viewer down)."""
    return all(math.isfinite(v) and abs(v) <= MAX_COORD for point in values for v in point)
