"""Attacks on signaling and intake: what an unknown key can make a node do.

Real nodes, a real registry and real HTTP on 127.0.0.1. A small HTTP "catcher"
stands in for a local service an attacker would like the node to call (an
Orthanc's ``/tools/shutdown``); it counts every request it gets.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import stat
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from crypto.envelope import ReplayGuard, SignedEnvelope, seal
from crypto.errors import Replayed
from crypto.identity import Identity, NodeId
from node.app.consults import MAX_STRANGER_REQUESTS
from node.app.courier import seal_node_message
from node.app.runtime import NodeRuntime
from node.cli import doctor
from node.core.config import NetworkConfig, NodeConfig, NodeHome
from node.core.keystore import load_identity, save_identity
from node.core.replay_store import PersistentReplayGuard
from node.core.supervise import Supervisor
from peer_transport.connection import PeerConnection, Transport
from peer_transport.signaling import MemorySignalingHub, SignalMessage
from registry import wsproto
from registry.client import RegistryClient, RegistryConnection
from registry.errors import RecordError, RegistryError
from registry.lan import fetch_record, post_signal
from registry.limits import StrangerGate
from registry.mdns import LanDiscovery
from registry.records import POINTER_TYPE, RECORD_TYPE, LanPointer, NodeRecord
from registry.server import RegistryServer
from tests.node.test_runtime import FAST, request_from, wait_for
from tests.peer_transport.helpers import mesh

WITHIN = 20.0  # seconds any one wait in these tests may take


# -- fixtures -------------------------------------------------------------------------
@dataclass
class Catcher:
    """An HTTP server that records every request and answers 404 to all of them."""

    url: str = ""
    hits: list[str] = field(default_factory=list)


@pytest.fixture
async def catcher() -> AsyncIterator[Catcher]:
    caught = Catcher()

    async def anything(request: web.Request) -> web.Response:
        caught.hits.append(f"{request.method} {request.path_qs}")
        return web.Response(status=404, text="not here")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    caught.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield caught
    await runner.cleanup()


def node_home(root: Path, name: str, registry: str = "", *, mdns: bool = False) -> NodeHome:
    home = NodeHome(root / name)
    save_identity(home.key_path, Identity.generate(), None)
    home.save_config(
        NodeConfig(
            display_name=name,
            subspecialties=["neuro"],
            jurisdictions=["IE"],
            network=NetworkConfig(
                registries=[registry] if registry else [],
                mdns=mdns,
                mdns_interfaces=["127.0.0.1"] if mdns else [],
                listen_host="127.0.0.1",
            ),
        )
    )
    return home


@pytest.fixture
async def victim(tmp_path: Path, registry: str) -> AsyncIterator[NodeRuntime]:
    """A hospital node on the registry (no mDNS)."""
    async with running(node_home(tmp_path, "victim", registry)) as node:
        await wait_for(lambda: node.registry_state.get(registry) == "connected", WITHIN)
        yield node


@contextlib.asynccontextmanager
async def running(home: NodeHome) -> AsyncIterator[NodeRuntime]:
    node = NodeRuntime(home, load_identity(home.key_path), transport_options=FAST, warm_cache=False)
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


def forged_record(identity: Identity, endpoints: list[str], now: int, seq: int = 1) -> bytes:
    """A record signed by ``identity`` that skips every check NodeRecord.create makes."""
    body: dict[str, Any] = {
        "name": "Dr Mallory",
        "inst": "",
        "country": "",
        "subs": ["neuro"],
        "jur": ["IE"],
        "lang": [],
        "tz": "UTC",
        "avail": "online",
        "ep": endpoints,
        "cert": None,
        "seq": seq,
        "iat": now,
        "exp": now + 3600,
    }
    return SignedEnvelope.create(identity, RECORD_TYPE, body).to_wire()


def forged_pointer(identity: Identity, endpoint: str) -> LanPointer:
    signature = SignedEnvelope.create(identity, POINTER_TYPE, [endpoint, 1]).signature
    return LanPointer(identity.public_key, endpoint, 1, signature)


async def publish_raw(registry: str, wire: bytes) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{registry}/v1/records", data=wire) as response,
    ):
        return response.status


async def connected(registry: str, identity: Identity) -> RegistryConnection:
    conn = RegistryClient(registry, identity).connect()
    await conn.__aenter__()
    return conn


async def next_signal(conn: RegistryConnection, identity: Identity) -> SignalMessage:
    async with asyncio.timeout(WITHIN):
        deliver = await conn.receive()
    return SignalMessage.open(identity, deliver.data, int(time.time()), ReplayGuard())[1]


# -- Issue 13 item 1: blind SSRF --------------------------------------------------------
BAD_LAN_URLS = [
    "http://127.0.0.1:8042/tools/shutdown?x=",
    "http://127.0.0.1:8042/tools/shutdown",
    "http://127.0.0.1:8042?x=",
    "http://127.0.0.1:8042#frag",
    "http://admin:pw@127.0.0.1:8042",
    "http://127.0.0.1:8042/",
    "http://127.0.0.1",
    "file:///etc/passwd",
    "gopher://127.0.0.1:8042",
    "ftp://127.0.0.1:21",
    "http://127.0.0.1:8042\r\nX-Injected: 1",
    "http://127.0.0.1:99999",
    "http:///tools",
]


@pytest.mark.parametrize("url", BAD_LAN_URLS)
def test_a_record_with_a_lan_url_that_is_not_bare_host_port_is_refused_at_parse(url: str) -> None:
    mallory = Identity.generate()
    now = int(time.time())
    with pytest.raises(RecordError, match="LAN URL"):
        NodeRecord.from_wire(forged_record(mallory, [f"lan:{url}"], now))
    with pytest.raises(RecordError, match="LAN URL"):
        LanPointer.from_wire(forged_pointer(mallory, url).to_wire())
    with pytest.raises(RecordError):
        NodeRecord.create(mallory, now=now, sequence=1, endpoints=(f"lan:{url}",))


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:7400",
        "https://192.0.2.1:443",
        "http://[::1]:7400",
        "http://pacs-gw.local:80",
    ],
)
def test_a_bare_lan_url_still_parses(url: str) -> None:
    mallory = Identity.generate()
    record = NodeRecord.from_wire(forged_record(mallory, [f"lan:{url}"], int(time.time())))
    assert record.lan_urls == (url,)


@pytest.mark.parametrize(
    "url", ["http://reg.example?x=1", "https://user:pw@reg.example", "gopher://reg.example:70"]
)
def test_a_record_with_a_bad_registry_url_is_refused_at_parse(url: str) -> None:
    with pytest.raises(RecordError, match="registry URL"):
        NodeRecord.from_wire(forged_record(Identity.generate(), [f"registry:{url}"], 0))


async def test_lan_helpers_never_add_a_peer_chosen_path(catcher: Catcher) -> None:
    """Even handed a URL with a path, the helpers refuse it before any request."""
    with pytest.raises(RecordError):
        await post_signal(catcher.url + "/tools/shutdown?x=", b"x")
    with pytest.raises(RecordError):
        await fetch_record(catcher.url + "/tools/shutdown?x=", int(time.time()))
    with pytest.raises(RegistryError):  # the bare URL is fine: our own path, a 404 here
        await post_signal(catcher.url, b"x")
    assert catcher.hits == ["POST /v1/signal"]


@pytest.mark.parametrize("lan", ["{catcher}/tools/shutdown?x=", "{catcher}"])
async def test_an_unknown_key_cannot_make_the_node_contact_its_lan_url(
    victim: NodeRuntime, registry: str, catcher: Catcher, lan: str
) -> None:
    """Mallory publishes a record pointing its LAN URL at a local service and sends one
    offer through the registry. The refusal goes back through the registry; the service
    is never contacted. With the path variant the registry itself refuses the record."""
    mallory = Identity.generate()
    now = int(time.time())
    await publish_raw(
        registry, forged_record(mallory, [f"lan:{lan.format(catcher=catcher.url)}"], now)
    )
    conn = await connected(registry, mallory)
    try:
        offer = SignalMessage("offer", os.urandom(16), "v=0\r\n")
        await conn.send(
            victim.identity.node_id, offer.seal(mallory, victim.identity.public_key, now)
        )
        # Canary on the same path: the refusal is sent after the node chose where to send it.
        reply = await next_signal(conn, mallory)
        assert reply.kind == "reject"
        assert reply.session == offer.session
        assert catcher.hits == []
        if lan == "{catcher}":
            # Not vacuous: once Mallory's key is trusted, its (bare) LAN URL is used,
            # with our own fixed path.
            victim.trust.mark_verified(mallory.node_id, victim.now())
            how = await victim.send_sealed(mallory.public_key, b"x" * 10)  # 404: then registry
            assert how.endswith(f"(registry {registry})")
            assert catcher.hits == ["POST /v1/signal"]
    finally:
        await conn.close()


@pytest.mark.parametrize("path", ["/tools/shutdown?x=", ""])
async def test_an_mdns_announcement_from_an_unknown_key_is_not_fetched(
    tmp_path: Path, catcher: Catcher, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GET variant: Mallory announces on mDNS a signed pointer at a local service."""
    # A service type of this test's own: other nodes on the shared loopback (other test
    # runs) must neither see Mallory's announcement nor fetch from the catcher.
    monkeypatch.setattr("registry.mdns.SERVICE_TYPE", f"_rm{os.urandom(5).hex()}._tcp.local.")
    mallory = Identity.generate()
    announcer = LanDiscovery(interfaces=["127.0.0.1"], own_id=mallory.node_id)
    async with running(node_home(tmp_path, "victim", mdns=True)) as node:
        discovery = node.discovery
        assert discovery is not None
        await announcer.start()
        try:
            await announcer.advertise(forged_pointer(mallory, catcher.url + path))
            # Canary: Mallory's announcement was processed (kept as heard-of, or refused);
            # other nodes' announcements on the shared loopback do not count.
            await wait_for(
                lambda: (
                    catcher.hits
                    or mallory.node_id in getattr(discovery, "heard", {})
                    or mallory.node_id in getattr(discovery, "refused", {})
                ),
                WITHIN,
            )
            assert catcher.hits == []
            assert mallory.node_id not in discovery.found
            if not path:
                # Not vacuous: trusted, the same announcement is fetched, at our own path.
                node.trust.mark_verified(mallory.node_id, node.now())
                await node.directory.resolve(mallory.node_id, node.now())
                assert catcher.hits == ["GET /v1/record"]
        finally:
            await announcer.stop()


