"""A home's records on a real registry: one sequence for every publisher, catching up
after a stale refusal, and availability set on the running node (issue 14 items 2, 3)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from crypto.identity import Identity
from node.app.runtime import NodeRuntime
from node.cli import main
from node.core.config import NodeHome
from node.core.sequence import RecordSequence
from registry.client import RegistryClient, SearchQuery
from registry.records import Availability, NodeRecord
from registry.server import RegistryServer
from tests.node.test_runtime import FAST, make_home, request_from, wait_for

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RegistryServer]:
    registry = RegistryServer(tmp_path / "registry.db")
    await registry.start("127.0.0.1", 0)
    yield registry
    await registry.stop()


def held(server: RegistryServer, identity: Identity) -> NodeRecord:
    wire = server.db.get_wire(identity.node_id, int(time.time()))
    assert wire is not None, "the registry holds no current record of the node"
    return NodeRecord.from_wire(wire)


async def node(home: NodeHome, identity: Identity) -> NodeRuntime:
    runtime = NodeRuntime(home, identity, transport_options=FAST, control=True)
    await runtime.start()
    return runtime


@asynccontextmanager
async def running(home: NodeHome, identity: Identity) -> AsyncIterator[NodeRuntime]:
    runtime = await node(home, identity)
    try:
        yield runtime
    finally:
        await runtime.stop()


async def cli(home: NodeHome, *args: str) -> int:
    return await asyncio.to_thread(main, ["--home", str(home.root), *args])


def test_the_home_sequence_never_goes_backwards(tmp_path: Path) -> None:
    home = NodeHome(tmp_path / "home")
    seq = RecordSequence(home)
    first = seq.next(1_000)
    assert first == 1_000
    assert seq.next(500) == 1_001  # the clock went back: still forward
    assert seq.advance_past(5_000_000, 1_002) == 5_000_001
    assert RecordSequence(home).next(1_003) == 5_000_002  # another publisher, same file
    assert oct(seq.path.stat().st_mode & 0o777) == "0o600"


async def test_cli_publish_does_not_lock_the_running_node_out(
    tmp_path: Path, server: RegistryServer, caplog: pytest.LogCaptureFixture
) -> None:
    home, identity = make_home(tmp_path, "neuro", server.url, ["neuro"])
    async with running(home, identity) as rt:
        await wait_for(lambda: rt.registry_state.get(server.url) == "connected")
        # With its own endpoints the CLI signs the record itself, beside the running node.
        assert await cli(home, "registry", "publish", "--endpoint", "lan:http://127.0.0.1:9") == 0
        by_cli = held(server, identity)
        assert "lan:http://127.0.0.1:9" in by_cli.endpoints  # the CLI's record replaced it
        caplog.clear()
        caplog.set_level(logging.WARNING)
        await rt._registry_step(server.url)  # what its loop does every 15 minutes
        mine = held(server, identity)
        assert mine.sequence > by_cli.sequence
        assert f"lan:{rt.lan_url}" in mine.endpoints
        assert not [r for r in caplog.records if "stale" in r.getMessage()]


async def test_cli_publish_without_endpoints_asks_the_running_node(
    tmp_path: Path, server: RegistryServer
) -> None:
    home, identity = make_home(tmp_path, "neuro", server.url, ["neuro"])
    async with running(home, identity) as rt:
        await wait_for(lambda: rt.registry_state.get(server.url) == "connected")
        before = held(server, identity).sequence
        assert await cli(home, "registry", "publish", "--availability", "on_call") == 0
        record = held(server, identity)
        assert record.sequence > before
        assert f"lan:{rt.lan_url}" in record.endpoints
        assert record.availability is Availability.ON_CALL


async def test_a_home_whose_sequence_went_backwards_catches_up_by_itself(
    tmp_path: Path, server: RegistryServer, caplog: pytest.LogCaptureFixture
) -> None:
    home, identity = make_home(tmp_path, "neuro", server.url, ["neuro"])
    # What `registry publish` signed before it shared the home's sequence: microseconds.
    ahead = time.time_ns() // 1000
    async with RegistryClient(server.url) as client:
        await client.publish(NodeRecord.create(identity, now=int(time.time()), sequence=ahead))
    caplog.set_level(logging.WARNING, logger="registry.client")
    async with running(home, identity) as rt:
        assert rt.registry_state.get(server.url) == "connected"
        assert server.url in rt.registry_connections  # relay, mailbox and TURN work
        mine = held(server, identity)
        assert mine.sequence > ahead
        assert f"lan:{rt.lan_url}" in mine.endpoints
        assert RecordSequence(home).current() > ahead  # and it stays ahead after a restart
        warning = [r.getMessage() for r in caplog.records if "newer than ours" in r.getMessage()]
        assert warning
        assert "Republishing" in warning[0]


async def test_availability_set_on_the_running_node_is_published_at_once(
    tmp_path: Path, server: RegistryServer
) -> None:
    home, identity = make_home(tmp_path, "neuro", server.url, ["neuro"])
    async with running(home, identity) as rt:
        await wait_for(lambda: rt.registry_state.get(server.url) == "connected")
        assert held(server, identity).availability is Availability.ONLINE
        assert await cli(home, "status", "--set", "on-call") == 0
        assert held(server, identity).availability is Availability.ON_CALL
        assert home.load_config().availability == "on_call"  # and after a restart
        async with RegistryClient(server.url) as client:
            online = await client.search(SearchQuery(online=True))
            on_call = await client.search(SearchQuery(on_call=True))
        assert identity.node_id not in {r.node_id for r in online}
        assert identity.node_id in {r.node_id for r in on_call}
    assert await cli(home, "status", "--set", "away") == 0  # no node runs: saved for later
    assert home.load_config().availability == "away"


async def test_routing_offers_online_before_on_call_and_never_away(
    tmp_path: Path, server: RegistryServer
) -> None:
    homes = {n: make_home(tmp_path, n, server.url, ["neuro"]) for n in ("rural", "a", "b")}
    nodes = {n: await node(h, i) for n, (h, i) in homes.items()}
    try:
        rural = nodes["rural"]
        for name in ("a", "b"):
            rural.trust.mark_verified(nodes[name].identity.node_id, rural.now())
        await workflow_set(nodes["a"], "on_call")
        request = request_from(rural.identity, rural.now())
        ranked = [r.node_id for r in await rural.consulting.find_consultants(request)]
        assert ranked == [nodes["b"].identity.node_id, nodes["a"].identity.node_id]
        online = await rural.directory.search(SearchQuery(online=True), rural.now())
        assert nodes["a"].identity.node_id not in {p.record.node_id for p in online}
        await workflow_set(nodes["b"], "away")
        ranked = [r.node_id for r in await rural.consulting.find_consultants(request)]
        assert ranked == [nodes["a"].identity.node_id]
    finally:
        for rt in nodes.values():
            await rt.stop()


async def workflow_set(rt: NodeRuntime, value: str) -> None:
    from node.app.availability import apply_availability

    await apply_availability(rt, value)


async def test_a_registry_cannot_push_the_sequence_with_a_record_it_forged() -> None:
    import base64

    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from registry.client import publish_catching_up
    from registry.errors import StaleRecord

    me, other = Identity.generate(), Identity.generate()
    now = int(time.time())
    claimed = NodeRecord.create(other, now=now, sequence=2**62)  # not signed by our key

    async def stale(request: web.Request) -> web.Response:
        wire = base64.b64encode(claimed.to_wire()).decode()
        return web.json_response({"error": "stale", "hint": "", "held_record": wire}, status=409)

    async def missing(request: web.Request) -> web.Response:
        return web.json_response({"error": "none", "hint": ""}, status=404)

    app = web.Application()
    app.router.add_post("/v1/records", stale)
    app.router.add_get("/v1/records/{node_id}", missing)
    asked: list[int] = []

    def after(held: int) -> NodeRecord:
        asked.append(held)
        return NodeRecord.create(me, now=now, sequence=held + 1)

    ours = NodeRecord.create(me, now=now, sequence=5)
    async with (
        TestServer(app) as test_server,
        RegistryClient(str(test_server.make_url("")).rstrip("/")) as client,
    ):
        with pytest.raises(StaleRecord):
            await publish_catching_up(client, ours, after)
    assert asked == []  # nothing the registry could not prove moved our sequence
