"""Consult fetches between two real nodes (real aiortc on loopback): one sender per consult
and peer on the requesting node, and a consultant node restarted mid-fetch resumes alone."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from consult.errors import ConsultError
from consult.requests import Event, Priority, State
from crypto.identity import Identity
from node.app import cases, commands, consults, studies
from node.app.control import Emit
from node.app.operations import OPERATIONS
from node.app.runtime import NodeRuntime
from node.app.transfers import Direction
from node.core.config import NodeHome
from node.demo.phantom import generate_ct
from node.dicom.deid import PseudonymMap, ShareContext, deidentify
from peer_transport import transfer as tr
from peer_transport.errors import TransportError
from tests.node.test_runtime import FAST, make_home, wait_for

pytestmark = pytest.mark.timeout(120)

SLICES = 60


@dataclass
class Pair:
    hospital: NodeRuntime
    consultant: NodeRuntime
    consultant_home: NodeHome
    consultant_identity: Identity
    consult_id: str
    study_uid: str  # the original, on the hospital


async def _started(home: NodeHome, identity: Identity) -> NodeRuntime:
    runtime = NodeRuntime(home, identity, transport_options=FAST)
    await runtime.start()
    return runtime


@contextlib.asynccontextmanager
async def accepted_consult(tmp_path: Path, registry: str) -> AsyncIterator[Pair]:
    """A hospital and a consultant node; the consultant accepted a consult on a CT study."""
    rural_home, rural = make_home(tmp_path, "rural", registry, [])
    neuro_home, neuro = make_home(tmp_path, "neuro", registry, ["neuro"])
    a = await _started(rural_home, rural)
    b = await _started(neuro_home, neuro)
    pair = Pair(a, b, neuro_home, neuro, "", "")
    try:
        for path in generate_ct(tmp_path / "ct", slices=SLICES, rows=128):
            a.store.add_file(path, source="test")
        pair.study_uid = a.store.studies()[0].study_uid
        a.trust.mark_verified(neuro.node_id, a.now())
        b.trust.mark_verified(rural.node_id, b.now())
        terms = consults.Terms("subdural?", Priority.STAT, "neuro", "IE")
        request, _, _ = await a.consulting.request_consult(neuro.public_key, pair.study_uid, terms)
        pair.consult_id = request.id
        await wait_for(lambda: bool(b.consults.cases()))
        await b.consulting.respond(request.id, Event.ACCEPT)
        await wait_for(lambda: a.consults.get(request.id).state is State.ACCEPTED)
        yield pair
    finally:
        await a.stop()
        with contextlib.suppress(Exception):  # a test may have stopped it already
            await pair.consultant.stop()


def outgoing(rt: NodeRuntime, *states: tr.State) -> list[str]:
    return [
        v.error for v in rt.transfers.views() if v.direction is Direction.OUT and v.state in states
    ]


LIVE = (tr.State.OFFERED, tr.State.RUNNING)


def shared_hashes(pair: Pair) -> set[str]:
    """What the consultant must hold: the hospital's study de-identified under the consult."""
    rt = pair.hospital
    key = rt.identity.derive_key(cases.PSEUDONYM_KEY_PURPOSE)
    share = ShareContext(pseudonyms=PseudonymMap.load(cases.map_path(rt, pair.consult_id), key))
    return {
        hashlib.sha256(deidentify(rt.store.read_instance(row.sop_instance_uid), share)).hexdigest()
        for row in rt.store.instances(pair.study_uid)
    }


def received_hashes(rt: NodeRuntime, study_uid: str) -> set[str]:
    return {
        hashlib.sha256(rt.store.read_instance(row.sop_instance_uid)).hexdigest()
        for row in rt.store.instances(study_uid)
    }


async def _notes(rt: NodeRuntime, args: dict[str, object], emit: Emit) -> list[str]:
    async def canary() -> None:
        rt.notify("the command ran")

    # asyncio starts tasks in the order they were made: a resume the node spawned when it
    # came up (its first step is its notice) has said so before this later task speaks.
    await asyncio.ensure_future(canary())
    return drain(rt, [])


