"""Several registry instances on one real PostgreSQL: relay, mailbox, search and limits
hold across instances; the SQLite store behaves the same for a single instance."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from crypto.identity import Identity, NodeId
from node.core.children import die_with_parent
from registry.client import RegistryClient, RegistryConnection, SearchQuery
from registry.errors import RemoteRegistryError, StaleRecord
from registry.limits import MailboxQuota
from registry.pgstore import migrations
from registry.server import Limits, RegistryServer, TurnConfig, open_store
from registry.storage import MailOffer, RegistryStore, SqliteStore
from registry.store import Stored
from tests.registry.conftest import NOW, Clock, make_record
from tests.registry.postgres import postgres_cluster

ALICE, BOB, CAROL = Identity.generate(), Identity.generate(), Identity.generate()
FAST = Limits(address_rate=1e6, address_burst=1e6, publish_burst=1e6, new_record_burst=1e6)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[str]:
    with postgres_cluster() as url:
        yield url


@pytest.fixture
async def pg_url(pg_cluster: str) -> str:
    """A fresh database for each test in the session's cluster."""
    return await new_database(pg_cluster)


async def new_database(pg_cluster: str) -> str:
    import asyncpg

    name = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(f"{pg_cluster}/postgres")
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return f"{pg_cluster}/{name}"


@contextlib.asynccontextmanager
async def instances(
    db: str, count: int = 2, *, clock: Clock | None = None, **options: object
) -> AsyncIterator[list[RegistryServer]]:
    """``count`` registry servers on 127.0.0.1 sharing ``db``."""
    servers = []
    try:
        for _ in range(count):
            server = RegistryServer(db, clock=clock or Clock(), poll_interval=0.2, **options)  # type: ignore[arg-type]
            await server.start("127.0.0.1", 0)
            servers.append(server)
        yield servers
    finally:
        for server in servers:
            await server.stop()


async def connected(url: str, identity: Identity) -> RegistryConnection:
    conn = RegistryClient(url, identity).connect(max_backoff=0.5)
    return await conn.__aenter__()


async def closed(conn: RegistryConnection) -> None:
    await conn.close()
    await conn.client.close()


