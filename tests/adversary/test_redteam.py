"""Red-team cases on the merged live-session, trust and display hardening.

Each test is an attack a hostile trusted peer, org member or organisation tries;
the ones that worked before their fix say so in their docstring.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from consult.errors import Forgery, MalformedMessage
from consult.live import LiveConsult, ticket_input, ticket_valid
from consult.presence import Cursor, Presence, PresenceMessage
from consult.shared import (
    ANNOTATION_DOMAIN,
    AnnotationKind,
    ChatMessage,
    Removal,
    SharedState,
    SyncKind,
    SyncMessage,
    _signing_input,
)
from consult.ywire import varuint
from crypto.identity import Identity
from crypto.org import RevocationList, sign_revocations
from node.app.consults import ConsultService
from node.app.runtime import NodeRuntime
from registry.errors import TrustError
from registry.records import NodeRecord
from registry.trust import TrustState, TrustStore
from tests.adversary.test_live import IN_MEMORY, canary_arrives, mallorys_updates, step2
from tests.certs import certificate
from tests.consult.test_live import CONSULT, SOP, wait_for
from tests.peer_transport.helpers import mesh

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


# --- consortium: what a member's record claims ----------------------------------------------

NOW = 1_800_000_000
ORG, OTHER_ORG, MEMBER = Identity.generate(), Identity.generate(), Identity.generate()


def member_certificate(
    org: Identity = ORG, node: Identity = MEMBER, *, not_after: int = NOW + 86400
) -> bytes:
    return certificate(
        org, node, NOW, display_name="Dr M", subspecialties=("chest",), not_after=not_after
    )


def runtime_with(trust: TrustStore) -> NodeRuntime:
    return cast("NodeRuntime", SimpleNamespace(trust=trust))


def test_a_member_trusted_through_its_kept_certificate_cannot_claim_other_subspecialties(
    tmp_path: Path,
) -> None:
    """A member certified for chest in FR publishes a record without its certificate,
    claiming neuro in IE. The node kept its certificate from an earlier record, so the
    member is trusted by the organisation; before the fix routing then took the record's
    own (unattested) claims, and a neuro case for IE went to a chest radiologist."""
    trust = TrustStore(tmp_path / "trust.db")
    trust.add_org(ORG.public_key, NOW)
    assert trust.keep_certificate(MEMBER.public_key, member_certificate(), NOW)
    lying = NodeRecord.create(
        MEMBER, now=NOW, sequence=2, subspecialties=("neuro",), jurisdictions=("IE",)
    )
    candidate = ConsultService(runtime_with(trust)).candidate(lying, NOW)
    assert candidate is not None
    assert candidate.subspecialties == ("chest",)
    assert candidate.jurisdictions == ("FR",)


@pytest.mark.parametrize(
    "certificate",
    [
        pytest.param(lambda: member_certificate(org=OTHER_ORG), id="untrusted-org"),
        pytest.param(lambda: member_certificate(node=Identity.generate()), id="another-node"),
        pytest.param(lambda: member_certificate(not_after=NOW - 1), id="expired"),
    ],
)
def test_a_record_whose_certificate_adds_no_trust_is_no_candidate_and_is_not_kept(
    tmp_path: Path, certificate: Callable[[], bytes]
) -> None:
    trust = TrustStore(tmp_path / "trust.db")
    trust.add_org(ORG.public_key, NOW)
    cert = certificate()
    record = NodeRecord.create(MEMBER, now=NOW, sequence=1, org_certificate=cert)
    assert ConsultService(runtime_with(trust)).candidate(record, NOW) is None
    assert not trust.keep_certificate(MEMBER.public_key, cert, NOW)
    assert not trust.is_trusted(MEMBER.public_key, NOW)


def test_an_older_revocation_list_replayed_does_not_un_revoke(tmp_path: Path) -> None:
    trust = TrustStore(tmp_path / "trust.db")
    trust.add_org(ORG.public_key, NOW)
    trust.keep_certificate(MEMBER.public_key, member_certificate(), NOW)
    empty = sign_revocations(ORG, RevocationList(ORG.public_key, 1, NOW, frozenset(), frozenset()))
    names = RevocationList(ORG.public_key, 2, NOW, frozenset(), frozenset({MEMBER.public_key}))
    trust.add_revocations(empty, ORG.public_key)
    trust.add_revocations(sign_revocations(ORG, names), ORG.public_key)
    assert not trust.is_trusted(MEMBER.public_key, NOW)
    with pytest.raises(TrustError, match="not newer"):
        trust.add_revocations(empty, ORG.public_key)
    # A list signed by another organisation cannot pass for this one's.
    forged = sign_revocations(
        OTHER_ORG, RevocationList(OTHER_ORG.public_key, 9, NOW, frozenset(), frozenset())
    )
    with pytest.raises(TrustError, match="does not verify"):
        trust.add_revocations(forged, ORG.public_key)
    assert trust.state(MEMBER.public_key, NOW) is TrustState.REVOKED


# --- live tickets ---------------------------------------------------------------------------


def test_a_live_ticket_admits_only_its_joiner_to_its_consult() -> None:
    """Pins: a ticket Alice signed for Bob on one consult does not let Mallory in, nor
    Bob into another consult, nor does a ticket Mallory signed pass for Alice's."""
    ticket = ALICE.sign(ticket_input(CONSULT, BOB.public_key))
    assert ticket_valid(CONSULT, BOB.public_key, ALICE.public_key, ticket)
    assert not ticket_valid(CONSULT, MALLORY.public_key, ALICE.public_key, ticket)
    assert not ticket_valid("another-consult", BOB.public_key, ALICE.public_key, ticket)
    forged = MALLORY.sign(ticket_input(CONSULT, MALLORY.public_key))
    assert not ticket_valid(CONSULT, MALLORY.public_key, ALICE.public_key, forged)


