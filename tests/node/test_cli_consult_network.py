"""`radmesh consult request | accept | decline` on the network: the command line against real
running nodes and a real registry (`consult fetch`, which brings its own node up, in its own
process)."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from consult.requests import Priority, State
from crypto.identity import Identity
from node.app import consults
from node.app.runtime import NodeRuntime
from node.core.config import NodeHome
from node.demo.phantom import generate_ct
from node.dicom.store import open_store
from peer_transport.connection import TransportOptions
from tests.cli import radmesh
from tests.node.test_runtime import FAST, REAL, make_home, wait_for


async def radmesh_process(home: NodeHome, *args: str) -> tuple[int, str]:
    """The CLI in its own process (it brings its own node up), so this loop keeps serving
    the registry and the nodes."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "node.cli", "--home", str(home.root), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out = (await asyncio.wait_for(process.communicate(), 60))[0].decode()
    assert process.returncode is not None
    return process.returncode, out


async def _running(
    home: NodeHome, identity: Identity, options: TransportOptions = FAST
) -> NodeRuntime:
    """A running node, as `radmesh node run` has it: the CLI's commands on its home run on it."""
    runtime = NodeRuntime(home, identity, transport_options=options, control=True)
    await runtime.start()
    return runtime


@dataclass
class Pair:
    hospital_home: NodeHome
    neuro_home: NodeHome
    hospital: NodeRuntime
    neuro: NodeRuntime
    neuro_id: Identity
    study_uid: str


async def _hospital_and_neuro(
    tmp_path: Path,
    registry: str,
    slices: int = 1,
    rows: int = 32,
    options: TransportOptions = FAST,
) -> Pair:
    """A running hospital with a CT study and a running neuroradiologist who trust each other."""
    hospital_home, hospital_id = make_home(tmp_path, "hospital", registry, [])
    neuro_home, neuro_id = make_home(tmp_path, "neuro", registry, ["neuro"])
    hospital = await _running(hospital_home, hospital_id, options)
    neuro = await _running(neuro_home, neuro_id, options)
    try:
        for path in generate_ct(tmp_path / "ct", slices=slices, rows=rows):
            hospital.store.add_file(path, source="test")
        hospital.trust.mark_verified(neuro_id.node_id, hospital.now())
        neuro.trust.mark_verified(hospital_id.node_id, neuro.now())
    except BaseException:
        await hospital.stop()
        await neuro.stop()
        raise
    study_uid = hospital.store.studies()[0].study_uid
    return Pair(hospital_home, neuro_home, hospital, neuro, neuro_id, study_uid)


async def _requested(pair: Pair, *more: str) -> tuple[str, str]:
    """`radmesh consult request` on the hospital's home, to the neuroradiologist by id: the
    new consult's id and what the command printed."""
    code, out = await radmesh(
        pair.hospital_home, "consult", "request", "--study", pair.study_uid, "--question", "?",
        "--subspecialty", "neuro", "--jurisdiction", "IE", "--to", str(pair.neuro_id.node_id),
        *more,
    )  # fmt: skip
    assert code == 0, out
    return out.split()[1], out


async def test_routed_request_and_accept_reach_nodes_live_and_through_the_mailbox(
    tmp_path: Path, registry: str
) -> None:
    hospital_home, hospital_id = make_home(tmp_path, "hospital", registry, [])
    neuro_home, neuro_id = make_home(tmp_path, "neuro", registry, ["neuro"])
    msk_home, msk_id = make_home(tmp_path, "msk", registry, ["msk"])
    hospital = await _running(hospital_home, hospital_id)
    for path in generate_ct(tmp_path / "ct", slices=1, rows=32):
        hospital.store.add_file(path, source="test")
    study_uid = hospital.store.studies()[0].study_uid
    neuro, msk = await _running(neuro_home, neuro_id), await _running(msk_home, msk_id)
    for consultant in (neuro, msk):
        hospital.trust.mark_verified(consultant.identity.node_id, hospital.now())
        consultant.trust.mark_verified(hospital_id.node_id, consultant.now())
    await hospital.stop()  # from here on the hospital uses only the CLI
    try:
        code, out = await radmesh(
            hospital_home, "consult", "request", "--route", "--study", study_uid,
            "--question", "subdural?", "--priority", "stat", "--subspecialty", "neuro",
            "--jurisdiction", "IE", "--max-offers", "2",
        )  # fmt: skip
        assert code == 0, out
        consult_id = out.split()[1]
        assert f"offered to {neuro_id.node_id.short()}: delivered (LAN)" in out
        assert out.count("offered to") == 1  # the msk node does not match
        await wait_for(lambda: bool(neuro.consults.cases()))
        case = neuro.consults.get(consult_id)
        assert case.request.study_uid != study_uid  # de-identified share
        assert not msk.consults.cases()

        # The hospital is offline now: the accept waits in the registry mailbox.
        code, out = await radmesh(neuro_home, "consult", "accept", consult_id[:8])
        assert code == 0, out
        assert "Sent the response" in out
        assert "stored" in out
        assert neuro.consults.get(consult_id).state is State.ACCEPTED

        hospital = await _running(hospital_home, hospital_id)
        try:
            await wait_for(lambda: hospital.consults.get(consult_id).state is State.ACCEPTED)
            assert hospital.consults.info(consult_id).peer_id == neuro_id.node_id
        finally:
            await hospital.stop()
    finally:
        await neuro.stop()
        await msk.stop()


