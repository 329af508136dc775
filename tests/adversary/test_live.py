"""Attacks on live sessions: who gets in, and what a participant may put in the shared state.

Real NodeRuntimes, a real registry and real aiortc on 127.0.0.1 (helpers from
tests/consult/test_live.py), plus in-memory pairs where the attack is on the
state itself.
"""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path

import pytest

from consult import shared
from consult.admission import GuestConsent
from consult.errors import Forgery, LimitExceeded, LocalConsultError, MalformedMessage
from consult.live import (
    INVITE_KIND,
    JOIN_KIND,
    MAX_AUDITED_REFUSALS,
    MAX_INVITED_SESSIONS,
    NOT_ADMITTED,
    Invite,
    LiveConsult,
    check_presence,
    ticket_input,
)
from consult.presence import MAX_NAME_CHARS, Presence
from consult.requests import State
from consult.shared import (
    ANNOTATION_DOMAIN,
    CHAT_DOMAIN,
    MAX_ANNOTATIONS_PER_AUTHOR,
    MAX_CHAT_CHARS,
    MAX_LABEL_CHARS,
    MAX_REPORT_CHARS,
    MAX_VALUES,
    AnnotationKind,
    Removal,
    SharedState,
    SyncKind,
    SyncMessage,
    _signing_input,
    _tomb_key,
)
from consult.store import MAX_GUESTS
from crypto.identity import Identity, NodeId
from node.app import consults
from node.app.runtime import NodeRuntime
from peer_transport.errors import RemoteError
from tests.consult import test_live as consult_live
from tests.consult.test_live import (
    CONSULT,
    SOP,
    introduce,
    key,
    live_session,
    start_node,
    wait_for,
)
from tests.node.test_runtime import request_from

# --- fixtures -------------------------------------------------------------------------------

# Three trusted nodes: a (requesting hospital), b (consultant), c (a third node).
trio = consult_live.trio


def consult_between(requester: NodeRuntime, consultant: NodeRuntime) -> str:
    """A consult the consultant accepted, as both consult databases record it."""
    now = requester.now()
    request = request_from(requester.identity, now)
    wire = request.to_wire(requester.identity)
    requester.consults.add(
        request, role="requester", now=now, wire=wire, peer=str(consultant.identity.node_id)
    )
    consultant.consults.add(
        request, role="consultant", now=now, wire=wire, peer=str(requester.identity.node_id)
    )
    return request.id


def texts(live: LiveConsult) -> list[str]:
    return [m.text for m in live.chat()]


async def live_consult(
    requester: NodeRuntime, consultant: NodeRuntime
) -> tuple[str, LiveConsult, LiveConsult]:
    """A consult between the two whose live session the requester opened and invited the
    consultant into: its id, the requester's session and the consultant's."""
    consult_id = consult_between(requester, consultant)
    live = requester.live_hub().open(consult_id)
    await requester.live_hub().invite(consult_id, key(consultant))
    return consult_id, live, consultant.live_hub().sessions[consult_id]


# --- admission (issue 13 item 4) ------------------------------------------------------------


async def test_a_trusted_node_that_knows_the_consult_id_is_refused_audited_and_sees_nothing(
    trio: list[NodeRuntime],
) -> None:
    a, b, c = trio
    consult_id, live_a, live_b = await live_consult(a, b)
    live_a.say("draft: left subdural")
    await wait_for(lambda: texts(live_b) == ["draft: left subdural"])

    # c is trusted by both, is no party and was invited by nobody: a modified client
    # that asks to join, then to "invite" a into the consult it has the id of.
    conn = await c.transport.connect(key(a))
    arrived: list[bytes] = []
    conn.set_receiver("live", arrived.append)
    conn.set_receiver("presence", arrived.append)
    with pytest.raises(RemoteError) as join:
        await conn.request(JOIN_KIND, Invite(consult_id).to_wire())
    assert join.value.code == NOT_ADMITTED
    with pytest.raises(RemoteError) as invite:
        await conn.request(INVITE_KIND, Invite(consult_id).to_wire())
    assert invite.value.code == NOT_ADMITTED
    assert not live_a.is_bound(key(c))

    refusals = a.audit.records(kind="consult", peer=str(c.identity.node_id))
    assert [(r.details["consult"], r.details["event"]) for r in refusals] == [
        (consult_id, "live-join-refused"),
        (consult_id, "live-invite-refused"),
    ]
    assert set(refusals[0].details) == {"consult", "event"}  # who, which consult; no PHI

    # Canary: a party's message after the refusals reaches the other party; on a's
    # connection to c, a marker sent after it is the first and only live data c gets.
    live_a.say("canary")
    await wait_for(lambda: "canary" in texts(live_b))
    back = await a.transport.connect(key(c))
    await back.send_live(b"marker")
    await wait_for(lambda: b"marker" in arrived)
    assert arrived == [b"marker"]


