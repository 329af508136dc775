"""Home's availability key: it asks the node to move to the next availability and says so."""

from __future__ import annotations

from crypto.identity import Identity
from tui.app import RadmeshApp
from tui.memory import InMemoryNode


async def test_o_on_home_cycles_the_availability() -> None:
    node = InMemoryNode(Identity.generate())
    app = RadmeshApp(node)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("o")
        await app.workers.wait_for_complete()
        await pilot.pause()
    assert ("availability",) in node.actions