async def test_request_to_a_chosen_peer_and_decline_over_the_lan(
    tmp_path: Path, registry: str
) -> None:
    pair = await _hospital_and_neuro(tmp_path, registry)
    neuro_home = pair.neuro_home
    hospital, neuro = pair.hospital, pair.neuro
    try:
        consult_id, out = await _requested(pair, "--out", str(tmp_path / "req.bin"))
        assert "delivered (LAN)" in out
        assert (tmp_path / "req.bin").stat().st_size > 0
        await wait_for(lambda: bool(neuro.consults.cases()))

        code, out = await radmesh(neuro_home, "consult", "decline", consult_id, "--reason", "off")
        assert code == 0, out
        await wait_for(lambda: hospital.consults.get(consult_id).state is State.DECLINED)
    finally:
        await hospital.stop()
        await neuro.stop()


async def test_withdraw_tells_the_consultant_and_only_the_requester_may(
    tmp_path: Path, registry: str
) -> None:
    pair = await _hospital_and_neuro(tmp_path, registry)
    hospital_home, neuro_home = pair.hospital_home, pair.neuro_home
    hospital, neuro = pair.hospital, pair.neuro
    try:
        await hospital.stop()  # the hospital's side is the CLI from here on
        consult_id, _ = await _requested(pair)
        await wait_for(lambda: bool(neuro.consults.cases()))

        code, out = await radmesh(neuro_home, "consult", "withdraw", consult_id[:8])
        assert code != 0
        assert "only the requesting node" in out
        assert neuro.consults.get(consult_id).state is State.REQUESTED

        code, out = await radmesh(hospital_home, "consult", "withdraw", consult_id[:8])
        assert code == 0, out
        assert "could not be told" not in out
        await wait_for(lambda: neuro.consults.get(consult_id).state is State.WITHDRAWN)
    finally:
        await neuro.stop()


@pytest.mark.webrtc  # the CLI brings a node up in its own process: real aiortc both sides
async def test_the_consultant_fetches_the_de_identified_study_from_the_command_line(
    tmp_path: Path, registry: str
) -> None:
    pair = await _hospital_and_neuro(tmp_path, registry, slices=3, rows=64, options=REAL)
    neuro_home = pair.neuro_home
    hospital, neuro = pair.hospital, pair.neuro
    neuro_id, study_uid = pair.neuro_id, pair.study_uid
    try:
        terms = consults.Terms("?", Priority.STAT, "neuro", "IE")
        request, _, _ = await hospital.consulting.request_consult(
            neuro.identity.public_key, study_uid, terms
        )
        await wait_for(lambda: bool(neuro.consults.cases()))
        await neuro.stop()  # the consultant's side is the CLI from here on

        code, out = await radmesh_process(neuro_home, "consult", "fetch", request.id[:8])
        assert code != 0
        assert "accepted" in out  # it must be accepted first: the state table says so
        code, out = await radmesh_process(neuro_home, "consult", "accept", request.id[:8])
        assert code == 0, out
        code, out = await radmesh_process(neuro_home, "consult", "fetch", request.id[:8])
        assert code == 0, out
        assert "received and stored: 3 instances" in out

        store = open_store(neuro_home, neuro_id)
        try:
            assert [s.study_uid for s in store.studies()] == [request.study_uid]
            assert request.study_uid != study_uid  # the de-identified share
            assert len(store.instances(request.study_uid)) == 3
        finally:
            store.close()
    finally:
        await hospital.stop()