async def test_a_guest_is_admitted_only_once_both_parties_approved_it(
    trio: list[NodeRuntime],
) -> None:
    a, b, c = trio
    consult_id, live_a, live_b = await live_consult(a, b)

    # The consultant alone cannot bring a colleague into the hospital's case.
    await b.consulting.approve_live_guest(consult_id, key(c))
    with pytest.raises(LocalConsultError, match="must both approve"):
        await b.live_hub().invite(consult_id, key(c))
    # ... nor can the colleague join the hospital's node on the consultant's word.
    conn = await c.transport.connect(key(a))
    with pytest.raises(RemoteError) as join:
        await conn.request(JOIN_KIND, Invite(consult_id).to_wire())
    assert join.value.code == NOT_ADMITTED

    await a.consulting.approve_live_guest(consult_id, key(c))  # the hospital agrees
    await wait_for(
        lambda: (
            str(a.identity.node_id)
            in b.consults.guest_approvers(consult_id, str(c.identity.node_id))
        )
    )
    approvals = b.audit.records(kind="consult", peer=str(c.identity.node_id))
    assert [r.details.get("by") for r in approvals] == [None, str(a.identity.node_id)]
    await b.live_hub().invite(consult_id, key(c))
    live_c = c.live_hub().sessions[consult_id]
    await wait_for(lambda: live_c.is_bound(key(a)) and live_a.is_bound(key(c)))
    live_a.say("welcome, guest")
    await wait_for(lambda: texts(live_c) == ["welcome, guest"] and texts(live_b) == texts(live_c))


async def test_an_ad_hoc_session_refuses_a_joiner_nobody_invited_even_with_a_forged_ticket(
    trio: list[NodeRuntime],
) -> None:
    a, b, c = trio
    session = "study-" + "ab" * 16  # no consult on record: the session's invitations decide
    live_a = a.live_hub().open(session)
    await a.live_hub().invite(session, key(b))
    conn = await c.transport.connect(key(a))
    for forged in (
        Invite(session),
        # "b vouches for c", but signed by c: not b's ticket.
        Invite(session, by=key(b), ticket=c.identity.sign(ticket_input(session, key(c)))),
    ):
        with pytest.raises(RemoteError) as join:
            await conn.request(JOIN_KIND, forged.to_wire())
        assert join.value.code == NOT_ADMITTED
    assert not live_a.is_bound(key(c))
    assert len(a.audit.records(kind="consult", peer=str(c.identity.node_id))) == 2


async def test_a_guest_approval_from_a_revoked_party_does_not_count(
    trio: list[NodeRuntime], caplog: pytest.LogCaptureFixture
) -> None:
    """Red team: the consultant b is revoked at the hospital a, then "approves" guest c.
    Before the fix the live.consent handler checked only that b is the consult's other
    party, not that a still trusts it: b's approval was recorded and audited."""
    a, b, c = trio
    consult_id = consult_between(a, b)
    a.trust.revoke(b.identity.node_id, a.now())
    await b.consulting.approve_live_guest(consult_id, key(c))
    guest = str(c.identity.node_id)
    await wait_for(
        lambda: "guest approval" in caplog.text or a.consults.guest_approvers(consult_id, guest)
    )
    assert a.consults.guest_approvers(consult_id, guest) == frozenset()
    assert "not trusted" in caplog.text
    assert not a.audit.records(kind="consult", peer=guest)


async def test_a_guest_approval_from_a_third_node_or_for_another_consult_does_not_count(
    trio: list[NodeRuntime], caplog: pytest.LogCaptureFixture
) -> None:
    """Pins: c (trusted, no party) sends a its own "approval" of itself for the a-b
    consult, and b sends one naming a consult of a's with c (b is not its party)."""
    a, b, c = trio
    consult_id = consult_between(a, b)
    other = consult_between(a, c)
    guest = str(c.identity.node_id)
    consent = GuestConsent(consult_id, key(c)).to_wire()
    await c.send_message(key(a), consults.LIVE_CONSENT_KIND, consent)
    await b.send_message(key(a), consults.LIVE_CONSENT_KIND, GuestConsent(other, key(b)).to_wire())
    await wait_for(lambda: caplog.text.count("who is not its other party") == 2)
    assert a.consults.guest_approvers(consult_id, guest) == frozenset()
    assert a.consults.guest_approvers(other, str(b.identity.node_id)) == frozenset()