# --- chat ids -------------------------------------------------------------------------------


def test_a_chat_message_under_anothers_message_id_does_not_hide_it() -> None:
    """Mallory sees Alice's objection and says something of her own (signed by her, so
    accepted) under the same message id, placed before it. Before the fix the chat was
    read by message id alone: everyone saw Mallory's line and not Alice's."""
    alice, bob, mallory = (SharedState(IN_MEMORY, i) for i in (ALICE, BOB, MALLORY))
    objection = alice.say("I disagree with the impression", 1.0)
    for state in (bob, mallory):
        state.receive(step2(alice, state), alice.local_node)
    sent = mallorys_updates(mallory)
    mine = ChatMessage(objection.id, mallory.local_node, 2.0, "agreed, sign it off")
    mallory._chat.insert(0, mine.signed(MALLORY, IN_MEMORY).to_py())
    for update in sent:
        bob.receive(update, sender=mallory.local_node)
    shown = [(m.author, m.text) for m in bob.snapshot().chat]
    assert (alice.local_node, "I disagree with the impression") in shown


# --- a malformed update that makes the CRDT library panic -------------------------------------

# Two signed annotation updates with a few bytes changed each (found by mutating real
# updates, then minimised): applying the second after the first makes pycrdt panic in Rust,
# and pyo3 raises PanicException, a BaseException.
PANICKING_UPDATES = (
    bytes.fromhex(
        "0101b9f28ed8dcbdad0c0128010b616e6e6f746174696f6e73203064313666393035333830663430393439"
        "39373665666438386561343031653701760a03736f707706322e32352e31056672616d657c000000000676"
        "616c75657376000261747c3f800024036b657974201c7204b39fca5bdbe2a9ee9202c04bc854140cf7e90a"
        "f2d08bcfe70ebaaed174047465787477000373696774407aad7d76be5c7c61858c011c986a391a7938d6ac"
        "aa8a51fd776bef7046fffc72d37c95ed9c94d815ec256bb9ca31caf7c00e9d375cf25b31ab0537072dbfe5"
        "05046b696e647705706f696e7406706f7e6e7473750175027c3f8000007c3f80000006617574686f72773f"
        "4f5532525351522d4e46595849484b2d3755584d36453311354d564b364a472d37594d494c4c4c2d434659"
        "4f594a472d354541503735372d48424f4136413400"
    ),
    bytes.fromhex(
        "0101b9f2bcd8cfbdad0c0128010b616e6e6f746174696f6e73203064313666393035333830663430393439"
        "39373665666438386561343031653701760a03736f707706322e32352e31056672616d657c000000000676"
        "616c75651c76000261747c3f800000036b657974201c7204b39fca5bdbe2a9ee9202c04bc854140cf7e90a"
        "f2d08bcfe70ebaaed174047465787477000373696774407aad7d76be5c7c61858c011c986a391a7938d6ac"
        "aa8a51fd776bef7046fffc72d37c95ed9c94d815ec256bb9ca31caf7c00e9d375cf25b31ab0537072dbfe5"
        "05046b696e647705706f696e7406706f696e7473750175027c3f8000007c3f80000006617574686f72773f"
        "4f5532525351522d4e46595849484b2d3755584d3645332d354d564b364a472d37594d494c4c4c2d434659"
        "4f594a472d354541503735372d48424f4136413400"
    ),
)


