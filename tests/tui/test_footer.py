"""The key bar: it follows what the keys do, and is not rebuilt while that stays the same."""

from __future__ import annotations

from textual.widget import Widget
from textual.widgets import OptionList

from crypto.identity import Identity
from tui.app import RadmeshApp
from tui.memory import InMemoryNode
from tui.screens.viewer import ViewerScreen
from tui.widgets.footer import Footer


def keys(footer: Footer) -> dict[str, Widget]:
    return {key.key: key for key in footer.query("FooterKey")}  # type: ignore[attr-defined]


async def test_the_footer_drops_letter_keys_while_the_chat_has_them_else_stays_put() -> None:
    node = InMemoryNode(Identity.generate())
    app = RadmeshApp(node)
    async with app.run_test(size=(100, 30)) as pilot:
        viewer = ViewerScreen(node, node.studies()[0], live=True)
        await app.push_screen(viewer)
        await app.workers.wait_for_complete()
        await pilot.pause()
        footer = viewer.query_one(Footer)
        before = keys(footer)
        assert "i" in before

        viewer.query_one("#series", OptionList).focus()  # its own keys are not shown
        await pilot.pause()
        viewer.view.focus()
        await pilot.pause()
        after = keys(footer)
        assert after.keys() == before.keys()
        assert all(after[key] is before[key] for key in before)  # the same widgets, not rebuilt

        await pilot.press("c")  # the chat has the keys: the viewer's letters do nothing
        await pilot.pause()
        assert "i" not in keys(footer)
        assert "f1" in keys(footer)
        await pilot.press("escape")
        await pilot.pause()
        assert "i" in keys(footer)
        # The keys change twice and the screen closes before its footer catches up.
        await pilot.press("c", "escape", "q")
        await pilot.pause()
        assert app.screen is not viewer