async def test_a_guest_tricked_into_a_session_by_a_stranger_does_not_relay_the_consult(
    trio: list[NodeRuntime], tmp_path: Path, registry: str
) -> None:
    """Red team: c is a guest both parties approved. x, trusted by c but nothing to the
    consult, "invites" c to the consult's session (c has no record of the consult, so
    its inviter decides) naming a and b. Before the fix c joined a and b with x's ticket,
    they admitted c (an approved guest), and c synced the whole session to x."""
    a, b, c = trio
    x = await start_node(tmp_path, "xan", registry)
    try:
        introduce([c, x])
        consult_id = consult_between(a, b)
        guest = str(c.identity.node_id)
        for node in (a, b):
            for party in (a, b):
                node.consults.approve_guest(consult_id, guest, str(party.identity.node_id))
        live_a = a.live_hub().open(consult_id)
        await a.live_hub().invite(consult_id, key(b))
        live_a.say("draft: left subdural")
        await wait_for(lambda: texts(b.live_hub().sessions[consult_id]) == texts(live_a))

        live_x = x.live_hub().open(consult_id)
        await x.live_hub().invite(consult_id, key(c))
        conn = await x.transport.connect(key(c))
        ticket = x.identity.sign(ticket_input(consult_id, key(c)))
        await conn.request(
            INVITE_KIND, Invite(consult_id, (key(a), key(b)), by=key(x), ticket=ticket).to_wire()
        )
        live_c = c.live_hub().sessions[consult_id]

        def refused() -> bool:
            return all(n.audit.records(kind="consult", peer=guest) for n in (a, b))

        await wait_for(lambda: live_a.is_bound(key(c)) or refused())
        if live_a.is_bound(key(c)):  # the attack worked: c got the session and x asks for it
            await wait_for(lambda: texts(live_c) == ["draft: left subdural"])
            live_x.resync(key(c))
            await wait_for(lambda: texts(live_x) == ["draft: left subdural"])
        assert refused()
        assert not live_a.is_bound(key(c))
        assert texts(live_c) == []  # c holds nothing of the consult, so relays nothing to x
        assert texts(live_x) == []
        for node in (a, b):
            events = [r.details["event"] for r in node.audit.records(kind="consult", peer=guest)]
            assert events == ["live-join-refused"]

        # Then the hospital really invites c. x named a among the members, so c took a
        # for one of x's session and let a in: c then had the consult and x with it.
        # A session opened on x's invite admits further invites only from peers already
        # in it: a's is refused while x's session is open (c's person can leave it).
        with pytest.raises(RemoteError) as invited:
            await a.live_hub().invite(consult_id, key(c))
        assert invited.value.code == NOT_ADMITTED
        assert not live_c.is_bound(key(a))
        live_x.resync(key(c))
        assert texts(live_c) == []
        await c.live_hub().leave(consult_id)  # c's person leaves x's session; a asks again
        await a.live_hub().invite(consult_id, key(c))
        await wait_for(lambda: texts(c.live_hub().sessions[consult_id]) == texts(live_a))
    finally:
        await x.stop()


async def test_a_party_cannot_approve_endless_guests(trio: list[NodeRuntime]) -> None:
    """Red team: the consultant b sends a ever more guest approvals for one consult (each
    a valid, trusted live.consent message); each was a new database row without limit."""
    a, b, _ = trio
    consult_id = consult_between(a, b)
    guests = [Identity.generate().public_key for _ in range(MAX_GUESTS + 5)]
    for guest in guests:
        with contextlib.suppress(LocalConsultError):
            await a.consulting.on_live_consent(
                b.identity.node_id, GuestConsent(consult_id, guest).to_wire()
            )
    approved = [
        g for g in guests if a.consults.guest_approvers(consult_id, str(NodeId.from_public_key(g)))
    ]
    assert len(approved) == MAX_GUESTS
    # Canary: approving one of them again is no new row and no error; a's own still counts.
    await a.consulting.on_live_consent(
        b.identity.node_id, GuestConsent(consult_id, guests[0]).to_wire()
    )
    await a.consulting.approve_live_guest(consult_id, guests[0])
    assert len(a.consults.guest_approvers(consult_id, str(NodeId.from_public_key(guests[0])))) == 2