def test_an_update_that_makes_the_crdt_library_panic_is_a_malformed_message() -> None:
    """Before the fix the panic (a BaseException, not an Exception) went past every
    handler in the live receive path (which catches RemoteConsultError) and ended the
    connection's receive task; now it is a MalformedMessage like any other bad update,
    so the sender's link is closed and the session goes on."""
    alice = SharedState(IN_MEMORY, ALICE)
    first, second = (SyncMessage(SyncKind.UPDATE, u).to_wire() for u in PANICKING_UPDATES)
    with contextlib.suppress(MalformedMessage):
        alice.receive(first, sender=None)
    with pytest.raises(MalformedMessage):
        alice.receive(second, sender=None)
    canary_arrives(alice)


# --- the transport's receive loop -----------------------------------------------------------


async def test_an_exception_in_a_receiver_does_not_end_the_connections_receive_loop() -> None:
    """A receiver that fails on one message (a bug, or a library panic like the one
    above) must not end the link: before the fix the exception went up into aiortc's
    data channel code and no later message of that peer arrived."""
    async with mesh() as m:
        a, b = await m.node(), await m.node()
        m.trust(a, b)
        conn = await a.connect(b.identity.public_key)
        await wait_for(lambda: b.connection(a.identity.public_key) is not None)
        inbound = b.connection(a.identity.public_key)
        assert inbound is not None
        got: list[bytes] = []

        def receiver(data: bytes) -> None:
            if data == b"boom":
                raise ValueError("a receiver that fails on this message")
            got.append(data)

        inbound.set_receiver("live", receiver)
        await conn.send_live(b"boom")
        await conn.send_live(b"canary")
        await wait_for(lambda: got == [b"canary"])


def test_an_annotation_written_under_anothers_annotation_id_is_put_back() -> None:
    """Pin: Mallory overwrites Alice's annotation id with her own (validly signed) mark;
    Alice's comes back and Mallory's edit is a forgery, at Alice's and at Bob's."""
    alice, bob, mallory = (SharedState(IN_MEMORY, i) for i in (ALICE, BOB, MALLORY))
    mark = alice.add_annotation(AnnotationKind.POINT, SOP, 0, ((4, 4),), 1.0, text="nodule")
    for state in (bob, mallory):
        state.receive(step2(alice, state), alice.local_node)
    sent = mallorys_updates(mallory)
    fields: dict[str, object] = {
        **mark.to_py(),
        "author": mallory.local_node,
        "key": MALLORY.public_key,
        "text": "no nodule",
    }
    fields.pop("sig", None)
    fields["sig"] = MALLORY.sign(
        _signing_input(ANNOTATION_DOMAIN, IN_MEMORY, {**fields, "id": mark.id})
    )
    mallory._annotations[mark.id] = fields
    for state in (alice, bob):
        with pytest.raises(Forgery):
            state.receive(sent[0], sender=mallory.local_node)
        assert [(a.author, a.text) for a in state.annotations()] == [(alice.local_node, "nodule")]
