"""Red-team cases on the merged live-session, trust and display hardening.

Each test is an attack a hostile trusted peer, org member or organisation tries;
the ones that worked before their fix say so in their docstring.
"""

from __future__ import annotations

import contextlib
import json

import pytest

from consult.errors import Forgery, MalformedMessage
from consult.live import LiveConsult
from consult.presence import Cursor, Presence, PresenceMessage
from consult.shared import AnnotationKind, Removal, SharedState
from consult.ywire import varuint
from crypto.identity import Identity
from tests.adversary.test_live import IN_MEMORY, mallorys_updates, step2
from tests.consult.test_live import CONSULT, SOP

ALICE, BOB, MALLORY = Identity.generate(), Identity.generate(), Identity.generate()


class FakeLink:
    """What LiveConsult needs of a connection; what is sent is dropped."""

    def __init__(self, identity: Identity) -> None:
        self.peer = identity.public_key
        self.is_connected = True
        self.closed = False

    async def send_live(self, data: bytes) -> None:
        return None

    def send_presence(self, data: bytes) -> bool:
        return True


def awareness(client: int, clock: int, state: object) -> bytes:
    """A y-awareness message as a modified client writes it (one client, any id, any clock)."""
    body = json.dumps(state).encode()
    update = varuint(1) + varuint(client) + varuint(clock) + varuint(len(body)) + body
    return PresenceMessage(update).to_wire()


# --- presence client ids --------------------------------------------------------------------


@pytest.mark.parametrize("whose", ["alice", "own"])
async def test_a_peer_cannot_take_another_participants_presence_client_id(whose: str) -> None:
    """Mallory binds her connection to Alice's awareness client id (or Bob's own) and
    sends a "left" (null state) with a huge clock, or her own state under that id.

    Before the fix Bob's view dropped Alice for good (her later updates carried a
    lower clock and were ignored), and the presenter could be hidden the same way."""
    now = 1000.0
    bob = LiveConsult(CONSULT, BOB, "Bob", "#00d7ff", clock=lambda: now)
    alice = Presence(str(ALICE.node_id), "Alice", "#ff5f87", now)
    bob.bind(FakeLink(ALICE))
    bob.bind(FakeLink(MALLORY))
    try:
        hello = alice.poll(now)
        assert hello is not None
        bob.receive_presence(ALICE.public_key, hello)
        assert str(ALICE.node_id) in {p.node for p in bob.participants()}

        mallory_node = str(MALLORY.node_id)
        target = alice.client_id if whose == "alice" else bob.presence.client_id
        for state in (None, {"node": mallory_node, "name": "Alice", "colour": "#ff5f87"}):
            with contextlib.suppress(MalformedMessage):  # refused: her link is closed
                bob.receive_presence(MALLORY.public_key, awareness(target, 2**40, state))
        # Canary: alice moves her cursor; bob sees it, and still sees himself.
        alice.set_cursor(Cursor(SOP, 0, 5.0, 6.0), now + 1)
        moved = alice.poll(now + 1)
        assert moved is not None
        bob.receive_presence(ALICE.public_key, moved)
        shown = {p.node: p for p in bob.participants()}
        assert shown[str(ALICE.node_id)].cursor == Cursor(SOP, 0, 5.0, 6.0)
        assert shown[str(ALICE.node_id)].name == "Alice"
        assert str(BOB.node_id) in shown
    finally:
        await bob.close()


# --- tombstones -----------------------------------------------------------------------------


def test_a_tombstone_squatting_anothers_annotation_id_does_not_split_honest_peers() -> None:
    """Mallory sees Alice's new annotation and at once writes her own (validly signed)
    tombstone under its id; Bob gets Mallory's tombstone before Alice's annotation.

    Before the fix Bob kept the tombstone (he did not know the annotation yet) while
    Alice refused it; Alice's repair (the tombstone deleted) then looked to Bob like
    Alice removing a tombstone: Bob raised Forgery against honest Alice and closed her
    connection, and Alice could no longer remove her own annotation on Bob's screen."""
    alice, bob, mallory = (SharedState(IN_MEMORY, i) for i in (ALICE, BOB, MALLORY))
    mark = alice.add_annotation(AnnotationKind.POINT, SOP, 0, ((4, 4),), 1.0, text="nodule")
    mallory.receive(step2(alice), alice.local_node)
    squat = mallorys_updates(mallory)
    mallory._removed[mark.id] = (
        Removal(mark.id, mallory.local_node, 2.0).signed(MALLORY, IN_MEMORY).to_py()
    )
    alice_sent = mallorys_updates(alice)

    with contextlib.suppress(Forgery):  # Mallory's own tombstone: harmless, or refused
        bob.receive(squat[0], sender=mallory.local_node)
    bob.receive(step2(alice, bob), alice.local_node)
    with contextlib.suppress(Forgery):
        alice.receive(squat[0], sender=mallory.local_node)
    for update in alice_sent:  # alice's repairs, if any: honest, never a forgery at bob
        bob.receive(update, sender=alice.local_node)
    assert [a.id for a in bob.annotations()] == [mark.id]

    alice_sent.clear()
    alice.remove_annotation(mark.id, 3.0)  # alice still removes her own annotation
    for update in alice_sent:
        bob.receive(update, sender=alice.local_node)
    assert bob.annotations() == []
    assert alice.annotations() == []
    assert bob._removed.to_py() == alice._removed.to_py()
