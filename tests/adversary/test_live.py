"""Attacks on live sessions: who gets in, and what a participant may put in the shared state.

Real NodeRuntimes, a real registry and real aiortc on 127.0.0.1 (helpers from
tests/consult/test_live.py), plus in-memory pairs where the attack is on the
state itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from consult.errors import LocalConsultError
from consult.live import INVITE_KIND, JOIN_KIND, NOT_ADMITTED, Invite, LiveConsult, ticket_input
from consult.requests import ConsultRequest, Priority
from node import workflow
from node.runtime import NodeRuntime
from peer_transport.errors import RemoteError
from registry.server import RegistryServer
from tests.consult.test_live import introduce, key, start_node, wait_for

# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[str]:
    server = RegistryServer(tmp_path / "registry.sqlite")
    url = await server.start("127.0.0.1", 0)
    yield url
    await server.stop()


@pytest.fixture
async def trio(tmp_path: Path, registry: str) -> AsyncIterator[list[NodeRuntime]]:
    """Three trusted nodes: a (requesting hospital), b (consultant), c (a third node)."""
    nodes = [await start_node(tmp_path, name, registry) for name in ("ana", "ben", "cai")]
    introduce(nodes)
    for node in nodes:
        workflow.install(node, resume=False)
    yield nodes
    for node in nodes:
        await node.stop()


def consult_between(requester: NodeRuntime, consultant: NodeRuntime) -> str:
    """A consult the consultant accepted, as both consult databases record it."""
    now = requester.now()
    request = ConsultRequest.new(
        requester=requester.identity.node_id,
        study_uid="2.25.1",
        question="q",
        priority=Priority.URGENT,
        subspecialty="neuro",
        jurisdiction="IE",
        language="en",
        deadline=now + 3600,
        now=now,
    )
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


# --- admission (issue 13 item 4) ------------------------------------------------------------


async def test_a_trusted_node_that_knows_the_consult_id_is_refused_audited_and_sees_nothing(
    trio: list[NodeRuntime],
) -> None:
    a, b, c = trio
    consult_id = consult_between(a, b)
    live_a = a.live_hub().open(consult_id)
    await a.live_hub().invite(consult_id, key(b))
    live_b = b.live_hub().sessions[consult_id]
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
    consult_id = consult_between(a, b)
    live_a = a.live_hub().open(consult_id)
    await a.live_hub().invite(consult_id, key(b))
    live_b = b.live_hub().sessions[consult_id]

    # The consultant alone cannot bring a colleague into the hospital's case.
    await workflow.approve_live_guest(b, consult_id, key(c))
    with pytest.raises(LocalConsultError, match="must both approve"):
        await b.live_hub().invite(consult_id, key(c))
    # ... nor can the colleague join the hospital's node on the consultant's word.
    conn = await c.transport.connect(key(a))
    with pytest.raises(RemoteError) as join:
        await conn.request(JOIN_KIND, Invite(consult_id).to_wire())
    assert join.value.code == NOT_ADMITTED

    await workflow.approve_live_guest(a, consult_id, key(c))  # the hospital agrees
    await wait_for(
        lambda: (
            str(a.identity.node_id)
            in b.consults.guest_approvers(consult_id, str(c.identity.node_id))
        )
    )
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
