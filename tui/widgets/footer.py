"""The key bar at the bottom of every screen: Textual's Footer, rebuilt only when it changes.

Textual's Footer throws its keys away and mounts new ones whenever its screen says its
bindings may have changed: on every focus move and every screen pushed or popped, often
two or three times for one key press. Each new key is styled three times as it mounts
(its compact class set, then unset), so a viewer with thirty keys spent a third of a
screen change restyling a bar that shows the same keys. This one rebuilds only when
what it shows (the keys, their descriptions, which are enabled) is different.
"""

from __future__ import annotations

from collections.abc import Hashable

from textual import widgets
from textual.geometry import Region
from textual.strip import Strip

from tui.widgets.kept import kept_lines


class Footer(widgets.Footer):
    """A footer that keeps its keys while the bindings it shows stay the same."""

    _shown: Hashable = None  # nothing drawn yet

    def _what_it_shows(self) -> Hashable:
        """What Footer.compose draws from: the shown bindings, enabled or not, with their
        tooltips and key labels (a keymap may change those), and the command palette's key."""
        palette = self.app.COMMAND_PALETTE_BINDING if self.show_command_palette else None
        return tuple(
            (binding, enabled, tooltip, self.app.get_key_display(binding))
            for key, (_, binding, enabled, tooltip) in self.screen.active_bindings.items()
            if binding.show or key == palette
        )

    def render_lines(self, crop: Region) -> list[Strip]:
        return kept_lines(self, crop, super().render_lines)  # tui.widgets.kept

    async def recompose(self) -> None:
        if not self.is_attached:  # its screen went away before this ran
            return
        shown = self._what_it_shows()
        if shown == self._shown:
            return
        self._shown = shown
        await super().recompose()
