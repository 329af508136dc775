"""Pilot tests of the guest keys: g in the viewer proposes a verified peer, g on Home
answers the other party's proposals; peer-written text is shown as typed, never as markup."""

from __future__ import annotations

from crypto.identity import Identity
from tests.tui.pilots import press, svg_text
from tui.app import RadmeshApp
from tui.facade import GuestProposal
from tui.memory import InMemoryNode
from tui.screens.guests import GuestAnswers, GuestPicker
from tui.screens.help import HelpScreen
from tui.screens.home import HomeScreen
from tui.screens.viewer import ViewerScreen

SIZE = (100, 30)  # what the screens do, not their layout: the smallest screen renders fastest
FULL = (150, 45)  # the help page lists every key only when it has the room


async def test_g_in_the_live_viewer_proposes_a_verified_peer_as_a_guest() -> None:
    node = InMemoryNode(Identity.generate())
    app = RadmeshApp(node)
    async with app.run_test(size=SIZE) as pilot:
        await app.push_screen(ViewerScreen(node, node.studies()[0], live=True))
        await app.workers.wait_for_complete()
        await pilot.pause()
        await press(pilot, "g")
        assert isinstance(app.screen, GuestPicker)
        shown = svg_text(app)
        assert "Dr Neuro" in shown  # verified
        assert "Dr Bones" not in shown  # unverified: a node never vouches for such a key
        await pilot.press("enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert isinstance(app.screen, ViewerScreen)
        assert ("propose-guest", "consult-1", "PEER-NEURO") in node.actions
        assert any("must approve it too" in n.message for n in app._notifications)


async def test_g_in_a_viewer_without_a_live_consult_says_why_and_escape_cancels() -> None:
    node = InMemoryNode(Identity.generate())
    app = RadmeshApp(node)
    async with app.run_test(size=SIZE) as pilot:
        viewer = ViewerScreen(node, node.studies()[0], live=False)
        await app.push_screen(viewer)
        await pilot.pause()
        await press(pilot, "g")
        assert app.screen is viewer
        assert "guests join a live consult" in viewer.message
        await app.push_screen(ViewerScreen(node, node.studies()[0], live=True))
        await pilot.pause()
        await press(pilot, "g")
        await press(pilot, "escape")
    assert not [a for a in node.actions if a[0] == "propose-guest"]


async def test_g_on_home_approves_and_refuses_the_other_partys_proposals() -> None:
    node = InMemoryNode(Identity.generate())
    node.proposals = [
        GuestProposal("c-1", "CT head", "GUEST-ONE", "[b]Dr Surgeon[/b]", "verified", "PEER-NE"),
        GuestProposal("c-1", "CT head", "GUEST-TWO", "Dr Unknown", "unverified", "PEER-NE"),
    ]
    app = RadmeshApp(node)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert isinstance(app.screen, HomeScreen)
        assert "2 guest proposal(s) wait for your answer" in svg_text(app)
        await press(pilot, "g")
        assert isinstance(app.screen, GuestAnswers)
        shown = svg_text(app)
        assert "[b]Dr Surgeon[/b]" in shown  # the peer's text as typed, not rendered as markup
        assert "verified" in shown
        await pilot.press("a")  # the first one
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert ("approve-guest", "c-1", "GUEST-ONE") in node.actions
        assert "1 guest proposal(s) wait for your answer" in svg_text(app)
        await press(pilot, "g")
        await pilot.press("r")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert ("refuse-guest", "c-1", "GUEST-TWO") in node.actions
        assert "guest proposal(s)" not in svg_text(app)
        await press(pilot, "g")  # nothing left to answer: says so, no dialog
        assert isinstance(app.screen, HomeScreen)


async def test_the_help_page_lists_the_guest_keys() -> None:
    app = RadmeshApp(InMemoryNode(Identity.generate()))
    async with app.run_test(size=FULL) as pilot:
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        shown = svg_text(app)
        assert "g propose a guest" in shown
        assert "g guests the other party proposed" in shown