async def test_a_flood_of_refused_joins_does_not_fill_the_audit_log(
    trio: list[NodeRuntime],
) -> None:
    """Red team: c asks a to join made-up consult ids over and over. Each refusal was
    audited (and logged), so a trusted peer could grow a's audit log without limit."""
    a, b, c = trio
    conn = await c.transport.connect(key(a))
    for n in range(MAX_AUDITED_REFUSALS + 10):
        with pytest.raises(RemoteError) as join:
            await conn.request(JOIN_KIND, Invite(f"made-up-{n:04d}").to_wire())
        assert join.value.code == NOT_ADMITTED  # every one is still refused
    assert len(a.audit.records(kind="consult", peer=str(c.identity.node_id))) == (
        MAX_AUDITED_REFUSALS
    )
    # Canary: another peer's refusal is still recorded.
    other = await b.transport.connect(key(a))
    with pytest.raises(RemoteError):
        await other.request(JOIN_KIND, Invite("made-up-by-b").to_wire())
    assert len(a.audit.records(kind="consult", peer=str(b.identity.node_id))) == 1


async def test_a_trusted_peer_cannot_open_endless_sessions_by_inviting(
    trio: list[NodeRuntime],
) -> None:
    """Red team: c invites a to ever new ad-hoc session ids (no consult on record, so the
    inviter decides); each opened a session (a CRDT document, presence, a worklist row)
    without limit before the cap."""
    a, b, c = trio
    conn = await c.transport.connect(key(a))
    for n in range(MAX_INVITED_SESSIONS):
        await conn.request(INVITE_KIND, Invite(f"flood-{n:04d}").to_wire())
    with pytest.raises(RemoteError) as busy:
        await conn.request(INVITE_KIND, Invite("flood-one-more").to_wire())
    assert busy.value.code == "busy"
    assert len(a.live_hub().sessions) == MAX_INVITED_SESSIONS
    # Canary: another trusted peer's invite still opens a session on a.
    session = "study-" + "cd" * 16
    b.live_hub().open(session)
    await b.live_hub().invite(session, key(a))
    assert session in a.live_hub().sessions
    await a.live_hub().leave("flood-0000")  # leaving one makes room for c again
    await conn.request(INVITE_KIND, Invite("flood-one-more").to_wire())


# --- caps on receive (issue 13 item 14) -----------------------------------------------------

MALLORY, ALICE, CAROL = Identity.generate(), Identity.generate(), Identity.generate()
IN_MEMORY = "c"


def signed_chat(identity: Identity, consult_id: str, text: str) -> dict[str, object]:
    """A chat message as a modified client writes it: signed, but past the local checks."""
    fields: dict[str, object] = {
        "id": uuid.uuid4().hex,
        "author": str(identity.node_id),
        "at": 1.0,
        "text": text,
        "key": identity.public_key,
    }
    fields["sig"] = identity.sign(_signing_input(CHAT_DOMAIN, consult_id, fields))
    return fields


def signed_annotation(
    identity: Identity, consult_id: str, **changes: object
) -> tuple[str, dict[str, object]]:
    raw: dict[str, object] = {
        "kind": "point",
        "sop": SOP,
        "frame": 0,
        "points": [[1.0, 1.0]],
        "author": str(identity.node_id),
        "at": 1.0,
        "text": "",
        "values": {},
        "key": identity.public_key,
        **changes,
    }
    annotation_id = uuid.uuid4().hex
    signing = _signing_input(ANNOTATION_DOMAIN, consult_id, {**raw, "id": annotation_id})
    raw["sig"] = identity.sign(signing)
    return annotation_id, raw


def mallorys_updates(mallory: SharedState) -> list[bytes]:
    updates: list[bytes] = []
    mallory.on_local_update(updates.append)
    return updates


def canary_arrives(alice: SharedState) -> None:
    """An honest participant's message still reaches Alice after she refused Mallory's."""
    carol = SharedState(IN_MEMORY, CAROL)
    sent = mallorys_updates(carol)
    carol.say("canary", 2.0)
    for update in sent:
        alice.receive(update, sender=carol.local_node)
    assert [m.text for m in alice.snapshot().chat] == ["canary"]


def test_an_over_long_chat_message_is_refused_on_receive() -> None:
    alice, mallory = SharedState(IN_MEMORY, ALICE), SharedState(IN_MEMORY, MALLORY)
    updates = mallorys_updates(mallory)
    mallory._chat.append(signed_chat(MALLORY, IN_MEMORY, "x" * (MAX_CHAT_CHARS + 1)))
    with pytest.raises(MalformedMessage, match="size limits"):
        alice.receive(updates[0], sender=mallory.local_node)
    assert alice._chat.to_py() == []
    canary_arrives(alice)


