"""Regenerate docs/live-consult.svg: the demo's live consult as the TUI shows it.

Run: .venv/bin/python docs/make_screenshot.py
"""

from __future__ import annotations

import asyncio
import io
import tempfile
from pathlib import Path

from node.demo.story import DemoNetwork, scripted_surgeon, stage
from tui.app import RadmeshApp
from tui.node_facade import RuntimeNode

OUT = Path(__file__).with_name("live-consult.svg")


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        net = DemoNetwork(Path(tmp), out=io.StringIO())
        try:
            await net.start(with_pacs=False)
            staged = await stage(net, slices=12, rows=256)
            surgeon = asyncio.create_task(scripted_surgeon(staged, 256, moves=200, period=0.05))
            app = RadmeshApp(RuntimeNode(net.nodes["neurorad"]))
            async with app.run_test(size=(150, 42)) as pilot:
                await pilot.pause(1.0)
                await pilot.press("enter")
                await asyncio.sleep(6)  # the surgeon marks the collection, then presents
                await pilot.press("f")  # follow the presenter: the slice with the collection
                await asyncio.sleep(1)
                await pilot.pause()
                OUT.write_text(app.export_screenshot(title="radmesh live consult"))
            surgeon.cancel()
        finally:
            await net.stop()
    print(f"wrote {OUT}")


if __name__ == "__main__":
    asyncio.run(main())
