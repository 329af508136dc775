"""Guests of a live session, the way people bring them in: `radmesh consult invite`,
`guests` and `approve-guest` on three running nodes (hospital, consultant, guest) on
127.0.0.1, each answering its control socket as `radmesh node run` does."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from consult.errors import LocalConsultError
from consult.live import NOT_ADMITTED, Invite
from node.app import guests
from node.app.runtime import NodeRuntime
from peer_transport.errors import RemoteError
from peer_transport.rtc import restrict_host_addresses
from tests.adversary.test_live import consult_between, live_consult, texts
from tests.cli import radmesh as run_cli
from tests.consult.test_live import introduce, key, make_home, wait_for
from tests.node.test_runtime import FAST


@pytest.fixture
async def trio(tmp_path: Path, registry: str) -> AsyncIterator[list[NodeRuntime]]:
    """Hospital, consultant and a guest, running with their control sockets."""
    restrict_host_addresses(["127.0.0.1"])
    nodes = []
    for name in ("hospital", "consultant", "surgeon"):
        home, identity = make_home(tmp_path, name, registry)
        node = NodeRuntime(home, identity, transport_options=FAST, control=True, resume=False)
        await node.start()
        nodes.append(node)
    introduce(nodes)
    yield nodes
    for node in nodes:
        await node.stop()


async def radmesh(node: NodeRuntime, *args: str) -> tuple[int, str]:
    """`radmesh --home HOME ARGS` on ``node``'s home (it talks to the node's control socket)."""
    return await run_cli(node.home, *args)


def short(node: NodeRuntime) -> str:
    return node.identity.node_id.short()


async def test_the_consultant_proposes_a_guest_the_hospital_approves_and_the_guest_sees_the_chat(
    trio: list[NodeRuntime],
) -> None:
    hospital, consultant, surgeon = trio
    consult_id, live_h, live_c = await live_consult(hospital, consultant)

    code, said = await radmesh(
        consultant, "consult", "invite", consult_id[:8], "--guest", short(surgeon)
    )
    assert code == 0, said
    assert "must approve it too" in said
    # The hospital is asked: a notification, and `guests` says it waits for its answer.
    own = str(hospital.identity.node_id)
    await wait_for(lambda: [s.guest for s in guests.pending(hospital.consults, own)] == [
        str(surgeon.identity.node_id)])  # fmt: skip
    code, listed = await radmesh(hospital, "consult", "guests", consult_id[:8])
    assert code == 0
    assert "proposed" in listed
    assert "waits for your answer" in listed
    assert short(consultant) in listed
    assert not live_h.is_bound(key(surgeon))

    code, said = await radmesh(
        hospital, "consult", "approve-guest", consult_id[:8], "--guest", short(surgeon)
    )
    assert code == 0, said
    assert "approved by both parties" in said
    await wait_for(lambda: consult_id in surgeon.live_hub().sessions)
    live_s = surgeon.live_hub().sessions[consult_id]
    await wait_for(lambda: live_h.is_bound(key(surgeon)) and live_c.is_bound(key(surgeon)))
    live_h.say("surgeon, see the midline shift")
    live_c.say("agree, 7 mm")
    await wait_for(lambda: {"surgeon, see the midline shift", "agree, 7 mm"} <= set(texts(live_s)))
    code, listed = await radmesh(consultant, "consult", "guests", consult_id[:8])
    assert "approved" in listed
    assert "this node" in listed
    assert short(hospital) in listed


async def test_a_guest_the_hospital_refuses_is_not_admitted(trio: list[NodeRuntime]) -> None:
    hospital, consultant, surgeon = trio
    consult_id = consult_between(hospital, consultant)
    hospital.live_hub().open(consult_id)
    await hospital.live_hub().invite(consult_id, key(consultant))

    code, _ = await radmesh(
        consultant, "consult", "invite", consult_id[:8], "--guest", short(surgeon)
    )
    assert code == 0
    own = str(hospital.identity.node_id)
    await wait_for(lambda: guests.pending(hospital.consults, own) != [])
    code, said = await radmesh(
        hospital, "consult", "approve-guest", consult_id, "--guest", short(surgeon), "--refuse"
    )
    assert code == 0, said
    assert "refused" in said
    guest = str(surgeon.identity.node_id)
    await wait_for(lambda: own in consultant.consults.guest_refusers(consult_id, guest))
    assert guests.pending(hospital.consults, own) == []
    code, listed = await radmesh(consultant, "consult", "guests", consult_id[:8])
    assert "refused" in listed

    # Neither the consultant's invite nor the guest's own join gets it in.
    with pytest.raises(LocalConsultError, match="must both approve"):
        await consultant.live_hub().invite(consult_id, key(surgeon))
    conn = await surgeon.transport.connect(key(hospital))
    with pytest.raises(RemoteError) as join:
        await conn.request("live.join", Invite(consult_id).to_wire())
    assert join.value.code == NOT_ADMITTED
    assert consult_id not in surgeon.live_hub().sessions


async def test_a_guest_must_be_trusted_and_not_a_party(trio: list[NodeRuntime]) -> None:
    hospital, consultant, surgeon = trio
    consult_id = consult_between(hospital, consultant)
    code, _ = await radmesh(
        consultant, "consult", "invite", consult_id[:8], "--guest", short(hospital)
    )
    assert code != 0
    consultant.trust.revoke(surgeon.identity.node_id, consultant.now())
    with pytest.raises(guests.GuestError, match="not trusted"):
        await consultant.guests.propose(consult_id, surgeon.identity.node_id)
    assert consultant.consults.guests(consult_id) == []


async def test_through_the_tui_facade_a_proposal_is_answered_and_an_approval_taken_back(
    trio: list[NodeRuntime],
) -> None:
    from tui.node_facade import RuntimeNode

    hospital, consultant, surgeon = trio
    consult_id, live_h, live_c = await live_consult(hospital, consultant)
    on_h, on_c = RuntimeNode(hospital), RuntimeNode(consultant)
    guest = str(surgeon.identity.node_id)

    said = await on_c.propose_guest(consult_id, guest)
    assert "must approve it too" in said
    await wait_for(lambda: [p.guest for p in on_h.guest_proposals()] == [guest])
    (proposal,) = on_h.guest_proposals()
    assert proposal.proposed_by == short(consultant)
    assert proposal.guest_trust == "verified"
    assert any("proposes" in n and short(surgeon) in n for n in on_h.notifications())

    await on_h.answer_guest(consult_id, guest, approve=True)
    assert on_h.guest_proposals() == []
    await wait_for(lambda: live_h.is_bound(key(surgeon)) and live_c.is_bound(key(surgeon)))

    # The hospital takes its approval back: the guest leaves both parties' sessions (the
    # consultant's node is told).
    said = await on_h.answer_guest(consult_id, guest, approve=False)
    assert "refused" in said
    assert not live_h.is_bound(key(surgeon))
    await wait_for(lambda: not live_c.is_bound(key(surgeon)))
    refusals = consultant.audit.records(kind="consult", peer=guest)
    by = [r.details.get("by") for r in refusals if r.details["event"] == "live-guest-refused"]
    assert by == [str(hospital.identity.node_id)]
    assert on_h.guest_proposals() == []
    live_h.say("canary")  # the parties' session goes on
    await wait_for(lambda: "canary" in texts(live_c))
