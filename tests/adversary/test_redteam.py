"""Red-team cases on the merged live-session, trust and display hardening.

Each test is an attack a hostile trusted peer, org member or organisation tries;
the ones that worked before their fix say so in their docstring.
"""

from __future__ import annotations

import contextlib

from consult.errors import Forgery
from consult.shared import AnnotationKind, Removal, SharedState
from crypto.identity import Identity
from tests.adversary.test_live import IN_MEMORY, SOP, mallorys_updates, step2

ALICE, BOB, MALLORY = Identity.generate(), Identity.generate(), Identity.generate()


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
