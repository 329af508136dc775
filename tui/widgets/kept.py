"""Widgets that give the compositor the lines they gave it last time when none has changed.

A screen update renders every widget whose area overlaps what changed, each with all its
lines: on a slice step the image's rows change, and with them the screen, its containers,
the edge letters and the bars around the image are rendered again, though nothing in them
changed. Textual keeps their lines, but finding for each line that it is kept, with the
widget's colours and line filters worked out again, costs about a third of the step's
compositing.

Textual marks a widget's lines dirty whenever they must change (new content, its styles,
the theme: a refresh); until one is, the same crop of a widget of the same size through the
same line filters is the same list of lines. :func:`kept_lines` hands that list back; a
widget class uses it in its ``render_lines`` (single inheritance: Textual takes a widget's
CSS type and focus defaults from its first base).
"""

from __future__ import annotations

from collections.abc import Callable

from textual.containers import Horizontal, Vertical
from textual.geometry import Region
from textual.strip import Strip
from textual.widget import Widget
from textual.widgets import Header, Static

_KEPT = "_radmesh_kept_lines"


def kept_lines(
    widget: Widget, crop: Region, render: Callable[[Region], list[Strip]]
) -> list[Strip]:
    """``render(crop)`` (the widget's own ``render_lines``), or the lines it gave last time
    when none of its lines was marked dirty since and the crop, the size and the line filters
    are the same."""
    key = (crop, widget.outer_size, widget.size, tuple(widget.get_line_filters()))
    kept: tuple[object, list[Strip]] | None = getattr(widget, _KEPT, None)
    # Textual's own "render these again" (private: a Textual without it renders each time)
    dirty = getattr(getattr(widget, "_styles_cache", None), "_dirty_lines", True)
    if (
        kept is not None
        and kept[0] == key
        and not dirty
        and not (widget.auto_links and widget.hover_style.link_id)  # links restyled on hover
    ):
        return kept[1]
    lines = render(crop)
    setattr(widget, _KEPT, (key, lines))
    return lines


class KeptHorizontal(Horizontal):
    def render_lines(self, crop: Region) -> list[Strip]:
        return kept_lines(self, crop, super().render_lines)


class KeptVertical(Vertical):
    def render_lines(self, crop: Region) -> list[Strip]:
        return kept_lines(self, crop, super().render_lines)


class KeptStatic(Static):
    def render_lines(self, crop: Region) -> list[Strip]:
        return kept_lines(self, crop, super().render_lines)


class KeptHeader(Header):
    def render_lines(self, crop: Region) -> list[Strip]:
        return kept_lines(self, crop, super().render_lines)
