"""Live sessions end to end: real NodeRuntimes, a real registry, real aiortc on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from consult.errors import LocalConsultError, MalformedMessage
from consult.live import (
    FRAGMENT_SIZE,
    MAX_FRAGMENTS,
    MAX_PARTIAL_MESSAGES,
    Invite,
    LiveConsult,
    LiveFragment,
    PresenceEnvelope,
    Reassembler,
    check_presence,
    fragment,
)
from consult.measure import PixelSpacing, length_mm
from consult.presence import Cursor, Presence, Viewport
from consult.shared import Annotation, AnnotationKind
from crypto.identity import Identity
from node.app.runtime import NodeRuntime
from node.core.config import NodeHome
from peer_transport.connection import TransportOptions
from peer_transport.rtc import RtcOptions, restrict_host_addresses
from tests.node.test_runtime import new_home

FAST = TransportOptions(rtc=RtcOptions(ice_servers=()), connect_timeout=10.0, backoff_initial=0.2)
CONSULT = "c0ffee00c0ffee00c0ffee00c0ffee00"
SOP = "2.25.42"


# --- helpers shared with the TUI tests ------------------------------------------------------


def make_home(root: Path, name: str, registry: str = "") -> tuple[NodeHome, Identity]:
    return new_home(root, name, registry)


async def start_node(root: Path, name: str, registry: str = "") -> NodeRuntime:
    restrict_host_addresses(["127.0.0.1"])
    home, identity = make_home(root, name, registry)
    runtime = NodeRuntime(home, identity, transport_options=FAST)
    await runtime.start()
    return runtime


def introduce(nodes: list[NodeRuntime]) -> None:
    """Every node knows every other's LAN record and has verified its key."""
    for a in nodes:
        for b in nodes:
            if a is not b:
                assert b.record is not None
                a.directory.remember(b.record, "test", a.now())
                a.trust.mark_verified(b.identity.node_id, a.now())


