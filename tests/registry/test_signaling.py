"""The registry's authenticated signaling socket: auth, relay, mailbox, TURN credentials."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from pathlib import Path

import aiohttp
import pytest

from crypto.envelope import ReplayGuard, open_sealed, seal
from crypto.identity import Identity
from registry import wsproto
from registry.client import RegistryClient, RegistryConnection
from registry.errors import KeyInUse, RegistryUnavailable, RemoteRegistryError
from registry.limits import MailboxQuota
from registry.server import Limits, RegistryServer, TurnConfig
from tests.node.test_runtime import wait_for
from tests.registry.conftest import NOW, Clock, make_record

ALICE = Identity(bytes([1]) * 32)
BOB = Identity(bytes([2]) * 32)


async def _publish(url: str, *identities: Identity, now: int = NOW) -> None:
    """Give each node a current record: the registry keeps mail and mints TURN credentials
    only for nodes it knows."""
    async with RegistryClient(url) as client:
        for identity in identities:
            await client.publish(make_record(identity, now=now))


async def _challenge(
    url: str, session: aiohttp.ClientSession
) -> tuple[aiohttp.ClientWebSocketResponse, bytes]:
    ws = await session.ws_connect(url + "/v1/ws")
    frame = wsproto.from_wire((await ws.receive()).data)
    assert isinstance(frame, wsproto.Challenge)
    return ws, frame.challenge


async def test_bad_signature_is_refused(live_registry: RegistryServer) -> None:
    async with aiohttp.ClientSession() as session:
        ws, challenge = await _challenge(live_registry.url, session)
        auth = wsproto.sign_challenge(ALICE, challenge, live_registry.url)
        forged = wsproto.Auth(BOB.public_key, auth.signature)  # Alice's signature, Bob's key
        await ws.send_bytes(wsproto.to_wire(forged))
        reply = wsproto.from_wire((await ws.receive()).data)
        assert isinstance(reply, wsproto.Error)
        assert "does not verify" in reply.error
        assert (await ws.receive()).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        await ws.close()
    assert not live_registry.connections


async def test_challenge_relayed_from_another_registry_is_refused(
    live_registry: RegistryServer, tmp_path: Path
) -> None:
    """A hostile registry B forwards A's challenge; the node signs it for B's URL."""
    hostile = RegistryServer(tmp_path / "b.db")
    hostile_url = await hostile.start("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as session:
            ws, challenge = await _challenge(live_registry.url, session)
            # The node believes it talks to B, so it binds B's URL into the signature.
            await ws.send_bytes(
                wsproto.to_wire(wsproto.sign_challenge(ALICE, challenge, hostile_url))
            )
            reply = wsproto.from_wire((await ws.receive()).data)
            assert isinstance(reply, wsproto.Error)
            await ws.close()
            # The same node signing for A's URL is accepted: the refusal was the binding.
            ws, challenge = await _challenge(live_registry.url, session)
            await ws.send_bytes(
                wsproto.to_wire(wsproto.sign_challenge(ALICE, challenge, live_registry.url))
            )
            ready = wsproto.from_wire((await ws.receive()).data)
            assert isinstance(ready, wsproto.Ready)
            assert ready.node_id == ALICE.node_id
            await ws.close()
    finally:
        await hostile.stop()


async def test_relay_to_connected_peer_and_open_sealed(live_registry: RegistryServer) -> None:
    async with (
        RegistryClient(live_registry.url, ALICE) as a,
        RegistryClient(live_registry.url, BOB) as b,
        a.connect() as alice,
        b.connect() as bob,
    ):
        sealed = seal(ALICE, BOB.public_key, "offer", {"sdp": "v=0"}, now=NOW)
        assert await alice.send(BOB.node_id, sealed) == "delivered"
        async with asyncio.timeout(5):
            message = await bob.receive()
        assert message.sender == ALICE.node_id
        assert message.data == sealed
        opened = open_sealed(BOB, message.data, "offer", now=NOW, replay_guard=ReplayGuard())
        assert opened.sender_id == ALICE.node_id
        assert opened.body == {"sdp": "v=0"}


async def test_mailbox_keeps_messages_for_a_node_that_connects_later(
    live_registry: RegistryServer, clock: Clock
) -> None:
    await _publish(live_registry.url, BOB)
    async with (
        RegistryClient(live_registry.url, ALICE) as a,
        RegistryClient(live_registry.url, BOB) as b,
    ):
        async with a.connect() as alice:
            statuses = [await alice.send(BOB.node_id, bytes([i]) * 100) for i in range(3)]
        assert statuses == ["stored"] * 3
        async with b.connect() as bob:
            async with asyncio.timeout(5):
                got = [await bob.receive() for _ in range(3)]
        assert [m.data[0] for m in got] == [0, 1, 2]
        assert all(m.sender == ALICE.node_id for m in got)
        # A message leaves the mailbox once written to the socket, a moment after the
        # reader may already have it (the store runs off the event loop).
        await wait_for(lambda: live_registry.db.mailbox_count(BOB.node_id, int(clock.now)) == 0)


async def test_mailbox_ttl_expires_undelivered_messages(tmp_path: Path, clock: Clock) -> None:
    server = RegistryServer(tmp_path / "r.db", clock=clock, limits=Limits(mailbox_ttl=60))
    await server.start("127.0.0.1", 0)
    await _publish(server.url, BOB)
    try:
        async with RegistryClient(server.url, ALICE) as a, RegistryClient(server.url, BOB) as b:
            async with a.connect() as alice:
                assert await alice.send(BOB.node_id, b"old") == "stored"
                clock.now += 61
                assert await alice.send(BOB.node_id, b"new") == "stored"
            async with b.connect() as bob, a.connect() as alice:
                async with asyncio.timeout(5):
                    assert (await bob.receive()).data == b"new"
                    # A canary after the mailbox, on bob's one socket: "old" is not between.
                    assert await alice.send(BOB.node_id, b"canary") == "delivered"
                    assert (await bob.receive()).data == b"canary"
    finally:
        await server.stop()


async def test_mailbox_cap_per_recipient(tmp_path: Path, clock: Clock) -> None:
    limits = Limits(mailbox=MailboxQuota(recipient_messages=2, share=1))
    server = RegistryServer(tmp_path / "r.db", clock=clock, limits=limits)
    await server.start("127.0.0.1", 0)
    await _publish(server.url, BOB)
    try:
        async with RegistryClient(server.url, ALICE) as a, a.connect() as alice:
            assert await alice.send(BOB.node_id, b"1") == "stored"
            assert await alice.send(BOB.node_id, b"2") == "stored"
            with pytest.raises(RemoteRegistryError, match="mailbox is full"):
                await alice.send(BOB.node_id, b"3")
    finally:
        await server.stop()


async def test_relay_rate_limit_per_node(tmp_path: Path, clock: Clock) -> None:
    server = RegistryServer(
        tmp_path / "r.db", clock=clock, limits=Limits(send_rate=1, send_burst=3)
    )
    await server.start("127.0.0.1", 0)
    await _publish(server.url, BOB)
    try:
        async with RegistryClient(server.url, ALICE) as a, a.connect() as alice:
            for _ in range(3):
                await alice.send(BOB.node_id, b"x")
            with pytest.raises(RemoteRegistryError, match="too fast"):
                await alice.send(BOB.node_id, b"x")
            clock.now += 1
            assert await alice.send(BOB.node_id, b"x") == "stored"
    finally:
        await server.stop()


async def test_oversized_frame_closes_only_that_socket(live_registry: RegistryServer) -> None:
    await _publish(live_registry.url, ALICE)
    async with RegistryClient(live_registry.url, ALICE) as a, a.connect() as alice:
        assert alice._ws is not None
        await alice._ws.send_bytes(b"\x00" * (wsproto.MAX_FRAME + 10))
        async with RegistryClient(live_registry.url, BOB) as b, b.connect() as bob:
            assert await bob.send(ALICE.node_id, b"after") in ("delivered", "stored")


async def test_client_reconnects_after_registry_restart(tmp_path: Path) -> None:
    server = RegistryServer(tmp_path / "r.db")
    url = await server.start("127.0.0.1", 0)
    await _publish(url, BOB, now=int(time.time()))
    port = int(url.rsplit(":", 1)[1])
    async with (
        RegistryClient(url, ALICE) as a,
        a.connect(max_backoff=0.3, connect_timeout=1.0) as alice,
    ):
        assert alice.connects == 1
        await server.stop()
        with pytest.raises(RegistryUnavailable):
            await alice.send(BOB.node_id, b"x")
        server = RegistryServer(tmp_path / "r.db", public_url=url)
        await server.start("127.0.0.1", port)
        try:
            async with asyncio.timeout(8):
                while alice.connects < 2:  # noqa: ASYNC110 - polling a counter, bounded
                    await asyncio.sleep(0.05)
            assert await alice.send(BOB.node_id, b"x") == "stored"
        finally:
            await server.stop()


async def test_turn_credentials_follow_coturn_rest_scheme(tmp_path: Path, clock: Clock) -> None:
    turn = TurnConfig("s3cret", ("turn:127.0.0.1:3478", "stun:127.0.0.1:3478"), ttl=600)
    server = RegistryServer(tmp_path / "r.db", clock=clock, turn=turn)
    await server.start("127.0.0.1", 0)
    await _publish(server.url, ALICE)
    try:
        async with RegistryClient(server.url, ALICE) as a:
            creds = await a.turn_credentials()
        expiry, who = creds.username.split(":", 1)
        assert int(expiry) == NOW + 600
        assert who == str(ALICE.node_id)
        expected = base64.b64encode(
            hmac.new(b"s3cret", creds.username.encode(), hashlib.sha1).digest()
        ).decode()
        assert creds.password == expected
        assert creds.urls == turn.urls
    finally:
        await server.stop()


async def test_turn_refused_when_not_configured(live_registry: RegistryServer) -> None:
    async with RegistryClient(live_registry.url, ALICE) as a:
        with pytest.raises(RemoteRegistryError, match="no TURN"):
            await a.turn_credentials()


async def test_a_node_key_connected_twice_stops_the_older_socket_for_good(
    live_registry: RegistryServer,
) -> None:
    """The node started twice: the registry tells the older socket why it closes, the
    older stops reconnecting (before, each took the place back from the other every
    0.1-10 s, forever) and says what to do; the newer keeps its place."""
    url = live_registry.url
    await _publish(url, BOB)
    async with RegistryClient(url, ALICE) as a1, RegistryClient(url, ALICE) as a2:
        older = a1.connect(max_backoff=0.1)
        await older.__aenter__()
        try:
            async with a2.connect(max_backoff=0.1) as newer:
                async with asyncio.timeout(10):
                    await older._task  # type: ignore[misc]  # it ends: nothing reconnects
                assert "another process is connected" in older.stopped
                assert "`radmesh init --force`" in older.stopped  # what to do about it
                assert (older.ready, older.connects) == (False, 1)
                with pytest.raises(KeyInUse):
                    await older.send(BOB.node_id, b"x")
                async with asyncio.timeout(5):
                    assert [m async for m in older] == []  # a node's pump ends, not hangs
                # The canary, relayed after all that: the newer socket holds the node.
                async with RegistryClient(url, BOB) as b, b.connect() as bob:
                    assert await bob.send(ALICE.node_id, b"canary") == "delivered"
                    async with asyncio.timeout(5):
                        assert (await newer.receive()).data == b"canary"
                assert (newer.ready, newer.connects, newer.stopped) == (True, 1, "")
                # Three sockets authenticated in all (older, newer, bob), one replaced.
                assert (live_registry.accepted, live_registry.replaced) == (3, 1)
        finally:
            await older.close()


class _Socket:
    async def send_bytes(self, data: bytes) -> None:
        return None


@pytest.mark.parametrize("call", ["turn", "send"])
async def test_a_cancel_that_meets_the_answer_still_cancels(call: str) -> None:
    # Python 3.11's asyncio.wait_for returned the answer and dropped such a cancel, so a
    # node's background task that asked the registry at the moment the node stopped
    # slept on, and the node's stop() waited for it for an hour.
    conn = RegistryConnection(RegistryClient("http://127.0.0.1:9", Identity.generate()), ALICE)
    conn._ws = _Socket()  # type: ignore[assignment]
    conn._ready.set()
    task: asyncio.Future[object]
    if call == "turn":
        task = asyncio.ensure_future(conn.turn_credentials())
        await asyncio.sleep(0)
        assert conn._turn is not None
        conn._turn.set_result(wsproto.TurnCredentials("u", "p", 60, ("turn:127.0.0.1:9",)))
    else:
        task = asyncio.ensure_future(conn.send(ALICE.node_id, b"sealed"))
        await asyncio.sleep(0)
        [future] = conn._pending.values()
        future.set_result("delivered")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
