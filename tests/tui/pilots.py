"""What the TUI tests do through textual's pilot: a node in memory, the viewer opened on
its first study, keys pressed and the screen's text read back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from textual.pilot import Pilot

from crypto.identity import Identity
from tui.app import RadmeshApp
from tui.facade import NodeFacade
from tui.memory import InMemoryNode
from tui.screens.viewer import ViewerScreen


def make_node(**kw: int) -> InMemoryNode:
    return InMemoryNode(Identity.generate(), **kw)


def svg_text(app: RadmeshApp) -> str:
    return app.export_screenshot().replace("&#160;", " ")


async def open_viewer(
    pilot: Pilot[Any], node: NodeFacade | None = None, live: bool = True
) -> ViewerScreen:
    """The viewer on ``node``'s (by default the app's node's) first study, loaded."""
    app = pilot.app
    if node is None:
        assert isinstance(app, RadmeshApp)
        node = app.node
    screen = ViewerScreen(node, node.studies()[0], live=live)
    await app.push_screen(screen)
    await app.workers.wait_for_complete()
    await pilot.pause()
    return screen


async def press(pilot: Pilot[Any], *keys: str) -> None:
    """Presses ``keys``, then lets the app handle what they set off."""
    await pilot.press(*keys)
    await pilot.pause()


@asynccontextmanager
async def viewer_app(
    size: tuple[int, int],
) -> AsyncIterator[tuple[InMemoryNode, RadmeshApp, Pilot[None], ViewerScreen]]:
    """A new in-memory node's app run at ``size``, its live viewer open on the first study:
    the node, the app, the pilot and the viewer."""
    node = make_node()
    app = RadmeshApp(node)
    async with app.run_test(size=size) as pilot:
        yield node, app, pilot, await open_viewer(pilot, node)