@pytest.fixture(autouse=True)
def _notes_operation(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test's operation in the node's table, for this test only."""
    monkeypatch.setitem(OPERATIONS, "test.notes", _notes)


def drain(rt: NodeRuntime, into: list[str]) -> list[str]:
    while not rt.notifications.empty():
        into.append(rt.notifications.get_nowait())
    return into


async def test_a_second_fetch_replaces_the_sender_and_the_study_arrives_byte_exact(
    tmp_path: Path, registry: str
) -> None:
    async with accepted_consult(tmp_path, registry) as pair:
        a, b = pair.hospital, pair.consultant
        again: list[asyncio.Task[bytes]] = []

        def fetch_again(progress: tr.Progress) -> None:
            # The consultant's node asks again mid-transfer, as a restarted one does.
            if not again:
                conn = b.transport.connection(a.identity.public_key)
                assert conn is not None
                request = conn.request(studies.FETCH_KIND, pair.consult_id.encode())
                again.append(asyncio.ensure_future(request))

        # Two fetches on the consultant's node are one fetch (a second `f`).
        first, second = await asyncio.gather(
            b.consulting.studies.fetch(pair.consult_id, on_progress=fetch_again),
            b.consulting.studies.fetch(pair.consult_id),
        )
        assert first == second
        assert first.instances_done == first.instances_total == SLICES
        assert await again[0] == b"ok"
        assert len([v for v in b.transfers.views() if v.direction is Direction.IN]) == 1

        # The hospital ran two senders one after the other, never two at once.
        assert outgoing(a, tr.State.FAILED) == ["replaced by a new fetch from the peer"]
        await wait_for(lambda: not outgoing(a, *LIVE))
        assert len(outgoing(a, tr.State.COMPLETE)) == 1

        shared_uid = b.consults.get(pair.consult_id).request.study_uid
        assert received_hashes(b, shared_uid) == shared_hashes(pair)
        assert b.consults.get(pair.consult_id).state is State.IN_REVIEW
        assert not (b.consulting.studies.spool_of(pair.consult_id)).exists()


async def test_a_withdrawn_consult_stops_its_sender_and_the_consultants_fetch(
    tmp_path: Path, registry: str
) -> None:
    async with accepted_consult(tmp_path, registry) as pair:
        a, b = pair.hospital, pair.consultant
        withdrawing: list[asyncio.Task[object]] = []

        def withdraw_once(progress: tr.Progress) -> None:
            if not withdrawing:
                withdrawing.append(asyncio.ensure_future(a.consulting.withdraw(pair.consult_id)))

        with pytest.raises((TransportError, ConsultError), match=r"cancelled|withdrawn"):
            await b.consulting.studies.fetch(pair.consult_id, on_progress=withdraw_once)
        assert await withdrawing[0] == []  # the consultant was told
        assert not outgoing(a, *LIVE)
        assert outgoing(a, tr.State.FAILED) == ["the consult was withdrawn by the requester"]
        await wait_for(lambda: b.consults.get(pair.consult_id).state is State.WITHDRAWN)
        shared_uid = b.consults.get(pair.consult_id).request.study_uid
        assert len(b.store.instances(shared_uid)) < SLICES


async def stopped_mid_fetch(pair: Pair) -> Path:
    """The consultant's node stopped after 5 instances of its fetch; returns the spool."""
    b = pair.consultant
    spool = b.consulting.studies.spool_of(pair.consult_id)
    stopping: list[asyncio.Task[None]] = []

    def stop_after_a_few(progress: tr.Progress) -> None:
        if progress.instances_done >= 5 and not stopping:
            stopping.append(asyncio.ensure_future(b.stop()))

    async def pull() -> None:
        await b.consulting.studies.fetch(pair.consult_id, on_progress=stop_after_a_few)

    b.spawn(pull())
    await wait_for(lambda: bool(stopping), within=60)
    await stopping[0]
    assert (spool / "manifest").exists(), "the fetch finished before the node stopped"
    return spool


async def test_a_node_brought_up_for_one_command_does_not_resume_a_fetch(
    tmp_path: Path, registry: str
) -> None:
    async with accepted_consult(tmp_path, registry) as pair:
        spool = await stopped_mid_fetch(pair)
        said = await commands.run(pair.consultant_home, "test.notes", {}, lambda _line: None)
        assert said == ["the command ran"]  # no "Resuming the study of consult ..."
        assert (spool / "manifest").exists()  # kept for the node's next start


async def test_a_consultant_restarted_mid_fetch_resumes_by_itself(
    tmp_path: Path, registry: str
) -> None:
    async with accepted_consult(tmp_path, registry) as pair:
        a = pair.hospital
        spool = await stopped_mid_fetch(pair)

        # The same home started again: nobody asks, the fetch resumes and completes.
        b2 = pair.consultant = await _started(pair.consultant_home, pair.consultant_identity)
        notes: list[str] = []
        await wait_for(lambda: b2.consults.get(pair.consult_id).state is State.IN_REVIEW, within=60)
        assert f"Resuming the study of consult {pair.consult_id[:8]}" in drain(b2, notes)
        await wait_for(lambda: any("received" in n for n in drain(b2, notes)))
        shared_uid = b2.consults.get(pair.consult_id).request.study_uid
        assert received_hashes(b2, shared_uid) == shared_hashes(pair)
        assert not spool.exists()
        await wait_for(lambda: not outgoing(a, *LIVE), within=30)


async def test_the_spool_of_a_withdrawn_consult_is_removed_at_start_not_resumed(
    tmp_path: Path, registry: str
) -> None:
    async with accepted_consult(tmp_path, registry) as pair:
        b = pair.consultant
        await pair.hospital.consulting.withdraw(pair.consult_id)
        await wait_for(lambda: b.consults.get(pair.consult_id).state is State.WITHDRAWN)
        await b.stop()
        transfers = b.home.data_dir / "transfers"
        withdrawn = b.consulting.studies.spool_of(pair.consult_id)
        withdrawn.mkdir(parents=True)
        (withdrawn / "manifest").write_bytes(b"left by a crash")
        other = transfers / "ABCDEFGHIJKLMNOP"  # a `radmesh fetch` spool: not a consult's
        other.mkdir()

        b2 = pair.consultant = await _started(pair.consultant_home, pair.consultant_identity)
        assert not withdrawn.exists()
        assert other.exists()
        # At start the desk resumes each unfinished fetch it finds, and found none.
        assert b2.consulting.studies.unfinished() == []
        assert not any("Resuming" in n for n in drain(b2, []))
        assert not b2.transfers.views()


async def test_two_consults_between_the_same_nodes_fetch_at_once_each_its_own_study(
    tmp_path: Path, registry: str
) -> None:
    # One connection carries both transfers; before they were told apart by transfer id,
    # the second transfer's receiver and sender took over the first's messages.
    async with accepted_consult(tmp_path, registry) as pair:
        a, b = pair.hospital, pair.consultant
        for path in generate_ct(tmp_path / "ct2", slices=SLICES // 2, rows=128, seed=7):
            a.store.add_file(path, source="test")
        [second_study] = [s.study_uid for s in a.store.studies() if s.study_uid != pair.study_uid]
        terms = consults.Terms("fracture?", Priority.URGENT, "neuro", "IE")
        second, _, _ = await a.consulting.request_consult(
            pair.consultant_identity.public_key, second_study, terms
        )
        await wait_for(lambda: len(b.consults.cases()) == 2)
        await b.consulting.respond(second.id, Event.ACCEPT)
        await wait_for(lambda: a.consults.get(second.id).state is State.ACCEPTED)

        first, other = await asyncio.wait_for(
            asyncio.gather(
                b.consulting.studies.fetch(pair.consult_id), b.consulting.studies.fetch(second.id)
            ),
            90,
        )
        assert (first.instances_done, other.instances_done) == (SLICES, SLICES // 2)
        for consult_id, slices in ((pair.consult_id, SLICES), (second.id, SLICES // 2)):
            shared = b.consults.get(consult_id).request.study_uid
            assert len(b.store.instances(shared)) == slices
            assert b.consults.get(consult_id).state is State.IN_REVIEW
