"""A study still streaming in: the viewer takes in slices listed after it opened."""

from __future__ import annotations

from crypto.identity import Identity
from tests.consult.test_live import wait_for
from tui.app import RadmeshApp
from tui.facade import InstanceRef
from tui.memory import InMemoryNode
from tui.screens.viewer import ViewerScreen


class ListingNode(InMemoryNode):
    """A node whose sender has listed only the first ``listed`` slices so far."""

    listed = 4

    def instances(self, series_uid: str) -> list[InstanceRef]:
        return super().instances(series_uid)[: self.listed]


async def test_a_series_opened_before_all_its_slices_were_listed_takes_in_the_rest() -> None:
    node = ListingNode(Identity.generate(), slices=12, missing=10)
    app = RadmeshApp(node)
    async with app.run_test(size=(100, 30)) as pilot:
        viewer = ViewerScreen(node, node.studies()[0])
        await app.push_screen(viewer)
        await app.workers.wait_for_complete()
        await pilot.press("j")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert len(viewer.instances) == 4
        shown = viewer.current
        assert shown is not None

        node.listed = 12
        await wait_for(lambda: len(viewer.instances) == 12)
        assert viewer.current is not None
        assert viewer.current.sop_uid == shown.sop_uid  # the slice on screen stays
        await pilot.pause()
        assert "Im 2/12" in app.export_screenshot().replace("&#160;", " ")