async def wait_for(predicate: object, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# The storage contract, on both implementations --------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RegistryStore]:
    if request.param == "sqlite":
        opened: RegistryStore = SqliteStore(tmp_path / "r.db")
    else:
        opened = open_store(await new_database(request.getfixturevalue("pg_cluster")))
    await opened.open()
    yield opened
    await opened.close()


async def test_both_stores_keep_records_search_and_mail_alike(store: RegistryStore) -> None:
    neuro = make_record(ALICE, seq=2, subs=("neuro", "msk"))
    chest = make_record(BOB, subs=("chest",), lang=("de",))
    await store.put(neuro, NOW)
    await store.put(chest, NOW)
    with pytest.raises(StaleRecord):
        await store.put(make_record(ALICE, seq=1), NOW)
    assert await store.get_wire(ALICE.node_id, NOW) == neuro.to_wire()
    assert await store.get_wire(ALICE.node_id, NOW + 7200) is None  # expired
    assert await store.known_since(ALICE.node_id, -1)
    assert await store.record_count() == 2
    assert await store.count(NOW) == 2
    assert await store.search(NOW, subspecialty="neuro") == [neuro.to_wire()]
    assert await store.search(NOW, subspecialty="neur") == []  # whole tags only
    assert await store.search(NOW, subspecialty="%") == []
    assert await store.search(NOW, language="de") == [chest.to_wire()]
    everyone = sorted([neuro, chest], key=lambda r: str(r.node_id))
    page = await store.search(NOW, limit=1)
    assert page == [everyone[0].to_wire()]
    after = str(everyone[0].node_id)
    assert await store.search(NOW, after=after) == [everyone[1].to_wire()]

    quota = MailboxQuota(recipient_messages=2, share=1)
    offer = MailOffer(BOB.node_id, ALICE.node_id, b"hello", NOW, 60, "10.0.0.1", quota, NOW)
    first, refused = await store.mailbox_offer(offer)
    assert refused is None
    assert first > 0
    second, _ = await store.mailbox_offer(offer)
    assert (await store.mailbox_offer(offer))[1] == "recipient's mailbox is full"
    unknown = MailOffer(CAROL.node_id, ALICE.node_id, b"x", NOW, 60, "", quota, NOW)
    assert "no" in str((await store.mailbox_offer(unknown))[1])  # no record: no mail kept
    assert [m.id for m in await store.mailbox_peek(BOB.node_id, NOW)] == [first, second]
    await store.mailbox_delete([first])
    assert [m.data for m in await store.mailbox_peek(BOB.node_id, NOW)] == [b"hello"]
    assert await store.purge(NOW + 61) == 1  # the message expired

    assert [await store.rate_allow("turn", "n", 1 / 60, 2, NOW) for _ in range(3)] == [
        True,
        True,
        False,
    ]
    assert await store.rate_allow("turn", "n", 1 / 60, 2, NOW + 61)  # refilled one
    assert await store.turn_issued(ALICE.node_id, NOW) == 1
    assert await store.turn_issued(ALICE.node_id, NOW) == 2


async def test_migrations_apply_once_when_instances_start_together(pg_url: str) -> None:
    import asyncpg

    stores = [open_store(pg_url) for _ in range(3)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        conn = await asyncpg.connect(pg_url)
        try:
            versions = [
                r["version"] for r in await conn.fetch("SELECT version FROM schema_version")
            ]
        finally:
            await conn.close()
        assert sorted(versions) == [m[0] for m in migrations()]
    finally:
        await asyncio.gather(*(s.close() for s in stores))


# Several instances, in this process ---------------------------------------------------------


async def test_a_signal_sent_through_one_instance_reaches_a_node_on_another(pg_url: str) -> None:
    async with instances(pg_url, limits=FAST) as (a, b):
        bob = await connected(b.url, BOB)
        alice = await connected(a.url, ALICE)
        try:
            for n in range(20):
                assert await alice.send(BOB.node_id, b"offer %d" % n) == "delivered"
            async with asyncio.timeout(10):
                got = [(await bob.receive()) for _ in range(20)]
            assert [d.data for d in got] == [b"offer %d" % n for n in range(20)]  # in order
            assert {d.sender for d in got} == {ALICE.node_id}
            # And back, through the other instance.
            assert await bob.send(ALICE.node_id, b"answer") == "delivered"
            async with asyncio.timeout(10):
                assert (await alice.receive()).data == b"answer"
            await wait_for(lambda: not b.store.shared or not b._inflight.get(BOB.node_id))
        finally:
            await closed(alice)
            await closed(bob)


async def test_mail_written_through_one_instance_is_delivered_by_the_other(
    pg_url: str, clock: Clock
) -> None:
    async with instances(pg_url, clock=clock, limits=FAST) as (a, b):
        async with RegistryClient(b.url) as client:
            await client.publish(make_record(BOB))  # Bob was here before
        alice = await connected(a.url, ALICE)
        try:
            assert await alice.send(BOB.node_id, b"consult request") == "stored"
            assert await alice.send(BOB.node_id, b"second") == "stored"
            bob = await connected(b.url, BOB)
            try:
                async with asyncio.timeout(10):
                    got = [(await bob.receive()).data for _ in range(2)]
                assert got == [b"consult request", b"second"]
            finally:
                await closed(bob)
            # Delivered once: the mailbox is empty afterwards.
            await wait_for(lambda: True)
            for _ in range(100):
                if not await a.store.mailbox_peek(BOB.node_id, int(clock.now)):
                    break
                await asyncio.sleep(0.05)
            assert await a.store.mailbox_peek(BOB.node_id, int(clock.now)) == []
        finally:
            await closed(alice)


async def test_mail_announced_while_its_recipient_connects_is_not_lost(
    pg_url: str, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The notification of a message may reach an instance while the recipient is still
    connecting there: nothing may go out before Ready (the client would drop the socket
    with the message written to it, and the registry would delete it as delivered)."""
    async with instances(pg_url, clock=clock, limits=FAST) as (a, b):
        async with RegistryClient(a.url) as client:
            await client.publish(make_record(BOB))
        alice = await connected(a.url, ALICE)
        try:
            assert await alice.send(BOB.node_id, b"stored before Bob connects") == "stored"
        finally:
            await closed(alice)
        peek = b.store.mailbox_peek

        async def late_notification(recipient: NodeId, now: int, limit: int = 1000) -> list[Stored]:
            found = await peek(recipient, now, limit)
            for stored in found:  # the NOTIFY of each arrives just now
                b._mail_arrived(recipient, stored.id, stored)
            return found

        monkeypatch.setattr(b.store, "mailbox_peek", late_notification)
        bob = await connected(b.url, BOB)
        try:
            async with asyncio.timeout(10):
                assert (await bob.receive()).data == b"stored before Bob connects"
            assert bob.connects == 1
        finally:
            await closed(bob)


async def test_records_published_to_one_instance_are_found_through_the_other(
    pg_url: str, clock: Clock
) -> None:
    async with (
        instances(pg_url, clock=clock, limits=FAST) as (a, b),
        RegistryClient(a.url) as ca,
        RegistryClient(b.url) as cb,
    ):
        await ca.publish(make_record(ALICE, subs=("neuro",)))
        await cb.publish(make_record(BOB, subs=("msk",)))
        found = await cb.lookup(ALICE.node_id, NOW)
        assert found is not None
        assert found.node_id == ALICE.node_id
        hits = await ca.search(SearchQuery(subspecialty="msk"), now=NOW)
        assert [r.node_id for r in hits] == [BOB.node_id]
        # A replayed older record is refused by either instance.
        await cb.publish(make_record(ALICE, seq=5))
        with pytest.raises(StaleRecord):
            await ca.publish(make_record(ALICE, seq=4))


async def test_mailbox_quotas_are_counted_across_instances(pg_url: str, clock: Clock) -> None:
    limits = Limits(
        address_rate=1e6,
        address_burst=1e6,
        publish_burst=1e6,
        mailbox=MailboxQuota(recipient_messages=4, share=1),
    )
    async with instances(pg_url, clock=clock, limits=limits) as (a, b):
        async with RegistryClient(a.url) as client:
            await client.publish(make_record(BOB))
        alice, carol = await connected(a.url, ALICE), await connected(b.url, CAROL)
        try:
            assert await alice.send(BOB.node_id, b"1") == "stored"
            assert await alice.send(BOB.node_id, b"2") == "stored"
            assert await carol.send(BOB.node_id, b"3") == "stored"
            assert await carol.send(BOB.node_id, b"4") == "stored"
            # Instance b has stored only two: the quota counts the four in the database.
            with pytest.raises(RemoteRegistryError, match="mailbox is full"):
                await carol.send(BOB.node_id, b"5")
        finally:
            await closed(alice)
            await closed(carol)


async def test_turn_and_publish_rates_are_shared_by_instances(pg_url: str, clock: Clock) -> None:
    turn = TurnConfig("secret", ("turn:127.0.0.1:3478",))
    limits = Limits(
        address_rate=1e6,
        address_burst=1e6,
        publish_burst=2,
        new_record_burst=1e6,
        turn_burst=2,
        turn_rate=1 / 3600,
    )
    async with instances(pg_url, clock=clock, limits=limits, turn=turn) as (a, b):
        async with RegistryClient(a.url) as ca, RegistryClient(b.url) as cb:
            await ca.publish(make_record(BOB, seq=1, ttl=86400))
            await ca.publish(make_record(BOB, seq=2, ttl=86400))
            with pytest.raises(RemoteRegistryError, match="publishes too often"):
                await cb.publish(make_record(BOB, seq=3))
        on_a = await connected(a.url, BOB)
        try:
            await on_a.turn_credentials()
            await on_a.turn_credentials()
        finally:
            await closed(on_a)
        on_b = await connected(b.url, BOB)
        try:
            with pytest.raises(RemoteRegistryError, match="too often"):
                await on_b.turn_credentials()
            clock.now += 3600  # one token back, for either instance
            assert (await on_b.turn_credentials()).username.endswith(str(BOB.node_id))
        finally:
            await closed(on_b)


async def test_a_node_keeps_one_socket_across_instances(pg_url: str) -> None:
    """The same key on two instances: the older socket is told (through the other
    instance's notification) and stops reconnecting; the newer keeps the node."""
    async with instances(pg_url, limits=FAST) as (a, b):
        first = RegistryClient(a.url, BOB).connect(max_backoff=0.1)
        await first.__aenter__()
        try:
            await wait_for(lambda: BOB.node_id in a.connections)
            second = await connected(b.url, BOB)
            try:
                async with asyncio.timeout(10):
                    await first._task  # type: ignore[misc]  # it ends: nothing reconnects
                assert "another process is connected" in first.stopped
                assert (first.connects, a.replaced, b.replaced) == (1, 1, 0)
                await wait_for(lambda: BOB.node_id not in a.connections)
                alice = await connected(a.url, ALICE)
                try:
                    assert await alice.send(BOB.node_id, b"canary") == "delivered"
                    async with asyncio.timeout(10):
                        assert (await second.receive()).data == b"canary"
                finally:
                    await closed(alice)
                # BOB authenticated once on each instance: the older came back no more.
                assert (a.accepted, b.accepted) == (2, 1)  # a: first, then alice
                assert (second.connects, second.stopped) == (1, "")
            finally:
                await closed(second)
        finally:
            await closed(first)


async def test_a_stale_kick_does_not_stop_a_node_that_came_back(pg_url: str) -> None:
    """A kick about a socket on another instance arrives after the node came back here
    (the presence table names this instance): its socket here is the newest and stays."""
    async with instances(pg_url, limits=FAST) as (a, _b):
        conn = await connected(a.url, BOB)
        try:
            a._taken_elsewhere(BOB.node_id, "another-instance")
            await asyncio.gather(*a._background)  # the presence check, done
            assert (a.replaced, conn.stopped) == (0, "")
            async with RegistryClient(a.url, ALICE) as client, client.connect() as alice:
                assert await alice.send(BOB.node_id, b"canary") == "delivered"
            async with asyncio.timeout(10):
                assert (await conn.receive()).data == b"canary"
            assert conn.connects == 1
        finally:
            await closed(conn)


# Registry processes ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def registry_process(db: str) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    """`radmesh registry run --db postgresql://…` in its own process; yields (url, process)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "node.cli", "registry", "run", "--db", db, "--port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        preexec_fn=die_with_parent(),
    )  # fmt: skip
    try:
        assert process.stdout is not None
        async with asyncio.timeout(30):
            while b"listening on" not in (line := await process.stdout.readline()):
                assert line, "the registry process exited at start"
        text = line.decode()
        assert "***" in text or "@" not in text.split("database", 1)[1]  # no password shown
        yield text.split("listening on ", 1)[1].split()[0], process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
            try:
                async with asyncio.timeout(15):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


async def test_an_instance_killed_mid_relay_loses_nothing_acknowledged(pg_url: str) -> None:
    async with registry_process(pg_url) as (url_a, _), registry_process(pg_url) as (url_b, b):
        async with RegistryClient(url_a) as client:
            await client.publish(make_record(BOB, now=int(time.time())))
        bob = await connected(url_b, BOB)
        alice = await connected(url_a, ALICE)
        received: list[bytes] = []

        async def collect(conn: RegistryConnection) -> None:
            while True:
                received.append((await conn.receive()).data)

        collector = asyncio.create_task(collect(bob))
        acked: list[bytes] = []
        try:
            for n in range(30):  # under one sender's share of a mailbox (32), all stored or not
                if n == 10:
                    os.kill(b.pid, signal.SIGKILL)  # instance b dies with messages in flight
                message = b"signal %d" % n
                assert await alice.send(BOB.node_id, message) in ("delivered", "stored")
                acked.append(message)
            await closed(bob)
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector
            bob = await connected(url_a, BOB)  # Bob comes back through the other instance
            collector = asyncio.create_task(collect(bob))
            await wait_for(lambda: set(acked) <= set(received), within=20)
            assert received[0] == b"signal 0"
        finally:
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector
            await closed(alice)
            await closed(bob)


async def test_a_consult_between_nodes_on_different_registry_processes(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two `radmesh registry run` processes on one PostgreSQL: a hospital connected to one
    and a neuroradiologist connected to the other exchange a consult request and its
    acceptance, both relayed by the registry (their sites have no LAN route to each other)."""
    from consult.requests import ConsultResponse, Event, State
    from node.app import courier
    from registry.errors import RegistryError
    from tests.node.test_runtime import make_home, request_from, started

    async def no_lan_route(url: str, sealed: bytes) -> None:
        raise RegistryError(f"no route to {url} from this site")

    monkeypatch.setattr(courier, "post_signal", no_lan_route)
    async with registry_process(pg_url) as (url_a, _), registry_process(pg_url) as (url_b, _):
        hospital_home, hospital_id = make_home(tmp_path, "hospital", url_a, [])
        neuro_home, neuro_id = make_home(tmp_path, "neuro", url_b, ["neuro"])
        hospital, neuro = (
            await started(hospital_home, hospital_id),
            await started(neuro_home, neuro_id),
        )
        try:
            await wait_for(lambda: hospital.registry_state.get(url_a) == "connected")
            await wait_for(lambda: neuro.registry_state.get(url_b) == "connected")
            hospital.trust.mark_verified(neuro_id.node_id, hospital.now())
            neuro.trust.mark_verified(hospital_id.node_id, neuro.now())
            request = request_from(hospital_id, hospital.now())
            hospital.consults.add(
                request, role="requester", now=hospital.now(), peer=str(neuro_id.node_id)
            )
            how = await hospital.send_message(
                neuro_id.public_key, "consult.request", request.to_wire(hospital_id)
            )
            assert how == f"delivered (registry {url_a})"
            await wait_for(lambda: bool(neuro.consults.cases()))
            assert neuro.consults.get(request.id).state is State.REQUESTED

            accept = ConsultResponse(request.id, neuro_id.node_id, Event.ACCEPT, neuro.now(), "")
            how = await neuro.send_message(
                hospital_id.public_key, "consult.response", accept.to_wire(neuro_id)
            )
            assert how == f"delivered (registry {url_b})"
            await wait_for(lambda: hospital.consults.get(request.id).state is State.ACCEPTED)
        finally:
            await hospital.stop()
            await neuro.stop()


async def test_a_database_that_goes_away_is_an_error_a_person_can_act_on(pg_url: str) -> None:
    from registry.errors import RegistryError

    store = open_store(pg_url)
    await store.open()
    try:
        await store._pool.close()  # type: ignore[attr-defined]
        with pytest.raises(RegistryError, match="registry database is unavailable"):
            await store.get_wire(ALICE.node_id, NOW)
    finally:
        store._pool = None  # type: ignore[attr-defined]
        await store.close()
    with pytest.raises(RegistryError, match="cannot reach the registry database"):
        await open_store("postgresql://radmesh@127.0.0.1:1/none").open()


async def test_first_records_published_at_once_through_two_instances_keep_the_newest(
    pg_url: str,
) -> None:
    from registry.records import NodeRecord

    one, two = open_store(pg_url), open_store(pg_url)
    await one.open()
    await two.open()
    try:
        for _ in range(10):
            node = Identity.generate()
            older, newer = make_record(node, seq=2), make_record(node, seq=3)
            await asyncio.gather(one.put(older, NOW), two.put(newer, NOW), return_exceptions=True)
            held = await one.get_wire(node.node_id, NOW)
            assert held is not None
            assert NodeRecord.from_wire(held).sequence == 3
    finally:
        await one.close()
        await two.close()


# Per-address limits across instances (issue 20) ----------------------------------------------


async def test_an_address_relay_rate_is_shared_by_instances(pg_url: str, clock: Clock) -> None:
    # 10 relayed messages per address (the clock stands still: no refill until moved).
    limits = Limits(address_rate=1e6, address_burst=1e6, publish_burst=1e6,
                    new_record_burst=1e6, address_send_rate=10, address_send_burst=10)  # fmt: skip
    async with instances(pg_url, clock=clock, limits=limits) as (a, b):
        async with RegistryClient(a.url) as client:
            await client.publish(make_record(BOB))
        alice, carol = await connected(a.url, ALICE), await connected(b.url, CAROL)
        try:
            for i in range(5):  # under the rate together: all accepted
                assert await alice.send(BOB.node_id, b"a%d" % i) == "stored"
                assert await carol.send(BOB.node_id, b"c%d" % i) == "stored"
            # The 6th through each instance: each has relayed only 5 itself.
            with pytest.raises(RemoteRegistryError, match="sending too fast"):
                await alice.send(BOB.node_id, b"a5")
            with pytest.raises(RemoteRegistryError, match="sending too fast"):
                await carol.send(BOB.node_id, b"c5")
            clock.now += 1  # 10 tokens back, for either instance
            assert await carol.send(BOB.node_id, b"canary") == "stored"
        finally:
            await closed(alice)
            await closed(carol)


async def test_an_address_request_rate_is_shared_by_instances(pg_url: str, clock: Clock) -> None:
    limits = Limits(address_rate=10, address_burst=10)
    async with (
        instances(pg_url, clock=clock, limits=limits) as (a, b),
        RegistryClient(a.url) as ca,
        RegistryClient(b.url) as cb,
    ):
        for _ in range(5):
            assert (await ca.health())["status"] == "ok"
            assert (await cb.health())["status"] == "ok"
        with pytest.raises(RemoteRegistryError, match="too many requests"):
            await ca.health()
        with pytest.raises(RemoteRegistryError, match="too many requests"):
            await cb.health()
        clock.now += 1
        assert (await cb.health())["status"] == "ok"


async def _socket(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def _answers(stream: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> bool:
    """The socket is open and served: a health request on it is answered."""
    reader, writer = stream
    writer.write(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    async with asyncio.timeout(10):
        return (await reader.readline()).startswith(b"HTTP/1.1 200")


async def test_an_address_socket_cap_is_shared_by_instances(pg_url: str) -> None:
    limits = Limits(address_rate=1e6, address_burst=1e6, address_sockets=3, header_timeout=60)
    async with instances(pg_url, limits=limits) as (a, b):

        def settled(server: RegistryServer, count: int) -> bool:
            """``count`` sockets open on ``server`` and its shared-table checks done."""
            checks = getattr(server.guard, "tasks", ())
            return sum(server.guard.open.values()) == count and not checks

        async def opened(
            server: RegistryServer, count: int
        ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            stream = await _socket(server.url)
            await wait_for(lambda: settled(server, count))
            return stream

        held = [await opened(a, 1), await opened(a, 2), await opened(b, 1)]
        fourth = await _socket(b.url)
        # A request sent at once, before the shared count is checked, is not served.
        fourth[1].write(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        try:
            async with asyncio.timeout(10):  # closed by the server (no header timeout yet)
                assert b" 200 " not in await fourth[0].read()
            assert b.guard.refused == 1
            for stream in held:  # the three under the cap are served
                assert await _answers(stream)
            held[0][1].close()  # one closes on a: a place for b
            await wait_for(lambda: settled(a, 1))
            held[0] = await opened(b, 2)
            assert await _answers(held[0])
            assert b.guard.refused == 1
        finally:
            for _, writer in [*held, fourth]:
                writer.close()


async def test_sockets_of_an_instance_whose_heartbeat_stopped_do_not_count(pg_url: str) -> None:
    import asyncpg

    store = open_store(pg_url)
    await store.open()
    try:
        conn = await asyncpg.connect(pg_url)
        try:
            await conn.execute(
                "INSERT INTO instances (id, seen) VALUES ('dead', now() - interval '1 hour'), "
                "('alive', now())"
            )
            await conn.execute(
                "INSERT INTO address_sockets (instance, address, n) VALUES "
                "('dead', '192.0.2.1', 3), ('alive', '192.0.2.2', 3)"
            )
        finally:
            await conn.close()
        assert await store.socket_open("192.0.2.1", 3)  # the dead one's 3 are gone
        assert not await store.socket_open("192.0.2.2", 3)  # the live one's 3 hold
        await store.socket_closed("192.0.2.1")
        assert await store.socket_open("192.0.2.1", 1)  # closed: the place is back
    finally:
        await store.close()