# -- Issue 13 item 6: flooding and loops that die --------------------------------------
def consult_request(sender: Identity, to: bytes) -> tuple[str, bytes]:
    request = request_from(sender, int(time.time()))
    sealed = seal_node_message(
        sender, to, "consult.request", request.to_wire(sender), int(time.time())
    )
    return request.id, sealed


def trusted_peer(node: NodeRuntime) -> Identity:
    peer = Identity.generate()
    node.trust.mark_verified(peer.node_id, node.now())
    return peer


def has_case(node: NodeRuntime, consult_id: str) -> Callable[[], bool]:
    return lambda: any(case.request.id == consult_id for case in node.consults.cases())


async def canary_lands(conn: RegistryConnection, victim: NodeRuntime) -> None:
    """A trusted peer's request sent on ``conn`` after what the test sent: once it is a case,
    the victim has handled everything before it on that registry socket."""
    canary_id, canary = consult_request(trusted_peer(victim), victim.identity.public_key)
    await conn.send(victim.identity.node_id, canary)
    await wait_for(has_case(victim, canary_id), WITHIN)


async def test_a_flood_past_the_inbox_cap_does_not_stop_intake(
    victim: NodeRuntime, registry: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More throwaway keys than the inbox holds: the extra requests are dropped quietly and
    a trusted peer's request sent after them, on the same registry socket, still lands."""
    monkeypatch.setattr("registry.trust.MAX_INBOX", 5)
    target = victim.identity.public_key
    conn = await connected(registry, Identity.generate())
    try:
        for _ in range(12):
            await conn.send(
                victim.identity.node_id, consult_request(Identity.generate(), target)[1]
            )
        await canary_lands(conn, victim)
    finally:
        await conn.close()
    assert len(victim.trust.inbox()) == 5
    assert victim.strangers.dropped == 7


async def test_unknown_keys_are_rate_limited_per_key_and_in_total(
    victim: NodeRuntime, registry: str
) -> None:
    victim.strangers = StrangerGate(rate=0.001, burst=3, total_rate=0.001, total_burst=6)
    target = victim.identity.public_key
    one_key = Identity.generate()
    conn = await connected(registry, Identity.generate())
    try:
        for _ in range(5):  # one key: 3 pass, 2 dropped
            await conn.send(victim.identity.node_id, consult_request(one_key, target)[1])
        for _ in range(6):  # many keys: 3 more pass (6 in total), 3 dropped
            await conn.send(
                victim.identity.node_id, consult_request(Identity.generate(), target)[1]
            )
        await canary_lands(conn, victim)
    finally:
        await conn.close()
    assert len(victim.consults.cases()) == 6 + 1
    assert victim.strangers.dropped == 5


async def test_one_unknown_key_gets_only_a_few_requests_waiting(
    victim: NodeRuntime, registry: str
) -> None:
    """Within its rate, an unknown key still cannot pile up requests for a person."""
    stranger = Identity.generate()
    target = victim.identity.public_key
    conn = await connected(registry, stranger)
    try:
        for _ in range(5):
            await conn.send(victim.identity.node_id, consult_request(stranger, target)[1])
        await canary_lands(conn, victim)
    finally:
        await conn.close()
    assert len(victim.consults.cases()) == MAX_STRANGER_REQUESTS + 1


async def test_a_message_that_makes_a_handler_raise_does_not_end_the_registry_pump(
    victim: NodeRuntime, registry: str
) -> None:
    async def buggy(sender: NodeId, kind: str, wire: bytes) -> None:
        raise ValueError("a bug in a handler")

    victim.handlers["test.buggy"] = buggy
    peer = trusted_peer(victim)
    target = victim.identity.public_key
    conn = await connected(registry, peer)
    try:
        boom = seal_node_message(peer, target, "test.buggy", b"", int(time.time()))
        await conn.send(victim.identity.node_id, boom)
        canary_id, canary = consult_request(peer, target)
        await conn.send(victim.identity.node_id, canary)
        await wait_for(has_case(victim, canary_id), WITHIN)
    finally:
        await conn.close()


async def test_the_transport_signal_reader_survives_a_signal_that_raises() -> None:
    """A replay guard whose disk is briefly locked raises sqlite3.OperationalError for one
    signal; the reader goes on and refuses the next offer (the canary) as it should."""
    hub = MemorySignalingHub()
    node, mallory = Identity.generate(), Identity.generate()
    transport = Transport(node, hub.endpoint(node.public_key), is_trusted=lambda _key: False)
    mallory_end = hub.endpoint(mallory.public_key)
    original = transport._guard.check_and_remember
    calls = 0

    def locked_once(*args: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise sqlite3.OperationalError("database is locked")
        original(*args)

    transport._guard.check_and_remember = locked_once  # type: ignore[method-assign,assignment]
    await transport.start()
    try:
        now = int(time.time())
        first, second = (SignalMessage("offer", os.urandom(16), "v=0\r\n") for _ in range(2))
        await mallory_end.send(node.public_key, first.seal(mallory, node.public_key, now))
        await mallory_end.send(node.public_key, second.seal(mallory, node.public_key, now))
        async with asyncio.timeout(WITHIN):
            data = await mallory_end.receive()
        reply = SignalMessage.open(mallory, data, now, ReplayGuard())[1]
        assert (reply.kind, reply.session) == ("reject", second.session)
    finally:
        await transport.close()


async def test_a_supervised_loop_that_crashes_is_restarted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("node.core.supervise.RESTART_DELAY", 0.01)
    runs: list[int] = []

    async def loop() -> None:
        runs.append(len(runs))
        if len(runs) < 3:
            raise KeyError("a bug")

    supervisor = Supervisor()
    async with asyncio.timeout(WITHIN):
        await supervisor.run("test loop", loop)
    assert runs == [0, 1, 2]
    assert supervisor.restarts == {"test loop": 2}


# -- Issue 13 item 15: replays after a restart -----------------------------------------
async def test_a_captured_node_message_is_refused_after_the_node_restarts(
    tmp_path: Path,
) -> None:
    home = node_home(tmp_path, "victim")
    peer = Identity.generate()
    received: list[bytes] = []

    async def record(sender: NodeId, kind: str, wire: bytes) -> None:
        received.append(wire)

    def message(wire: bytes, to: bytes) -> bytes:
        return seal(
            peer,
            to,
            "node-msg",
            {"kind": "test.count", "wire": wire},
            now=int(time.time()),
            ttl=7 * 24 * 3600,
        )

    async with running(home) as node:
        node.trust.mark_verified(peer.node_id, node.now())
        node.handlers["test.count"] = record
        captured = message(b"once", node.identity.public_key)
        await post_signal(node.lan_url, captured)  # the LAN endpoint answers once handled
        assert received == [b"once"]
        guard_file = node.home.data_dir / "replay.db"
    async with running(home) as node:
        node.handlers["test.count"] = record
        await post_signal(node.lan_url, captured)  # the replay, after the restart
        await post_signal(node.lan_url, message(b"canary", node.identity.public_key))
        assert received == [b"once", b"canary"]
    assert stat.S_IMODE(guard_file.stat().st_mode) == 0o600


# -- the same class: a queue nobody reads must not turn trusted peers away --------------
async def test_trusted_peers_still_connect_when_nobody_calls_accept() -> None:
    """A running node serves connections through its handlers and never calls accept();
    once the accept queue is full, a new trusted peer must still get through."""
    async with mesh() as m:
        server = await m.node()
        server._accepted = asyncio.Queue(1)  # the default holds 64: the same, sooner

        async def echo(conn: PeerConnection, body: bytes) -> bytes:
            return body

        server.handle("test.echo", echo)
        peers = [await m.node() for _ in range(2)]
        for peer in peers:
            m.trust(server, peer)
        for peer in peers:
            conn = await peer.connect(server.identity.public_key)
            assert await conn.request("test.echo", b"hello", timeout=WITHIN) == b"hello"


# -- the same class: redirects, relay URLs, replay-guard eviction -----------------------
async def test_no_http_client_follows_a_redirect(catcher: Catcher) -> None:
    """A registry (or a LAN endpoint) answering 302 to a local service must not make the
    node request it: lookups, publishing, LAN signals and the signaling socket."""

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(catcher.url + "/tools/shutdown")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    liar = f"http://127.0.0.1:{runner.addresses[0][1]}"
    mallory = Identity.generate()
    try:
        async with RegistryClient(liar, mallory) as client:
            with pytest.raises(RegistryError):
                await client.lookup(mallory.node_id)
            with pytest.raises(RegistryError):
                await client.publish(NodeRecord.create(mallory, now=int(time.time()), sequence=1))
            conn = client.connect(connect_timeout=2.0)
            with pytest.raises(RegistryError):
                await conn.__aenter__()
            await conn.close()
        with pytest.raises(RegistryError):
            await post_signal(liar, b"x")
        check = await asyncio.to_thread(doctor._registry_reachable, liar)  # `radmesh doctor`
        assert not check.ok
        assert catcher.hits == []
        async with RegistryClient(catcher.url) as honest:  # canary: the catcher does answer
            assert await honest.lookup(mallory.node_id) is None
        assert catcher.hits == [f"GET /v1/records/{mallory.node_id}"]
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    "url",
    [
        "turn:127.0.0.1:8042/tools/shutdown",
        "http://127.0.0.1:8042",
        "turn:admin@127.0.0.1:3478",
        "turn:127.0.0.1:3478?transport=udp&x=1",
        "turn:127.0.0.1:99999",
    ],
)
def test_a_registry_cannot_hand_out_a_relay_url_that_is_not_turn_host_port(url: str) -> None:
    frame = wsproto.TurnCredentials("u", "p", 600, (url,))
    with pytest.raises(RegistryError, match="relay URL"):
        wsproto.from_wire(wsproto.to_wire(frame))


def test_relay_urls_coturn_gives_still_parse() -> None:
    urls = ("turn:127.0.0.1:3478", "stun:127.0.0.1:3478", "turns:relay.example:5349?transport=tcp")
    frame = wsproto.TurnCredentials("u", "p", 600, urls)
    assert wsproto.from_wire(wsproto.to_wire(frame)) == frame


@pytest.mark.parametrize("on_disk", [False, True])
def test_a_full_replay_guard_never_forgets_into_a_replay(tmp_path: Path, on_disk: bool) -> None:
    """A flood of fresh messages makes the guard forget the oldest; that old message,
    replayed, must still be refused (while new ones are taken)."""
    guard = PersistentReplayGuard(tmp_path / "replay.db", 3) if on_disk else ReplayGuard(3)
    sender = Identity.generate().public_key
    guard.check_and_remember(sender, b"old-message-0000", 1000, 0)
    for i in range(5):
        guard.check_and_remember(sender, f"flood-message-{i:02d}".encode(), 2000 + i, 0)
    assert len(guard) <= 3
    with pytest.raises(Replayed):
        guard.check_and_remember(sender, b"old-message-0000", 1000, 0)
    guard.check_and_remember(sender, b"fresh-message-00", 3000, 0)  # canary


async def test_status_stops_saying_connected_when_the_registry_socket_is_down(
    tmp_path: Path,
) -> None:
    server = RegistryServer(tmp_path / "registry.sqlite")
    url = await server.start("127.0.0.1", 0)
    try:
        async with running(node_home(tmp_path, "victim", url)) as node:
            await wait_for(lambda: node.status().registries.get(url) == "connected", WITHIN)
            await server.stop()
            await wait_for(lambda: node.status().registries[url] != "connected", WITHIN)
            assert node.status().registries[url].startswith("reconnecting")
    finally:
        await server.stop()