async def wait_for(predicate: Callable[[], object], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.fixture
async def trio(tmp_path: Path, registry: str) -> AsyncIterator[list[NodeRuntime]]:
    nodes = [await start_node(tmp_path, name, registry) for name in ("ana", "ben", "cai")]
    introduce(nodes)
    yield nodes
    for node in nodes:
        await node.stop()


def key(node: NodeRuntime) -> bytes:
    return node.identity.public_key


async def live_session(
    host: NodeRuntime, *guests: NodeRuntime, title: str = ""
) -> list[LiveConsult]:
    """CONSULT opened on ``host``, who invites each of ``guests`` in turn: each one's live
    session, the host's first."""
    sessions = [host.live_hub().open(CONSULT, title)]
    for guest in guests:
        await host.live_hub().invite(CONSULT, key(guest))
    return sessions + [guest.live_hub().sessions[CONSULT] for guest in guests]


def sees(live: LiveConsult, node: NodeRuntime) -> bool:
    return any(p.node == str(node.identity.node_id) for p in live.participants())


# --- three real nodes -----------------------------------------------------------------------


async def test_three_participants_share_annotations_chat_report_and_cursors(
    trio: list[NodeRuntime],
) -> None:
    a, b, c = trio
    # c is told about b and connects to it too
    live_a, live_b, live_c = await live_session(a, b, c, title="head CT")
    await wait_for(lambda: live_b.is_bound(key(c)) and live_c.is_bound(key(b)))

    spacing = PixelSpacing(0.5, 0.5)
    mm = length_mm((10, 10), (70, 90), spacing)
    ruler = live_a.add_annotation(
        AnnotationKind.LENGTH, SOP, 0, ((10, 10), (70, 90)), values={"length_mm": mm}
    )
    live_b.say("looks like a subdural to me")
    live_c.set_report_text("Acute left subdural haematoma.")
    live_b.move_cursor(Cursor(SOP, 0, 120.5, 64.0))

    everyone = (live_a, live_b, live_c)
    await wait_for(
        lambda: all(
            [x.id for x in s.annotations()] == [ruler.id]
            and [m.text for m in s.chat()] == ["looks like a subdural to me"]
            and s.report_text() == "Acute left subdural haematoma."
            for s in everyone
        )
    )
    assert live_c.annotations()[0].values["length_mm"] == pytest.approx(50.0)
    assert live_c.annotations()[0].author == str(a.identity.node_id)

    def cursor_of_b(s: LiveConsult) -> Cursor | None:
        found = [p.cursor for p in s.participants() if p.node == str(b.identity.node_id)]
        return found[0] if found else None

    await wait_for(lambda: cursor_of_b(live_a) == cursor_of_b(live_c) == Cursor(SOP, 0, 120.5, 64))
    live_b.move_cursor(Cursor(SOP, 0, 121.5, 65.0))
    await wait_for(lambda: cursor_of_b(live_c) == Cursor(SOP, 0, 121.5, 65.0))
    assert {len(s.participants()) for s in everyone} == {3}


async def test_a_late_joiner_receives_a_state_larger_than_one_frame(
    trio: list[NodeRuntime],
) -> None:
    a, b, c = trio
    live_a, _ = await live_session(a, b)
    for i in range(600):
        live_a.add_annotation(
            AnnotationKind.ARROW, SOP, i % 40, ((i, i), (i + 5, i + 9)), text=f"finding {i}"
        )
    live_b = b.live_hub().sessions[CONSULT]
    await wait_for(lambda: len(live_b.annotations()) == 600, 30)  # 600 edits over aiortc
    live_b.say("joining the third reader")
    assert len(live_a.state.full_update()) > 2 * FRAGMENT_SIZE

    await b.live_hub().invite(CONSULT, key(c))
    live_c = c.live_hub().sessions[CONSULT]
    await wait_for(lambda: len(live_c.annotations()) == 600 and len(live_c.chat()) == 1, 30)
    assert live_c.state.snapshot() == live_a.state.snapshot()


async def test_a_silent_participant_is_shown_gone_within_5_s(trio: list[NodeRuntime]) -> None:
    a, b, _ = trio
    live_a, live_b = await live_session(a, b)
    await wait_for(lambda: sees(live_a, b))
    # b's process hangs: it stops sending presence, its connection stays up.
    assert live_b._tick is not None
    live_b._tick.cancel()
    silent_since = time.monotonic()
    await wait_for(lambda: not sees(live_a, b), within=6.0)
    assert time.monotonic() - silent_since <= 5.2


async def test_a_participant_whose_node_stops_is_gone_at_once(trio: list[NodeRuntime]) -> None:
    a, b, _ = trio
    live_a, _ = await live_session(a, b)
    await wait_for(lambda: sees(live_a, b))
    await b.live_hub().leave(CONSULT)
    await wait_for(lambda: not sees(live_a, b), within=2.0)


async def test_a_participant_whose_connection_drops_is_gone_within_5_s(
    trio: list[NodeRuntime],
) -> None:
    a, b, _ = trio
    live_a, b_live = await live_session(a, b)
    await wait_for(lambda: sees(live_a, b))
    assert b_live._tick is not None
    b_live._tick.cancel()  # no goodbye: the process is gone, not leaving
    await b.transport.close()
    dropped = time.monotonic()
    await wait_for(lambda: not sees(live_a, b), within=6.0)
    assert time.monotonic() - dropped <= 5.2


async def test_followers_take_the_presenters_viewport_until_they_move(
    trio: list[NodeRuntime],
) -> None:
    a, b, c = trio
    live_a, live_b, live_c = await live_session(a, b, c)
    first = Viewport("2.25.7", 12, 80, 40)
    live_a.set_viewport(first)
    live_a.present(True)
    await wait_for(lambda: live_b.presence.presenter() is not None and sees(live_c, a))
    live_b.follow()
    live_c.follow()
    await wait_for(lambda: live_b.presence.me.viewport == live_c.presence.me.viewport == first)

    live_c.set_viewport(Viewport("2.25.7", 3, 400, 40))  # c moves on their own
    second = Viewport("2.25.7", 20, 80, 40, zoom=2.0)
    live_a.set_viewport(second)
    await wait_for(lambda: live_b.presence.me.viewport == second)
    # c has the presenter's new viewport too (what it would have jumped to, following)...
    await wait_for(lambda: (p := live_c.presence.presenter()) is not None and p.viewport == second)
    assert live_c.presence.me.viewport == Viewport("2.25.7", 3, 400, 40)  # ...and stayed
    assert not live_c.presence.following


async def test_invites_go_only_to_trusted_peers(tmp_path: Path, registry: str) -> None:
    a = await start_node(tmp_path, "ana", registry)
    b = await start_node(tmp_path, "ben", registry)
    try:
        a.live_hub().open(CONSULT)
        with pytest.raises(LocalConsultError, match="not trusted"):
            await a.live_hub().invite(CONSULT, key(b))
        assert CONSULT not in b.live_hub().sessions
    finally:
        await a.stop()
        await b.stop()


# --- wire and caps, in memory ---------------------------------------------------------------


def test_fragments_reassemble_to_the_message() -> None:
    message = bytes(range(256)) * 1000
    pieces = fragment(CONSULT, 7, message)
    assert len(pieces) == -(-len(message) // FRAGMENT_SIZE)
    r = Reassembler()
    out = [r.feed(LiveFragment.from_wire(p.to_wire())) for p in pieces]
    assert out[:-1] == [None] * (len(pieces) - 1)
    assert out[-1] == message


def test_reassembly_refuses_out_of_order_and_too_many_partials() -> None:
    message = b"x" * (FRAGMENT_SIZE * 3)
    r = Reassembler()
    first, _, third = fragment(CONSULT, 1, message)
    r.feed(first)
    with pytest.raises(MalformedMessage, match="out of order"):
        r.feed(third)
    r = Reassembler()
    for message_id in range(MAX_PARTIAL_MESSAGES):
        r.feed(fragment(CONSULT, message_id, message)[0])
    with pytest.raises(MalformedMessage, match="too many"):
        r.feed(fragment(CONSULT, 99, message)[0])


def test_a_fragment_declaring_too_many_parts_is_refused_before_buffering() -> None:
    wire = LiveFragment(CONSULT, 1, 0, MAX_FRAGMENTS + 1, b"x").to_wire()
    with pytest.raises(MalformedMessage, match="out of range"):
        LiveFragment.from_wire(wire)
    with pytest.raises(MalformedMessage):
        LiveFragment.from_wire(b"L1\x00")


def test_presence_must_claim_the_connections_own_node() -> None:
    alice, mallory = Identity.generate().node_id, Identity.generate().node_id
    presence = Presence(str(alice), "Alice", "#fff", now=0.0)
    message = presence.poll(0.0)
    assert message is not None
    client = check_presence(message, str(alice), None)
    assert client == presence.client_id
    with pytest.raises(MalformedMessage, match="another node"):
        check_presence(message, str(mallory), None)
    other = Presence(str(alice), "Alice 2", "#fff", now=0.0).poll(0.0)
    assert other is not None
    with pytest.raises(MalformedMessage, match="its own presence"):
        check_presence(other, str(alice), client)


def test_invite_round_trip_and_caps() -> None:
    invite = Invite(CONSULT, (b"k" * 32,), "head CT")
    assert Invite.from_wire(invite.to_wire()) == invite
    with pytest.raises(MalformedMessage):
        Invite.from_wire(Invite(CONSULT, (b"short",)).to_wire())
    with pytest.raises(MalformedMessage):
        Invite.from_wire(b"\x00" * 5000)


async def test_edits_made_apart_merge_when_the_peer_reconnects(trio: list[NodeRuntime]) -> None:
    a, b, _ = trio
    live_a, live_b = await live_session(a, b)
    live_a.set_report_text("Findings: ")
    live_a.add_annotation(AnnotationKind.POINT, SOP, 0, ((1, 1),))
    await wait_for(lambda: live_b.report_text() == "Findings: " and live_b.annotations())

    # b goes offline: its connection to a is closed, both keep working on their own copy.
    await b.live_hub()._links[key(a)].close("laptop lid closed")
    await wait_for(lambda: not live_a.is_bound(key(b)) and not live_b.is_bound(key(a)))
    live_a.set_report_text("Findings: left subdural. ")
    live_a.add_annotation(AnnotationKind.ARROW, SOP, 1, ((2, 2), (9, 9)), text="a's arrow")
    live_a.say("from a while apart")
    live_b.set_report_text("Findings: \nImpression: acute SDH.")
    live_b.add_annotation(AnnotationKind.POINT, SOP, 2, ((5, 5),), text="b's point")
    live_b.say("from b while apart")
    assert live_a.state.snapshot() != live_b.state.snapshot()

    await a.live_hub().invite(CONSULT, key(b))  # back: a new connection, the same session
    await wait_for(lambda: live_a.state.snapshot() == live_b.state.snapshot())
    merged = live_a.state.snapshot()
    assert {x.text for x in merged.annotations} == {"", "a's arrow", "b's point"}
    assert {m.text for m in merged.chat} == {"from a while apart", "from b while apart"}
    assert "left subdural." in merged.report
    assert "Impression: acute SDH." in merged.report


async def test_a_modified_client_cannot_delete_anothers_annotation_over_the_network(
    trio: list[NodeRuntime],
) -> None:
    a, b, c = trio
    live_a, live_b, live_c = await live_session(a, b, c)
    mark = live_a.add_annotation(AnnotationKind.POINT, SOP, 0, ((4, 4),), text="a's finding")
    await wait_for(lambda: all(s.annotations() for s in (live_b, live_c)))
    await wait_for(lambda: live_b.is_bound(key(c)) and live_c.is_bound(key(b)))

    del live_b.state._annotations[mark.id]  # b's client skips the author check
    # a and c each restore it and drop b's connection; b gets it back from neither.
    await wait_for(lambda: not live_a.is_bound(key(b)) and not live_c.is_bound(key(b)))
    # Canaries on the ordered live channel, each way between a and c: whatever either sent
    # before (b's deletion relayed, say) has been taken in by the other.
    live_a.say("canary from a")
    await wait_for(lambda: "canary from a" in [m.text for m in live_c.chat()])
    live_c.say("canary from c")
    await wait_for(lambda: "canary from c" in [m.text for m in live_a.chat()])
    assert [x.id for x in live_a.annotations()] == [mark.id]
    assert [x.id for x in live_c.annotations()] == [mark.id]


async def test_a_late_joiner_refuses_a_catch_up_carrying_an_annotation_forged_in_anothers_name(
    trio: list[NodeRuntime],
) -> None:
    a, b, c = trio
    live_b = b.live_hub().open(CONSULT)
    honest = live_b.add_annotation(AnnotationKind.POINT, SOP, 0, ((4, 4),), text="b's own")
    # b's modified client writes a finding in a's name (signed with b's key) into its copy.
    forged = replace(
        Annotation("f" * 32, AnnotationKind.POINT, SOP, 0, ((9.0, 9.0),), "", 1.0, "a says"),
        author=str(a.identity.node_id),
    ).signed(b.identity, CONSULT)
    live_b.state._annotations[forged.id] = forged.to_py()

    await b.live_hub().invite(CONSULT, key(c))  # c catches up from b alone
    live_c = c.live_hub().sessions[CONSULT]
    await wait_for(lambda: live_c.annotations() and not live_c.is_bound(key(b)))
    assert [x.id for x in live_c.annotations()] == [honest.id]


def test_a_listener_reads_the_state_each_local_edit_left() -> None:
    """Listeners used to be called from the document's observer, inside the transaction:
    the TUI's refresh read the state there and failed ("Already in a transaction")."""
    live = LiveConsult(CONSULT, Identity.generate(), "me", "#ffffff")
    seen: list[tuple[list[str], int, str]] = []
    live.subscribe(
        lambda: seen.append(
            ([m.text for m in live.chat()], len(live.annotations()), live.report_text())
        )
    )
    live.say("hello")
    mark = live.add_annotation(AnnotationKind.POINT, SOP, 0, ((4.0, 4.0),))
    live.set_report_text("No bleed.")
    live.remove_annotation(mark.id)
    assert seen == [
        (["hello"], 0, ""),
        (["hello"], 1, ""),
        (["hello"], 1, "No bleed."),
        (["hello"], 0, "No bleed."),
    ]


class KeptLink:
    """A LiveLink that keeps the presence messages sent on it."""

    def __init__(self, peer: bytes) -> None:
        self.peer, self.is_connected, self.closed = peer, True, False
        self.presence: list[bytes] = []

    async def send_live(self, data: bytes) -> None:
        return None

    def send_presence(self, data: bytes) -> bool:
        self.presence.append(PresenceEnvelope.from_wire(data).message)
        return True


async def test_a_presence_heartbeat_that_changes_nothing_wakes_no_listener() -> None:
    """An idle viewer must not redraw every time a peer says it is still there."""
    ida, idb = Identity.generate(), Identity.generate()
    a = LiveConsult(CONSULT, ida, "Dr Ana", "#ff00ff")
    b = LiveConsult(CONSULT, idb, "Dr Ben", "#00ff00")
    to_a = KeptLink(ida.public_key)
    a.bind(KeptLink(idb.public_key))
    b.bind(to_a)
    woken: list[int] = []
    a.subscribe(lambda: woken.append(len(a.participants())))
    try:
        a.receive_presence(idb.public_key, to_a.presence[-1])  # b appears
        assert woken == [2]
        now = time.time()
        heartbeat = b.presence.poll(now + 2.0)  # nothing changed since: a heartbeat
        assert heartbeat is not None
        a.receive_presence(idb.public_key, heartbeat)
        b.presence.set_cursor(Cursor(SOP, 0, 4.0, 4.0), now + 3.0)
        moved = b.presence.poll(now + 3.0)  # the canary: a real change, after the heartbeat
        assert moved is not None
        a.receive_presence(idb.public_key, moved)
        assert woken == [2, 2]
    finally:
        await a.close()
        await b.close()
