"""Two real nodes on a loopback registry with a consult between them, for the tests of
the clinical loop (consult service, SR filing, signing in the TUI): a rural hospital node that
holds a generated CT and asked a neuro consultant node about it, and the consultant,
who accepted. Each test goes on from there."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from consult.requests import ConsultRequest, Event, Priority
from crypto.identity import Identity
from node.app.cases import Share
from node.app.consults import Terms
from node.app.runtime import NodeRuntime
from node.core.config import NodeHome
from node.demo.phantom import generate_ct
from peer_transport.rtc import restrict_host_addresses
from tests.node.test_runtime import FAST, make_home, started, wait_for


@dataclass(frozen=True)
class Pair:
    a: NodeRuntime  # the hospital ("rural"), which asked
    b: NodeRuntime  # the consultant ("neuro"), who accepted
    a_home: NodeHome
    b_home: NodeHome
    rural: Identity
    neuro: Identity
    study_uid: str  # the hospital's own study
    request: ConsultRequest
    share: Share


@asynccontextmanager
async def accepted_consult(
    tmp_path: Path,
    registry: str,
    *,
    slices: int = 2,
    question: str = "q",
    control: bool = False,
) -> AsyncIterator[Pair]:
    """Both nodes started and trusting each other; the consult requested and accepted.
    ``control``: the hospital node listens for `radmesh` commands."""
    rural_home, rural = make_home(tmp_path, "rural", registry, [])
    neuro_home, neuro = make_home(tmp_path, "neuro", registry, ["neuro"])
    a = NodeRuntime(rural_home, rural, transport_options=FAST, control=control)
    b = NodeRuntime(neuro_home, neuro, transport_options=FAST)
    await a.start()
    await b.start()
    try:
        for path in generate_ct(tmp_path / "ct", slices=slices, rows=32):
            a.store.add_file(path, source="test")
        study_uid = a.store.studies()[0].study_uid
        a.trust.mark_verified(neuro.node_id, a.now())
        b.trust.mark_verified(rural.node_id, b.now())
        request, share, _ = await a.consulting.request_consult(
            neuro.public_key,
            study_uid,
            Terms(
                question=question,
                priority=Priority.URGENT,
                subspecialty="neuro",
                jurisdiction="IE",
            ),
        )
        await wait_for(lambda: bool(b.consults.cases()))
        await b.consulting.respond(request.id, Event.ACCEPT)
        yield Pair(a, b, rural_home, neuro_home, rural, neuro, study_uid, request, share)
    finally:
        await a.stop()
        await b.stop()


@asynccontextmanager
async def two_trusted_nodes(tmp_path: Path) -> AsyncIterator[tuple[NodeRuntime, NodeRuntime]]:
    """A hospital ("rural") and a consultant ("neuro") node on loopback, each knowing the
    other's LAN record (as if found by mDNS) and having verified its key; no registry."""
    restrict_host_addresses(["127.0.0.1"])
    home_a, alice = make_home(tmp_path, "rural", "", [])
    home_b, bob = make_home(tmp_path, "neuro", "", ["neuro"])
    a, b = await started(home_a, alice), await started(home_b, bob)
    try:
        assert a.record is not None
        assert b.record is not None
        a.directory.remember(b.record, "test", a.now())
        b.directory.remember(a.record, "test", b.now())
        a.trust.mark_verified(bob.node_id, a.now())
        b.trust.mark_verified(alice.node_id, b.now())
        yield a, b
    finally:
        await a.stop()
        await b.stop()