@pytest.mark.parametrize(
    "changes",
    [
        {"values": {f"v{i}": 1.0 for i in range(MAX_VALUES + 1)}},
        {"values": {"x" * 10_000: 1.0}},
        {"text": "x" * (MAX_LABEL_CHARS + 1)},
        {"sop": "1." * 5000},
        {"points": [[float("nan"), 1.0]]},
        {"points": [[1e308, 1.0]]},  # finite, but no image is that large (red team)
    ],
    ids=["too-many-values", "long-value-name", "long-label", "long-uid", "nan", "huge"],
)
def test_an_oversized_annotation_is_refused_on_receive(changes: dict[str, object]) -> None:
    alice, mallory = SharedState(IN_MEMORY, ALICE), SharedState(IN_MEMORY, MALLORY)
    updates = mallorys_updates(mallory)
    annotation_id, raw = signed_annotation(MALLORY, IN_MEMORY, **changes)
    mallory._annotations[annotation_id] = raw
    with pytest.raises(MalformedMessage, match="size limits"):
        alice.receive(updates[0], sender=mallory.local_node)
    assert alice._annotations.to_py() == {}
    canary_arrives(alice)


def test_a_flood_of_annotations_past_the_per_participant_cap_is_undone() -> None:
    alice, mallory = SharedState(IN_MEMORY, ALICE), SharedState(IN_MEMORY, MALLORY)
    updates = mallorys_updates(mallory)
    for batch in range(5):  # a modified client: no local cap, 5 edits of 401 annotations
        with mallory.doc.transaction():
            for _ in range(401):
                annotation_id, raw = signed_annotation(MALLORY, IN_MEMORY, frame=batch)
                mallory._annotations[annotation_id] = raw
    assert len(mallory._annotations) == MAX_ANNOTATIONS_PER_AUTHOR + 5
    for update in updates[:4]:
        alice.receive(update, sender=mallory.local_node)
    with pytest.raises(LimitExceeded, match="annotations"):
        alice.receive(updates[4], sender=mallory.local_node)
    # The edit that went past the cap is undone whole (every participant undoes the same).
    assert len(alice.annotations()) == 4 * 401
    # The same flood relayed in one catch-up is refused too.
    late = SharedState(IN_MEMORY, CAROL)
    with pytest.raises(LimitExceeded):
        late.receive(SyncMessage(SyncKind.STEP2, mallory.full_update()).to_wire())
    assert len(late.annotations()) == 0
    canary_arrives(alice)


def test_an_honest_participant_cannot_pass_its_own_caps() -> None:
    alice = SharedState(IN_MEMORY, ALICE)
    with pytest.raises(LocalConsultError):
        alice.add_annotation(AnnotationKind.POINT, SOP, 0, ((1, 1),), 1.0, values={"x" * 100: 1.0})
    with pytest.raises(LocalConsultError, match="report draft"):
        alice.insert_report(0, "x" * (MAX_REPORT_CHARS + 1))


def test_a_report_draft_past_its_cap_is_put_back() -> None:
    alice, mallory = SharedState(IN_MEMORY, ALICE), SharedState(IN_MEMORY, MALLORY)
    alice.insert_report(0, "Findings: ")
    mallory.receive(SyncMessage(SyncKind.STEP2, alice.full_update()).to_wire())
    updates = mallorys_updates(mallory)
    mallory._report += "x" * MAX_REPORT_CHARS  # a modified client: no local cap
    with pytest.raises(LimitExceeded, match="report"):
        alice.receive(updates[0], sender=mallory.local_node)
    assert alice.report_text == "Findings: "
    canary_arrives(alice)


def test_an_update_that_would_pass_the_document_cap_is_refused_before_it_applies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(shared, "MAX_DOCUMENT", 64 * 1024)
    alice, mallory = SharedState(IN_MEMORY, ALICE), SharedState(IN_MEMORY, MALLORY)
    updates = mallorys_updates(mallory)
    with mallory.doc.transaction():  # 20 signed messages within every other cap: 80 KB
        for _ in range(20):
            mallory._chat.append(signed_chat(MALLORY, IN_MEMORY, "y" * MAX_CHAT_CHARS))
    before = alice.doc.get_update()
    with pytest.raises(LimitExceeded, match="document"):
        alice.receive(updates[0], sender=mallory.local_node)
    assert alice.doc.get_update() == before  # refused before pycrdt saw it
    canary_arrives(alice)


