"""Attacks on the registry server: its disk, its sockets, its relay and its TURN relay.

Each test runs a real registry on 127.0.0.1 and attacks it the way a stranger
with self-made keys could (identities cost nothing), then checks that an honest
node sharing the registry is unharmed, with a canary on the same path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from crypto.identity import Identity
from registry import lan, wsproto
from registry.client import RegistryClient, RegistryConnection
from registry.errors import RemoteRegistryError
from registry.lan import LanEndpoint
from registry.records import NodeRecord
from registry.server import Limits, RegistryServer, TurnConfig
from tests.registry.conftest import NOW, Clock, make_record

ALICE = Identity(bytes([11]) * 32)  # honest sender
BOB = Identity(bytes([12]) * 32)  # honest recipient
CAROL = Identity(bytes([13]) * 32)  # the canary
MALLORY = Identity(bytes([66]) * 32)
BIG = 60 * 1024  # a large but legal sealed message
HEADER_TIMEOUT = 10.0  # the registry's default


async def _serve(
    tmp_path: Path, clock: Clock, limits: Limits | None = None, turn: TurnConfig | None = None
) -> AsyncIterator[RegistryServer]:
    server = RegistryServer(
        tmp_path / "registry.db", clock=clock, limits=limits or Limits(), turn=turn
    )
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def registry(tmp_path: Path, clock: Clock) -> AsyncIterator[RegistryServer]:
    async for server in _serve(tmp_path, clock):
        yield server


async def _publish(url: str, *identities: Identity) -> None:
    async with RegistryClient(url) as client:
        for identity in identities:
            await client.publish(make_record(identity, now=NOW))


async def _send_until_refused(
    conn: RegistryConnection, clock: Clock, targets: list[Identity], data: bytes, most: int
) -> tuple[int, str]:
    """Send round-robin until the registry refuses; (messages stored, refusal)."""
    for i in range(most):
        if i % 100 == 99:
            clock.now += 10  # the relay rate limit is not what this test is about
        try:
            await conn.send(targets[i % len(targets)].node_id, data)
        except RemoteRegistryError as exc:
            return i, exc.error
    return most, ""


# -- issue 13 item 7: the registry's disk -----------------------------------------------


async def test_one_sender_cannot_fill_a_victims_mailbox(
    registry: RegistryServer, clock: Clock
) -> None:
    await _publish(registry.url, BOB)
    async with RegistryClient(registry.url, MALLORY) as m, m.connect() as mallory:
        stored, refusal = await _send_until_refused(mallory, clock, [BOB], b"spam", 300)
    assert refusal == "your share of the recipient's mailbox is full"
    assert stored == 256 // 8
    # The canary: Bob's mailbox still takes a stranger's honest message.
    async with RegistryClient(registry.url, ALICE) as a, a.connect() as alice:
        assert await alice.send(BOB.node_id, b"consult request") == "stored"


async def test_mail_for_a_node_the_registry_does_not_know_is_refused(
    registry: RegistryServer, clock: Clock
) -> None:
    await _publish(registry.url, BOB)
    nobody = Identity(os.urandom(32))
    async with RegistryClient(registry.url, MALLORY) as m, m.connect() as mallory:
        with pytest.raises(RemoteRegistryError, match="only for nodes with a current record"):
            await mallory.send(nobody.node_id, b"x" * BIG)
        assert await mallory.send(BOB.node_id, b"canary") == "stored"
    assert registry.db.mailbox_total == len(b"canary")


async def test_one_identity_cannot_grow_the_database_without_bound(
    registry: RegistryServer, clock: Clock
) -> None:
    victims = [Identity(bytes([100 + i]) * 32) for i in range(19)]
    await _publish(registry.url, BOB, *victims)
    async with RegistryClient(registry.url, MALLORY) as m, m.connect() as mallory:
        stored, refusal = await _send_until_refused(mallory, clock, victims, b"x" * BIG, 400)
    assert refusal == "you have too much mail waiting in this registry"
    assert stored * BIG <= 16 * 1024 * 1024
    assert registry.db.mailbox_total <= 16 * 1024 * 1024
    async with RegistryClient(registry.url, ALICE) as a, a.connect() as alice:
        assert await alice.send(victims[0].node_id, b"canary") == "stored"


# -- issue 13 item 8: the registry's sockets and relay ----------------------------------


async def _authenticated(
    session: aiohttp.ClientSession, url: str, identity: Identity
) -> aiohttp.ClientWebSocketResponse:
    """A signaling socket that has authenticated and will read nothing more."""
    ws = await session.ws_connect(url + "/v1/ws", heartbeat=None, autoping=False)
    challenge = wsproto.from_wire((await ws.receive(timeout=5)).data)
    assert isinstance(challenge, wsproto.Challenge)
    await ws.send_bytes(wsproto.to_wire(wsproto.sign_challenge(identity, challenge.challenge, url)))
    ready = wsproto.from_wire((await ws.receive(timeout=5)).data)
    assert isinstance(ready, wsproto.Ready)
    return ws


async def test_one_address_cannot_take_every_signaling_slot(tmp_path: Path, clock: Clock) -> None:
    async for server in _serve(tmp_path, clock, limits=Limits(max_connections=40)):
        # Mallory's address (127.0.0.2 is loopback too) opens a socket per self-made key.
        attacker = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0), limit=0)
        held: list[aiohttp.ClientWebSocketResponse] = []
        refused = 0
        async with aiohttp.ClientSession(connector=attacker) as session:
            for i in range(45):
                try:
                    held.append(await _authenticated(session, server.url, Identity.generate()))
                except (aiohttp.ClientError, AssertionError, TimeoutError):
                    refused += 1
                if i % 10 == 9:
                    clock.now += 1
            # The canary: an honest node on another address still gets a socket and relays.
            async with (
                RegistryClient(server.url, ALICE) as a,
                RegistryClient(server.url, CAROL) as c,
                a.connect(connect_timeout=5) as alice,
                c.connect(connect_timeout=5) as carol,
            ):
                assert await alice.send(CAROL.node_id, b"canary") == "delivered"
                async with asyncio.timeout(5):
                    assert (await carol.receive()).data == b"canary"
            assert len(held) == 32  # the default per-address cap
            assert refused == 45 - 32
            for ws in held:
                await ws.close()


async def test_a_connection_that_never_finishes_its_headers_is_closed(
    registry: RegistryServer,
) -> None:
    host, port = registry.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET /v1/health HTTP/1.1\r\nHost: registry\r\n")  # and never the end
        await writer.drain()
        async with asyncio.timeout(HEADER_TIMEOUT + 5):
            assert await reader.read() == b""  # closed by the registry, no answer
    finally:
        writer.close()
    # The canary on the same server: a complete request is answered.
    async with RegistryClient(registry.url) as client:
        assert (await client.health())["status"] == "ok"


async def test_a_reader_that_stops_reading_is_dropped_not_its_sender(
    registry: RegistryServer, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="registry.netguard")
    slow_id = Identity(bytes([77]) * 32)
    await _publish(registry.url, slow_id, CAROL)
    async with aiohttp.ClientSession() as session:
        slow = await _authenticated(session, registry.url, slow_id)  # never reads again
        async with (
            RegistryClient(registry.url, ALICE) as a,
            RegistryClient(registry.url, CAROL) as c,
            a.connect(connect_timeout=5) as alice,
            c.connect() as carol,
        ):
            canaries = 0
            refusals: list[str] = []
            for i in range(800):
                if i % 100 == 99:
                    clock.now += 10
                if slow_id.node_id not in registry.connections:
                    break
                try:
                    status = await alice.send(slow_id.node_id, bytes([i % 256]) * BIG)
                    assert status in ("delivered", "stored")
                except RemoteRegistryError as exc:  # once dropped, its mailbox quota applies
                    refusals.append(exc.error)
                if i % 20 == 0:
                    await alice.send(CAROL.node_id, b"canary %d" % canaries)
                    canaries += 1
            assert slow_id.node_id not in registry.connections, "the slow reader was kept"
            assert all("mailbox is full" in r for r in refusals)
            await alice.send(CAROL.node_id, b"canary %d" % canaries)
            async with asyncio.timeout(10):
                got = [(await carol.receive()).data for _ in range(canaries + 1)]
            assert got == [b"canary %d" % n for n in range(canaries + 1)]
            assert alice.connects == 1  # the sender kept its connection throughout
        await slow.close()
    assert any("its reader is too slow" in r.getMessage() for r in caplog.records)
    assert registry.db.mailbox_count(slow_id.node_id, NOW) > 0  # nothing it missed is lost


# The node's LAN endpoint is the same kind of aiohttp server, open to the whole LAN.


@pytest.fixture
async def lan_endpoint(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[LanEndpoint]:
    monkeypatch.setattr(lan, "HEADER_TIMEOUT", 1.0, raising=False)
    record = NodeRecord.create(BOB, now=int(time.time()), sequence=1)

    async def ignore(sealed: bytes) -> None:
        return None

    endpoint = LanEndpoint(lambda: record, ignore)
    await endpoint.start("127.0.0.1", 0)
    yield endpoint
    await endpoint.stop()


async def test_lan_endpoint_closes_a_connection_that_never_finishes_its_headers(
    lan_endpoint: LanEndpoint,
) -> None:
    host, port = lan_endpoint.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET /v1/record HTTP/1.1\r\nHost: node\r\n")
        await writer.drain()
        async with asyncio.timeout(6):
            assert await reader.read() == b""
    finally:
        writer.close()
    record = await lan.fetch_record(lan_endpoint.url, int(time.time()), BOB.node_id)
    assert record.node_id == BOB.node_id  # the canary


async def test_lan_endpoint_caps_sockets_per_address(lan_endpoint: LanEndpoint) -> None:
    host, port = lan_endpoint.url.removeprefix("http://").split(":")
    held = []
    try:
        for _ in range(16):  # idle sockets from one address, up to its cap
            held.append(await asyncio.open_connection(host, int(port), local_addr=("127.0.0.2", 0)))
        reader, writer = await asyncio.open_connection(host, int(port), local_addr=("127.0.0.2", 0))
        held.append((reader, writer))
        async with asyncio.timeout(0.9):  # before the header timeout could explain it
            assert await reader.read() == b""
        record = await lan.fetch_record(lan_endpoint.url, int(time.time()), BOB.node_id)
        assert record.node_id == BOB.node_id  # another address is still served
    finally:
        for _, w in held:
            w.close()


# -- issue 13 item 9: TURN credentials --------------------------------------------------

TURN = TurnConfig("s3cret", ("turn:127.0.0.1:3478",), ttl=600)


@pytest.fixture
async def turn_registry(tmp_path: Path, clock: Clock) -> AsyncIterator[RegistryServer]:
    async for server in _serve(tmp_path, clock, turn=TURN):
        yield server


async def test_turn_credentials_are_not_minted_for_a_self_made_key(
    turn_registry: RegistryServer,
) -> None:
    async with RegistryClient(turn_registry.url, MALLORY) as m:
        with pytest.raises(RemoteRegistryError, match="only for nodes with a current record"):
            await m.turn_credentials()
    await _publish(turn_registry.url, ALICE)
    async with RegistryClient(turn_registry.url, ALICE) as a:
        creds = await a.turn_credentials()  # the canary: a known node gets them
    assert creds.username.endswith(str(ALICE.node_id))


async def test_turn_credentials_are_rate_limited_per_node(
    turn_registry: RegistryServer, clock: Clock
) -> None:
    await _publish(turn_registry.url, ALICE)
    async with RegistryClient(turn_registry.url, ALICE) as a, a.connect() as alice:
        for _ in range(5):
            await alice.turn_credentials()
        with pytest.raises(RemoteRegistryError, match="too often"):
            await alice.turn_credentials()
        clock.now += 61
        assert (await alice.turn_credentials()).ttl == 600


def test_turn_credentials_are_short_lived() -> None:
    assert TurnConfig("s", ("turn:127.0.0.1:3478",)).ttl <= 3600
    with pytest.raises(ValueError, match="lifetime"):
        TurnConfig("s", ("turn:127.0.0.1:3478",), ttl=30 * 24 * 3600)


# A search's filters are a stranger's text: LIKE wildcards, the tag separator and SQL
# quoting in them match nothing but themselves, in either store's dialect.
HOSTILE_FILTERS = ("ne_ro", "neur%", "%", "_", "\\", "neuro|fr", "|", "' OR '1'='1", "neuro' --")


@pytest.mark.parametrize("value", HOSTILE_FILTERS)
def test_a_search_filter_is_never_a_pattern_or_sql(tmp_path: Path, value: str) -> None:
    from registry.store import RegistryDB, search_sql

    for postgres in (False, True):
        sql, _ = search_sql(NOW, {"subspecialty": value, "language": value}, postgres=postgres)
        benign, _ = search_sql(NOW, {"subspecialty": "x", "language": "x"}, postgres=postgres)
        assert sql == benign  # the value changes a parameter, never the statement
    db = RegistryDB(tmp_path / "registry.db")
    try:
        honest = Identity.generate()
        db.put(make_record(honest, subs=("neuro",), lang=("fr",)), NOW)
        assert len(db.search(NOW, subspecialty="neuro")) == 1  # canary: the record is found
        assert db.search(NOW, subspecialty=value) == []
        assert db.search(NOW, language=value) == []
        assert db.search(NOW, jurisdiction=value) == []
    finally:
        db.close()
