"""The registry's quotas, caps and timeouts one by one (tests/adversary/test_registry.py
has the attacks; these pin each limit's edge and its recovery)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from crypto.identity import Identity
from registry import wsproto
from registry.client import RegistryClient
from registry.errors import RemoteRegistryError, StaleRecord
from registry.limits import MailboxQuota, MailboxUsage, address_key
from registry.records import NodeRecord
from registry.server import Limits, RegistryServer, TurnConfig
from tests.certs import certificate
from tests.registry.conftest import NOW, Clock, make_record

ALICE = Identity(bytes([31]) * 32)
BOB = Identity(bytes([32]) * 32)
ORG = Identity(bytes([33]) * 32)


MakeServer = Callable[..., Awaitable[RegistryServer]]


@pytest.fixture
async def make_server(tmp_path: Path, clock: Clock) -> AsyncIterator[MakeServer]:
    servers: list[RegistryServer] = []

    async def make(limits: Limits | None = None, turn: TurnConfig | None = None) -> RegistryServer:
        server = RegistryServer(
            tmp_path / f"r{len(servers)}.db", clock=clock, limits=limits or Limits(), turn=turn
        )
        await server.start("127.0.0.1", 0)
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop()


def _usage(**kwargs: int) -> MailboxUsage:
    fields = dict.fromkeys(MailboxUsage.__dataclass_fields__, 0)
    return MailboxUsage(**(fields | kwargs))


def test_mailbox_quota_refusals_name_the_quota() -> None:
    quota = MailboxQuota(
        recipient_messages=8, recipient_bytes=800, share=4, sender_messages=20, total_bytes=10_000
    )
    assert quota.refusal(_usage(), 100) is None
    assert quota.refusal(_usage(recipient_messages=8), 1) == "recipient's mailbox is full"
    assert quota.refusal(_usage(recipient_bytes=750), 100) == "recipient's mailbox is full"
    assert "your share" in (quota.refusal(_usage(pair_messages=2), 1) or "")
    assert "your share" in (quota.refusal(_usage(pair_bytes=150), 100) or "")
    assert "too much mail" in (quota.refusal(_usage(sender_messages=20), 1) or "")
    assert "storage is full" in (quota.refusal(_usage(total_bytes=9_950), 100) or "")


async def test_global_mailbox_bytes_cap(make_server: MakeServer, clock: Clock) -> None:
    limits = Limits(mailbox=MailboxQuota(total_bytes=1000))
    server = await make_server(limits)
    async with RegistryClient(server.url) as c:
        await c.publish(make_record(BOB))
    async with RegistryClient(server.url, ALICE) as a, a.connect() as alice:
        assert await alice.send(BOB.node_id, b"x" * 600) == "stored"
        with pytest.raises(RemoteRegistryError, match="storage is full"):
            await alice.send(BOB.node_id, b"x" * 600)
        assert await alice.send(BOB.node_id, b"x" * 300) == "stored"


async def test_mail_waits_for_a_node_offline_within_the_grace_period_only(
    make_server: MakeServer, clock: Clock
) -> None:
    server = await make_server(Limits(mail_record_grace=3600))
    async with RegistryClient(server.url) as c:
        await c.publish(make_record(BOB, ttl=600))
    async with RegistryClient(server.url, ALICE) as a, a.connect() as alice:
        clock.now = NOW + 600 + 3000  # record expired 50 minutes ago
        assert await alice.send(BOB.node_id, b"while away") == "stored"
        server.db.purge(int(clock.now), 3600)
        clock.now = NOW + 600 + 3601
        server.db.purge(int(clock.now), 3600)
        with pytest.raises(RemoteRegistryError, match="current record"):
            await alice.send(BOB.node_id, b"gone for good")


async def test_an_expired_record_kept_for_mail_still_holds_its_sequence(
    make_server: MakeServer, clock: Clock
) -> None:
    server = await make_server()
    async with RegistryClient(server.url) as c:
        await c.publish(make_record(BOB, seq=5, ttl=600))
        clock.now = NOW + 700
        with pytest.raises(StaleRecord) as info:
            await c.publish(make_record(BOB, seq=4, now=NOW + 700))
        assert info.value.held == 5  # proved by Bob's own signed record
        await c.publish(make_record(BOB, seq=6, now=NOW + 700))


async def test_new_nodes_per_address_and_records_in_all_are_capped(
    make_server: MakeServer, clock: Clock
) -> None:
    limits = Limits(new_record_burst=3, new_record_rate=0.1, max_records=4)
    server = await make_server(limits)
    nodes = [Identity(bytes([40 + i]) * 32) for i in range(5)]
    async with RegistryClient(server.url) as c:
        for identity in nodes[:3]:
            await c.publish(make_record(identity))
        with pytest.raises(RemoteRegistryError) as info:
            await c.publish(make_record(nodes[3]))
        assert info.value.status == 429
        await c.publish(make_record(nodes[0], seq=2))  # a known node is never held back
        clock.now += 10
        await c.publish(make_record(nodes[3]))
        clock.now += 10
        with pytest.raises(RemoteRegistryError) as info:
            await c.publish(make_record(nodes[4], now=int(clock.now)))
        assert info.value.status == 507


async def test_idle_keep_alive_connection_is_closed(make_server: MakeServer) -> None:
    server = await make_server(Limits(idle_timeout=0.5))
    host, port = server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET /v1/health HTTP/1.1\r\nHost: r\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(5):
            assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
            while await reader.read(4096):  # the answer, then the close
                pass
    finally:
        writer.close()


async def test_a_record_body_that_trickles_is_cut_off(make_server: MakeServer) -> None:
    server = await make_server(Limits(body_timeout=0.5))
    host, port = server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            b"POST /v1/records HTTP/1.1\r\nHost: r\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10
        )
        await writer.drain()
        async with asyncio.timeout(5):
            assert b" 408 " in await reader.readuntil(b"\r\n")
    finally:
        writer.close()


async def test_connects_per_address_are_rate_limited(make_server: MakeServer, clock: Clock) -> None:
    server = await make_server(Limits(connect_rate=1, connect_burst=3))
    host, port = server.url.removeprefix("http://").split(":")
    results = []
    for _ in range(4):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /v1/health HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(5):
            results.append((await reader.read(12)).startswith(b"HTTP/1.1 200"))
        writer.close()
    assert results == [True, True, True, False]
    clock.now += 1
    async with RegistryClient(server.url) as c:
        assert (await c.health())["status"] == "ok"


async def test_a_write_that_stalls_drops_the_reader(make_server: MakeServer, clock: Clock) -> None:
    # A queue too long to fill: only the write timeout can drop this reader.
    limits = Limits(
        send_queue=100_000, send_timeout=0.5, send_burst=10_000, address_send_burst=10_000
    )
    server = await make_server(limits)
    slow_id = Identity(bytes([50]) * 32)
    async with RegistryClient(server.url) as c:
        await c.publish(make_record(slow_id))
    async with aiohttp.ClientSession() as session:
        slow = await session.ws_connect(server.url + "/v1/ws", heartbeat=None, autoping=False)
        challenge = wsproto.from_wire((await slow.receive(timeout=5)).data)
        assert isinstance(challenge, wsproto.Challenge)
        auth = wsproto.sign_challenge(slow_id, challenge.challenge, server.url)
        await slow.send_bytes(wsproto.to_wire(auth))
        assert isinstance(wsproto.from_wire((await slow.receive(timeout=5)).data), wsproto.Ready)
        async with RegistryClient(server.url, ALICE) as a, a.connect() as alice:
            for i in range(2000):
                if slow_id.node_id not in server.connections:
                    break
                await alice.send(slow_id.node_id, bytes([i % 256]) * 60_000)
                if i % 100 == 99:
                    await asyncio.sleep(0.1)
            assert slow_id.node_id not in server.connections
            assert alice.connects == 1
        await slow.close()


def _certified(node: Identity, org: Identity) -> NodeRecord:
    cert = certificate(org, node, NOW)
    return NodeRecord.create(node, now=NOW, sequence=1, org_certificate=cert)


async def test_turn_can_be_kept_for_member_organisations(make_server: MakeServer) -> None:
    turn = TurnConfig("s", ("turn:127.0.0.1:3478",), trusted_orgs=frozenset({ORG.public_key}))
    server = await make_server(turn=turn)
    outsider = Identity(bytes([34]) * 32)
    async with RegistryClient(server.url) as c:
        await c.publish(_certified(ALICE, ORG))
        await c.publish(_certified(outsider, Identity(bytes([35]) * 32)))
        await c.publish(make_record(BOB))
    for who in (outsider, BOB):
        async with RegistryClient(server.url, who) as client:
            with pytest.raises(RemoteRegistryError, match="member organisations only"):
                await client.turn_credentials()
    async with RegistryClient(server.url, ALICE) as client:
        assert (await client.turn_credentials()).username.endswith(str(ALICE.node_id))


def test_address_keys_group_an_ipv6_host_by_its_64() -> None:
    assert address_key("192.0.2.7") == "192.0.2.7"
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::9")
    assert address_key("2001:db8:1:2::1") != address_key("2001:db8:1:3::1")
    assert address_key(None) == "?"


def _from(url: str, identity: Identity, local: str) -> RegistryClient:
    client = RegistryClient(url, identity)
    client._session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(local_addr=(local, 0)),
        timeout=aiohttp.ClientTimeout(total=10),
    )
    return client


async def test_many_identities_from_one_address_share_its_mailbox_quota(
    make_server: MakeServer, clock: Clock
) -> None:
    quota = MailboxQuota(sender_bytes=2000, origin_bytes=5000, share=1)
    server = await make_server(Limits(mailbox=quota))
    async with RegistryClient(server.url) as c:
        await c.publish(make_record(BOB))
    refusals = []
    for i in range(5):  # a fresh key each time: keys are free
        identity = Identity(bytes([60 + i]) * 32)
        async with _from(server.url, identity, "127.0.0.2") as m, m.connect() as mallory:
            for _ in range(2):
                try:
                    await mallory.send(BOB.node_id, b"x" * 1000)
                except RemoteRegistryError as exc:
                    refusals.append(exc.error)
    assert refusals
    assert all("your address" in r for r in refusals)
    assert server.db.mailbox_total <= 5000
    async with RegistryClient(server.url, ALICE) as a, a.connect() as alice:
        assert await alice.send(BOB.node_id, b"y" * 1000) == "stored"  # another address


async def test_identities_from_one_address_share_its_relay_rate(
    make_server: MakeServer, clock: Clock
) -> None:
    server = await make_server(Limits(address_send_rate=1, address_send_burst=3))
    async with RegistryClient(server.url) as c:
        await c.publish(make_record(BOB))
    one, two = Identity(bytes([70]) * 32), Identity(bytes([71]) * 32)
    async with (
        _from(server.url, one, "127.0.0.2") as a,
        _from(server.url, two, "127.0.0.2") as b,
        a.connect() as first,
        b.connect() as second,
    ):
        assert await first.send(BOB.node_id, b"1") == "stored"
        assert await second.send(BOB.node_id, b"2") == "stored"
        assert await second.send(BOB.node_id, b"3") == "stored"
        with pytest.raises(RemoteRegistryError, match="too fast"):
            await first.send(BOB.node_id, b"4")
    async with RegistryClient(server.url, ALICE) as c, c.connect() as alice:
        assert await alice.send(BOB.node_id, b"canary") == "stored"