@pytest.mark.parametrize(
    "state",
    [
        {"name": "n" * (MAX_NAME_CHARS + 1)},
        {"colour": "#" * 1000},
        {"tool": "t" * 1000},
        {"cursor": {"sop_instance_uid": "1" * 1000, "frame": 0, "x": 1.0, "y": 1.0}},
        {"cursor": {"sop_instance_uid": SOP, "frame": 0, "x": float("inf"), "y": 1.0}},
        {"cursor": {"sop_instance_uid": SOP, "frame": 0, "x": -1e308, "y": 1e308}},
        {"viewport": {"series_uid": SOP}},
        {"presenting": "yes"},
        {"junk": "z" * 1000},
    ],
    ids=[
        "name",
        "colour",
        "tool",
        "cursor-uid",
        "cursor-inf",
        "cursor-huge",
        "viewport",
        "flag",
        "unknown",
    ],
)
def test_presence_fields_past_their_caps_are_refused(state: dict[str, object]) -> None:
    node = str(MALLORY.node_id)
    presence = Presence(node, "Mallory", "#fff", now=0.0)
    honest = presence.poll(0.0)
    assert honest is not None
    check_presence(honest, node, None)
    presence._set(1.0, **state)  # a modified client: past the local truncation
    forged = presence.poll(1.0)
    assert forged is not None
    with pytest.raises(MalformedMessage):
        check_presence(forged, node, None)


@pytest.mark.parametrize("attack", ["long-chat", "big-value", "flood", "document"])
async def test_over_aiortc_an_edit_past_a_cap_drops_its_sender_and_honest_chat_still_flows(
    trio: list[NodeRuntime], attack: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shared, "MAX_ANNOTATIONS_PER_AUTHOR", 20)  # a flood that fits a test
    monkeypatch.setattr(shared, "MAX_DOCUMENT", 32 * 1024)
    a, b, c = trio
    live_a, live_b, live_c = await live_session(a, b, c)
    await wait_for(lambda: live_b.is_bound(key(c)) and live_c.is_bound(key(b)))
    to_b = a.live_hub()._links[key(b)]

    mallory = live_b.state  # b's modified client writes past its own local checks
    if attack == "long-chat":
        mallory._chat.append(signed_chat(b.identity, CONSULT, "x" * (MAX_CHAT_CHARS + 1)))
    elif attack == "big-value":
        annotation_id, raw = signed_annotation(b.identity, CONSULT, values={"v" * 5000: 1.0})
        mallory._annotations[annotation_id] = raw
    elif attack == "flood":
        with mallory.doc.transaction():
            for _ in range(25):
                annotation_id, raw = signed_annotation(b.identity, CONSULT)
                mallory._annotations[annotation_id] = raw
    else:
        with mallory.doc.transaction():
            for _ in range(12):  # 48 KB of chat, each message within its own cap
                mallory._chat.append(signed_chat(b.identity, CONSULT, "y" * MAX_CHAT_CHARS))

    await wait_for(lambda: to_b.closed and not live_a.is_bound(key(b)))
    live_c.say("canary")
    await wait_for(lambda: "canary" in texts(live_a))
    assert texts(live_a) == ["canary"]
    assert live_a.annotations() == []


# --- signed removals (the gap left by the previous session) ---------------------------------


def step2(source: SharedState, target: SharedState | None = None) -> bytes:
    vector = target.doc.get_state() if target is not None else b"\x00"
    return SyncMessage(SyncKind.STEP2, source.doc.get_update(vector)).to_wire()


def test_a_removed_annotation_cannot_be_resurrected_by_a_catch_up() -> None:
    alice, mallory, carol = (SharedState(IN_MEMORY, i) for i in (ALICE, MALLORY, CAROL))
    mark = alice.add_annotation(AnnotationKind.POINT, SOP, 0, ((4, 4),), 1.0, text="withdrawn")
    mallory.receive(step2(alice), alice.local_node)
    kept = mark.to_py()  # alice's signed value, as mallory saw it
    alice.remove_annotation(mark.id, 2.0)
    carol.receive(step2(alice), alice.local_node)
    assert carol.annotations() == []

    mallory._annotations[mark.id] = kept  # replayed in a catch-up mallory sends carol
    with pytest.raises(Forgery):
        carol.receive(step2(mallory, carol), mallory.local_node)
    assert carol.annotations() == []
    canary_arrives(carol)


def test_a_replay_shown_before_the_removal_arrived_goes_when_the_signed_removal_does() -> None:
    alice, mallory, dave = (SharedState(IN_MEMORY, i) for i in (ALICE, MALLORY, CAROL))
    mark = alice.add_annotation(AnnotationKind.POINT, SOP, 0, ((4, 4),), 1.0)
    mallory.receive(step2(alice), alice.local_node)
    alice.remove_annotation(mark.id, 2.0)
    dave.receive(step2(mallory), mallory.local_node)  # mallory never relays the removal
    assert [a.id for a in dave.annotations()] == [mark.id]
    dave.receive(step2(alice, dave), alice.local_node)
    assert dave.annotations() == []


