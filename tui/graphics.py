"""Which way the viewer draws pixels: kitty graphics, sixel, or truecolor half-blocks.

:func:`choose` is the decision, pure: an explicit request (``--graphics`` or
``RADMESH_GRAPHICS``) wins; ``auto`` uses half-blocks when there is no
terminal or inside tmux/screen (they do not pass images through), trusts what
the environment says about kitty and known sixel terminals, and otherwise asks
the terminal (textual-image's queries, which only work *before* Textual starts
reading stdin). :func:`setup` runs that once at start-up and remembers the
answer and the cell size in pixels; widgets read :func:`mode` and
:func:`cell_pixels` afterwards.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from typing import Literal, cast

Mode = Literal["halfblock", "kitty", "sixel"]
CHOICES = ("auto", "kitty", "sixel", "halfblock")
ENV = "RADMESH_GRAPHICS"
HALF_BLOCK_CELL = (1, 2)  # display pixels per cell: one wide, two tall
SIXEL_TERMINALS = ("foot", "mlterm", "contour", "wezterm", "konsole", "xterm-sixel")

_chosen: tuple[Mode, tuple[int, int]] | None = None


class GraphicsError(ValueError):
    pass


def choose(
    requested: str | None,
    env: Mapping[str, str],
    is_tty: bool,
    probe: Callable[[], Mode | None],
) -> Mode:
    """The drawing mode for this run; ``probe`` asks the terminal (called only if needed)."""
    wanted = (requested or env.get(ENV) or "auto").strip().lower()
    if wanted not in CHOICES:
        raise GraphicsError(
            f"unknown graphics mode {wanted!r}: use one of {', '.join(CHOICES)} "
            f"(--graphics or {ENV})"
        )
    if wanted != "auto":
        return cast(Mode, wanted)
    term = env.get("TERM", "").lower()
    if not is_tty or "TMUX" in env or term.startswith(("screen", "tmux")) or term == "dumb":
        return "halfblock"
    if term == "xterm-kitty" or "KITTY_WINDOW_ID" in env:
        return "kitty"
    program = env.get("TERM_PROGRAM", "").lower()
    if any(name in (term, program) for name in SIXEL_TERMINALS):
        return "sixel"
    return probe() or "halfblock"


def probe_terminal() -> Mode | None:
    """Ask the terminal itself (sixel first, as textual-image does: kitty answers TGP only)."""
    from textual_image.renderable import sixel, tgp

    if sixel.query_terminal_support():
        return "sixel"
    if tgp.query_terminal_support():
        return "kitty"
    return None


def setup(requested: str | None = None) -> Mode:
    """Decide once, before the app starts; later calls return the first answer."""
    global _chosen
    if _chosen is None:
        out, inp = sys.__stdout__, sys.__stdin__
        is_tty = bool(out and inp and out.isatty() and inp.isatty())
        chosen = choose(requested, os.environ, is_tty, probe_terminal)
        cell = HALF_BLOCK_CELL
        if chosen != "halfblock":
            from textual_image._terminal import get_cell_size

            size = get_cell_size()
            cell = (max(1, size.width), max(1, size.height))
        _chosen = (chosen, cell)
    return _chosen[0]


def mode() -> Mode:
    """What :func:`setup` chose; half-blocks if it never ran (tests, headless)."""
    return _chosen[0] if _chosen is not None else "halfblock"


def cell_pixels() -> tuple[int, int]:
    return _chosen[1] if _chosen is not None else HALF_BLOCK_CELL
