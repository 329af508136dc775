"""Routing a consult: offered to several matching consultants on a real registry, the first
to accept gets it, the others see it withdrawn."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from consult.errors import LocalConsultError
from consult.requests import ConsultResponse, Event, Priority, State
from crypto.identity import Identity, NodeId
from node.app import consults
from node.app.runtime import NodeRuntime
from node.demo.phantom import generate_ct
from registry.client import RegistryClient
from registry.records import NodeRecord
from tests.node.test_runtime import FAST, make_home, wait_for


async def _node(root: Path, name: str, registry: str, subs: list[str], jur: str) -> NodeRuntime:
    home, identity = make_home(root, name, registry, subs)
    config = home.load_config()
    config.jurisdictions = [jur]
    home.save_config(config)
    runtime = NodeRuntime(home, identity, transport_options=FAST)
    await runtime.start()
    return runtime


def _trust_each_other(a: NodeRuntime, b: NodeRuntime) -> None:
    a.trust.mark_verified(b.identity.node_id, a.now())
    b.trust.mark_verified(a.identity.node_id, b.now())


def _refusals(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("refused a node message")]


async def test_first_of_two_accepts_wins_the_other_is_withdrawn(
    tmp_path: Path, registry: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="node.app.runtime")
    hospital = await _node(tmp_path, "hospital", registry, [], "IE")
    ann = await _node(tmp_path, "ann", registry, ["neuro"], "IE")
    bob = await _node(tmp_path, "bob", registry, ["neuro", "msk"], "IE")
    fay = await _node(tmp_path, "fay", registry, ["neuro"], "FR")  # no licence for IE
    nodes = [hospital, ann, bob, fay]
    # A matching neuro record whose key nobody verified: it must never be offered the case.
    stranger = Identity.generate()
    async with RegistryClient(registry, stranger) as client:
        await client.publish(
            NodeRecord.create(
                stranger,
                now=hospital.now(),
                sequence=1,
                ttl=600,
                display_name="aardvark",
                subspecialties=("neuro",),
                jurisdictions=("IE",),
                endpoints=("lan:http://127.0.0.1:9",),
            )
        )
    try:
        for consultant in (ann, bob, fay):
            _trust_each_other(hospital, consultant)
        for path in generate_ct(tmp_path / "ct", slices=1, rows=32):
            hospital.store.add_file(path, source="test")
        study_uid = hospital.store.studies()[0].study_uid

        withdrawn_from: list[object] = []  # whom the hospital decided to withdraw it from
        send_withdrawal = hospital.consulting.send_withdrawal

        async def recording(consult_id: str, peer: NodeId, reason: str) -> bool:
            withdrawn_from.append(peer)
            return await send_withdrawal(consult_id, peer, reason)

        hospital.consulting.send_withdrawal = recording  # type: ignore[method-assign]
        request, _, sent = await hospital.consulting.route_consult(
            study_uid,
            consults.Terms(
                question="subdural?",
                priority=Priority.STAT,
                subspecialty="neuro",
                jurisdiction="IE",
            ),
            max_offers=3,
        )
        assert set(sent) == {ann.identity.node_id, bob.identity.node_id}
        assert all(how == "delivered (LAN)" for how in sent.values())
        assert hospital.consults.get(request.id).state is State.OFFERED
        await wait_for(lambda: bool(ann.consults.cases()) and bool(bob.consults.cases()))

        # Both accept at once; the hospital takes in both accepts.
        await asyncio.gather(
            ann.consulting.respond(request.id, Event.ACCEPT),
            bob.consulting.respond(request.id, Event.ACCEPT),
        )
        await wait_for(lambda: hospital.consults.get(request.id).state is State.ACCEPTED)
        winner = hospital.consults.info(request.id).peer
        loser = bob if winner == str(ann.identity.node_id) else ann
        assert winner in (str(ann.identity.node_id), str(bob.identity.node_id))
        await wait_for(lambda: loser.consults.get(request.id).state is State.WITHDRAWN)
        won = ann if loser is bob else bob
        # Both withdrawals, the loser's and any stray one, are spawned by the one intake
        # of the winning accept: the loser has its withdrawal, so a stray one was started.
        assert set(withdrawn_from) == {loser.identity.node_id}
        assert won.consults.get(request.id).state is State.ACCEPTED
        assert hospital.consults.get(request.id).state is State.ACCEPTED
        accepts = [t for t in hospital.consults.get(request.id).history if t.event is Event.ACCEPT]
        assert [t.actor for t in accepts] == [winner]
        assert not fay.consults.cases()  # never saw the request

        # A consultant it was never offered to cannot accept it, even if it has the request.
        forged = ConsultResponse(request.id, fay.identity.node_id, Event.ACCEPT, fay.now())
        refused = len(_refusals(caplog))
        await fay.send_message(
            hospital.identity.public_key, "consult.response", forged.to_wire(fay.identity)
        )
        await wait_for(lambda: len(_refusals(caplog)) > refused)
        assert hospital.consults.info(request.id).peer == winner
    finally:
        for node in nodes:
            await node.stop()


async def test_a_late_accept_is_answered_with_a_withdrawal(tmp_path: Path, registry: str) -> None:
    hospital = await _node(tmp_path, "hospital", registry, [], "IE")
    ann = await _node(tmp_path, "ann", registry, ["neuro"], "IE")
    bob = await _node(tmp_path, "bob", registry, ["neuro"], "IE")
    try:
        _trust_each_other(hospital, ann)
        _trust_each_other(hospital, bob)
        for path in generate_ct(tmp_path / "ct", slices=1, rows=32):
            hospital.store.add_file(path, source="test")
        request, _, _ = await hospital.consulting.route_consult(
            hospital.store.studies()[0].study_uid,
            consults.Terms(
                question="q", priority=Priority.ROUTINE, subspecialty="neuro", jurisdiction="IE"
            ),
            max_offers=2,
        )
        await wait_for(lambda: bool(ann.consults.cases()) and bool(bob.consults.cases()))
        await ann.consulting.respond(request.id, Event.ACCEPT)
        await wait_for(lambda: bob.consults.get(request.id).state is State.WITHDRAWN)
        # Bob's node already shows it withdrawn, so accepting it there is refused.
        with pytest.raises(LocalConsultError, match="This consult was withdrawn by the requester"):
            await bob.consulting.respond(request.id, Event.ACCEPT)
        assert hospital.consults.info(request.id).peer_id == ann.identity.node_id
    finally:
        for node in (hospital, ann, bob):
            await node.stop()


async def test_routing_with_no_trusted_match_says_what_to_do(tmp_path: Path, registry: str) -> None:
    hospital = await _node(tmp_path, "hospital", registry, [], "IE")
    ann = await _node(tmp_path, "ann", registry, ["neuro"], "IE")  # not verified by the hospital
    try:
        for path in generate_ct(tmp_path / "ct", slices=1, rows=32):
            hospital.store.add_file(path, source="test")
        with pytest.raises(LocalConsultError, match="verify more peers"):
            await hospital.consulting.route_consult(
                hospital.store.studies()[0].study_uid,
                consults.Terms(
                    question="q", priority=Priority.URGENT, subspecialty="neuro", jurisdiction="IE"
                ),
            )
        assert not hospital.consults.cases()
        assert not ann.consults.cases()
    finally:
        await hospital.stop()
        await ann.stop()