def test_a_signed_removal_relayed_by_another_participant_is_accepted() -> None:
    alice, bob, carol = (SharedState(IN_MEMORY, i) for i in (ALICE, MALLORY, CAROL))
    mark = alice.add_annotation(AnnotationKind.POINT, SOP, 0, ((4, 4),), 1.0)
    bob.receive(step2(alice), alice.local_node)
    carol.receive(step2(alice), alice.local_node)
    alice.remove_annotation(mark.id, 2.0)
    bob.receive(step2(alice, bob), alice.local_node)
    carol.receive(step2(bob, carol), bob.local_node)  # relayed, signed by its author
    assert carol.annotations() == []


def test_a_removal_not_signed_by_the_author_and_a_removed_tombstone_are_put_back() -> None:
    alice, mallory = SharedState(IN_MEMORY, ALICE), SharedState(IN_MEMORY, MALLORY)
    mark = alice.add_annotation(AnnotationKind.POINT, SOP, 0, ((4, 4),), 1.0)
    gone = alice.add_annotation(AnnotationKind.POINT, SOP, 0, ((5, 5),), 1.0)
    alice.remove_annotation(gone.id, 2.0)
    mallory.receive(step2(alice), alice.local_node)
    updates = mallorys_updates(mallory)
    with mallory.doc.transaction():  # "alice removed it", signed by mallory
        forged = Removal(mark.id, alice.local_node, 3.0).signed(MALLORY, IN_MEMORY)
        mallory._removed[_tomb_key(mark.id, alice.local_node)] = forged.to_py()
        del mallory._annotations[mark.id]
    with pytest.raises(Forgery):
        alice.receive(updates[0], sender=mallory.local_node)
    assert [a.id for a in alice.annotations()] == [mark.id]
    assert _tomb_key(mark.id, alice.local_node) not in alice._removed

    del mallory._removed[_tomb_key(gone.id, alice.local_node)]  # un-remove: the tombstone goes
    with pytest.raises(Forgery):
        alice.receive(updates[1], sender=mallory.local_node)
    assert _tomb_key(gone.id, alice.local_node) in alice._removed


def test_a_peer_cannot_delete_anothers_chat_message_and_the_repairs_agree() -> None:
    alice, mallory, carol = (SharedState(IN_MEMORY, i) for i in (ALICE, MALLORY, CAROL))
    alice.say("I disagree with the impression", 1.0)
    carol.say("noted", 2.0)
    for state in (mallory, carol):
        state.receive(step2(alice, state), alice.local_node)
    for state in (mallory, alice):
        state.receive(step2(carol, state), carol.local_node)
    said = [m.text for m in alice.snapshot().chat]
    dave = SharedState(IN_MEMORY, Identity.generate())
    dave.receive(step2(alice), alice.local_node)
    updates = mallorys_updates(mallory)
    del mallory._chat[0]  # a modified client erases alice's objection
    repairs = mallorys_updates(alice)
    for state in (alice, carol):
        with pytest.raises(Forgery):
            state.receive(updates[0], sender=mallory.local_node)
        assert [m.text for m in state.snapshot().chat] == said
    for repair in repairs:  # alice's put-back copy is not taken for a forgery by carol
        carol.receive(repair, sender=alice.local_node)
    assert [m.text for m in carol.snapshot().chat] == said
    # A catch-up carrying the deletion is refused the same way.
    with pytest.raises(Forgery):
        dave.receive(step2(mallory, dave), mallory.local_node)
    assert [m.text for m in dave.snapshot().chat] == said


def test_a_catch_up_repeating_what_a_near_full_document_holds_is_not_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(shared, "MAX_DOCUMENT", 64 * 1024)
    alice, carol = SharedState(IN_MEMORY, ALICE), SharedState(IN_MEMORY, CAROL)
    for i in range(10):  # 40 KB: a second full copy would pass the cap if counted twice
        alice.say(f"{i}" * MAX_CHAT_CHARS, float(i))
    full = step2(alice)
    carol.receive(full, alice.local_node)
    carol.receive(full, alice.local_node)  # two peers answered the late joiner's step 1
    assert len(carol.snapshot().chat) == 10


def test_a_state_vector_past_its_cap_is_refused_before_parsing() -> None:
    with pytest.raises(MalformedMessage, match="state vector"):
        SyncMessage.from_wire(SyncMessage(SyncKind.STEP1, b"\x00" * (64 * 1024)).to_wire())


