"""Peer-supplied text made safe to show: on a terminal, in the TUI, in CLI output.

Anything a peer wrote (a name, an institution, a clinical question, a chat line, a
report, an error text it sent back) is data. Printed raw, an ESC starts a terminal
escape sequence (retitle the window, rewrite the screen, paste into the shell),
``\\r`` and ``\\b`` overwrite what was printed before them, and the bidi overrides
U+202A-U+202E / U+2066-U+2069 reorder what follows so a line reads differently from
what it holds. :func:`printable` turns every such character into a visible
placeholder, so the text keeps its length roughly and the person sees that
something odd was there. It does not escape markup: the TUI wraps the result in a
Rich ``Text`` (:mod:`tui.safe_text`), which is never parsed as markup.

A display name is not an identity: anyone can publish a record with anyone's name.
:func:`peer_label` shows a name only together with the key's short id and the trust
state this node holds for that key.
"""

from __future__ import annotations

import logging
import re
import unicodedata

ELLIPSIS = "…"
MAX_NAME_CHARS = 40  # a display name, institution, subspecialty in one line
MAX_LINE_CHARS = 160  # a question, a title, a reason in one line

_CONTROL_PICTURES = 0x2400  # U+2400..U+241F picture C0 controls; U+2421 is DEL


def _placeholder(match: re.Match[str]) -> str:
    ch = match.group()
    code = ord(ch)
    if ch == "\t":
        return " "
    if code < 0x20:
        return chr(_CONTROL_PICTURES + code)  # ESC -> ␛, CR -> ␍, BS -> ␈
    if code == 0x7F:
        return "␡"
    if 0xD800 <= code <= 0xDFFF:  # a lone surrogate cannot even be printed
        return "\ufffd"
    return f"<U+{code:04X}>"


# Replaced besides C0: DEL and the C1 controls; the bidi embeddings, overrides, isolates and
# marks (they reorder text on screen); the line and paragraph separators (they break a line
# where a one-line field shows none); lone surrogates (the terminal cannot encode them).
_ODD = "\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029\ud800-\udfff"
_ONE_LINE = re.compile(f"[\\x00-\\x1f{_ODD}]")
_MULTI_LINE = re.compile(f"[\\x00-\\x09\\x0b-\\x1f{_ODD}]")  # all but the newline


def printable(text: object, max_chars: int | None = None, *, multiline: bool = False) -> str:
    """``text`` with every control character replaced by a visible placeholder.

    One-line (the default): newlines become ␊ too, and a text longer than
    ``max_chars`` is cut with an ellipsis. ``multiline`` keeps ``\\n`` (a chat
    message, a report) and cuts nothing unless ``max_chars`` is given.
    """
    raw = text if isinstance(text, str) else str(text)
    if max_chars is not None and len(raw) > 4 * max_chars:
        # Each character shows as one or more: the cut below comes out the same, and an
        # endless string is not scanned to show its first few characters.
        raw = raw[: 4 * max_chars]
    out = (_MULTI_LINE if multiline else _ONE_LINE).sub(_placeholder, raw)
    if max_chars is not None and len(out) > max_chars:
        out = out[: max(0, max_chars - 1)] + ELLIPSIS
    return out


class PrintableFormatter(logging.Formatter):
    """Log lines on a terminal: a logged peer string (a refusal, a record field) carries
    no escape sequence to it."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record), multiline=True)


# A name must not look like the "(short id, trust)" a label adds: its round brackets (and
# look-alikes) show as square ones, runs of spaces as one (no padding pushes the real key
# out of a column), and invisible format characters (zero-width spaces, joiners) visibly.
_OPEN = "(\uff08\ufe59\u207d\u208d\u2768\u276a\u2985\uff5f\u2e28\u27ee"
_CLOSE = ")\uff09\ufe5a\u207e\u208e\u2769\u276b\u2986\uff60\u2e29\u27ef"
_BRACKETS = str.maketrans(dict.fromkeys(_OPEN, "[") | dict.fromkeys(_CLOSE, "]"))
_SPACES = re.compile(r"[ \t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]+")


def _invisible(ch: str) -> str:
    return f"<U+{ord(ch):04X}>" if unicodedata.category(ch) == "Cf" else ch


def display_name(name: str) -> str:
    """A peer's display name as :func:`peer_label` shows it (one line, cut, see above)."""
    raw = _SPACES.sub(" ", str(name)[: 4 * MAX_NAME_CHARS]).translate(_BRACKETS)
    raw = "".join(_invisible(ch) for ch in raw)
    return printable(raw, MAX_NAME_CHARS).strip()


def peer_label(name: str, short_id: str, trust: str) -> str:
    """``Dr Neuro (ABCDEFG, verified)``: the name never without the key and its trust."""
    shown = display_name(name)
    key = f"{short_id}, {trust}" if trust else short_id
    return f"{shown} ({key})" if shown else f"({key})"