# --- admission withdrawn while in the session ---------------------------------------------


async def guest_in_session(
    a: NodeRuntime, b: NodeRuntime, c: NodeRuntime
) -> tuple[str, LiveConsult, LiveConsult, LiveConsult]:
    """a (hospital) and b (consultant) in a live session on their consult, with c a guest
    both approved; returns the consult id and a's, b's and c's sessions."""
    consult_id = consult_between(a, b)
    a.live_hub().open(consult_id)
    await a.live_hub().invite(consult_id, key(b))
    await a.consulting.approve_live_guest(consult_id, key(c))
    await b.consulting.approve_live_guest(consult_id, key(c))
    await wait_for(lambda: b.consults.guest_approvers(consult_id, str(c.identity.node_id)) == {
        str(a.identity.node_id), str(b.identity.node_id)})  # fmt: skip
    await b.live_hub().invite(consult_id, key(c))
    live_a, live_b = a.live_hub().sessions[consult_id], b.live_hub().sessions[consult_id]
    live_c = c.live_hub().sessions[consult_id]
    await wait_for(lambda: live_a.is_bound(key(c)) and live_c.is_bound(key(a)))
    live_c.say("guest here")
    await wait_for(lambda: "guest here" in texts(live_a) and "guest here" in texts(live_b))
    return consult_id, live_a, live_b, live_c


def message_refusals(node: NodeRuntime, peer: NodeRuntime) -> list[str]:
    records = node.audit.records(kind="consult", peer=str(peer.identity.node_id))
    return [r.details["consult"] for r in records if r.details["event"] == "live-message-refused"]


async def test_a_guest_refused_after_approval_is_dropped_at_its_next_live_message(
    trio: list[NodeRuntime],
) -> None:
    a, b, c = trio
    consult_id, live_a, live_b, live_c = await guest_in_session(a, b, c)
    # The hospital takes its approval back; b's database has the refusal (the live.refuse
    # handler's first step) and nothing has taken c out of b's session yet: admission was
    # only checked when c was bound, so c's messages kept flowing in.
    b.consults.refuse_guest(consult_id, str(c.identity.node_id), str(a.identity.node_id))
    assert live_b.is_bound(key(c))
    live_c.say("after the refusal")
    await wait_for(lambda: message_refusals(b, c) == [consult_id])
    assert not live_b.is_bound(key(c))
    assert "after the refusal" not in texts(live_b)
    # The parties' own traffic goes on (canary), on b's side and a's.
    live_b.say("canary")
    await wait_for(lambda: "canary" in texts(live_a))
    assert message_refusals(b, c) == [consult_id]  # refused once, not once per message
    assert message_refusals(b, a) == []


async def test_a_withdrawn_consult_keeps_nobody_in_either_partys_live_session(
    trio: list[NodeRuntime],
) -> None:
    a, b, c = trio
    consult_id, live_a, live_b, live_c = await guest_in_session(a, b, c)
    assert await a.consulting.withdraw(consult_id) == []
    # The hospital's own session lets nobody stay in; the consultant's, once told.
    assert not live_a.is_bound(key(b))
    assert not live_a.is_bound(key(c))
    await wait_for(lambda: b.consults.state_of(consult_id) is State.WITHDRAWN)
    assert not live_b.is_bound(key(a))
    assert not live_b.is_bound(key(c))
    # The guest's node was not told and goes on writing: refused on both parties' nodes,
    # and a consult now closed admits no new join either.
    live_c.say("late note on a withdrawn case")
    conn = await c.transport.connect(key(b))
    with pytest.raises(RemoteError) as join:
        await conn.request(JOIN_KIND, Invite(consult_id).to_wire())
    assert join.value.code == NOT_ADMITTED
    assert "late note on a withdrawn case" not in texts(live_b)
    assert "late note on a withdrawn case" not in texts(live_a)


async def test_a_party_still_in_a_session_whose_consult_closed_is_refused_at_its_next_message(
    trio: list[NodeRuntime],
) -> None:
    a, b, c = trio
    consult_id, _, live_b, _ = await guest_in_session(a, b, c)
    # The consult expires on the consultant's node (its deadline passed); nothing took the
    # hospital out of b's session: its next message is refused there and it is dropped.
    b.consults.expire_due(b.now() + 10 * 3600)
    assert b.consults.state_of(consult_id) is State.EXPIRED
    assert live_b.is_bound(key(a))
    a.live_hub().sessions[consult_id].say("after the deadline")
    await wait_for(lambda: message_refusals(b, a) == [consult_id])
    assert not live_b.is_bound(key(a))
    assert "after the deadline" not in texts(live_b)
