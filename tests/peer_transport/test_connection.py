"""Connections over memory links (one test also over real aiortc on 127.0.0.1): handshake,
the four channels, trust, heartbeat, reconnect, bulk credit."""

from __future__ import annotations

import asyncio
import os

import pytest

from peer_transport import frames as fr
from peer_transport.connection import (
    Closed,
    Connected,
    Disconnected,
    PeerConnection,
    Received,
    Reconnected,
    RequestRefused,
    Transport,
)
from peer_transport.errors import PeerRejected, RemoteError
from peer_transport.memory import MemoryLink
from tests.peer_transport.helpers import FAST, current_link, mesh, with_options

pytestmark = pytest.mark.timeout(60)


async def _pair(m: object) -> tuple[Transport, Transport, PeerConnection, PeerConnection]:
    from tests.peer_transport.helpers import Mesh

    assert isinstance(m, Mesh)
    a, b = await m.node(), await m.node()
    m.trust(a, b)
    conn_a = await a.connect(b.identity.public_key)
    conn_b = await b.accept(10)
    return a, b, conn_a, conn_b


async def _echo(_conn: PeerConnection, body: bytes) -> bytes:
    return body


async def _round_trip(conn: PeerConnection) -> None:
    """A canary on the control channel: whatever the peer sent on it before answering
    (a bulk acknowledgement, say) has been handled here once this returns."""
    assert await conn.request("echo", b"canary") == b"canary"


async def _next_received(conn: PeerConnection, within: float = 10) -> Received:
    while True:
        event = await conn.next_event(within)
        if isinstance(event, Received):
            return event


@pytest.mark.parametrize("real", [False, pytest.param(True, marks=pytest.mark.webrtc)])
async def test_two_nodes_connect_and_use_every_channel(real: bool) -> None:
    async with mesh(real) as m:
        a, b, conn_a, conn_b = await _pair(m)
        assert conn_a.peer == b.identity.public_key
        assert conn_b.peer == a.identity.public_key
        assert await conn_a.next_event(5) == Connected(b.identity.public_key)
        assert await conn_b.next_event(5) == Connected(a.identity.public_key)

        async def echo(_conn: PeerConnection, body: bytes) -> bytes:
            return body[::-1]

        b.handle("echo", echo)
        assert await conn_a.request("echo", b"abc") == b"cba"
        big = os.urandom(fr.MAX_PAYLOAD - 64)
        assert await conn_a.request("echo", big) == big[::-1]

        chunks = [os.urandom(fr.MAX_BULK_PAYLOAD), b"x", os.urandom(1000)] * 4
        sending = asyncio.ensure_future(_send_all(conn_a, chunks))
        got = [(await _next_received(conn_b)).data for _ in chunks]
        await sending
        assert got == chunks

        await conn_b.send_live(b"chat: hello")
        assert await _next_received(conn_a) == Received(
            b.identity.public_key, "live", b"chat: hello"
        )
        await conn_a.send_message(b"transfer-control")
        assert (await _next_received(conn_b)).channel == "message"
        for i in range(20):
            assert conn_a.send_presence(f"cursor {i}".encode())
        presence = await _next_received(conn_b)
        assert presence.channel == "presence"
        assert presence.data.startswith(b"cursor ")


async def _send_all(conn: PeerConnection, chunks: list[bytes]) -> None:
    for chunk in chunks:
        await conn.send_bulk(chunk)


async def test_request_errors_come_back_typed() -> None:
    async with mesh() as m:
        _a, b, conn_a, _conn_b = await _pair(m)

        async def refuse(_conn: PeerConnection, _body: bytes) -> bytes:
            raise RequestRefused("not-found", "no such study")

        b.handle("study.get", refuse)
        with pytest.raises(RemoteError) as refused:
            await conn_a.request("study.get", b"")
        assert refused.value.code == "not-found"
        with pytest.raises(RemoteError) as unknown:
            await conn_a.request("nope", b"")
        assert unknown.value.code == "unknown-kind"


async def test_an_untrusted_node_is_refused_either_way() -> None:
    async with mesh() as m:
        a, b = await m.node(), await m.node()
        m.trusted[a.identity.public_key].add(b.identity.public_key)  # one-sided
        with pytest.raises(PeerRejected, match="does not know you"):
            await a.connect(b.identity.public_key)
        with pytest.raises(PeerRejected, match="not trusted"):
            await b.connect(a.identity.public_key)


def test_by_default_a_dead_peer_is_noticed_within_5_s() -> None:
    # The heartbeat looks every interval for a frame newer than the timeout.
    assert FAST.heartbeat_interval + FAST.heartbeat_timeout <= 5.0


async def test_a_frozen_peer_is_noticed_by_its_silence_and_the_connection_comes_back() -> None:
    async with mesh() as m:
        quick = with_options(heartbeat_interval=0.1, heartbeat_timeout=0.4)
        a, b = await m.node(options=quick), await m.node(options=quick)
        m.trust(a, b)
        conn_a = await a.connect(b.identity.public_key)
        conn_b = await b.accept(10)
        await conn_a.next_event(5)
        await conn_b.next_event(5)
        frozen = current_link(conn_b)
        assert isinstance(frozen, MemoryLink)
        frozen.partition()  # nothing gets through either way; neither side is told
        lost = await conn_a.next_event(10)
        assert isinstance(lost, Disconnected)
        assert lost.will_retry
        assert "no heartbeat" in lost.reason
        assert await conn_a.next_event(15) == Reconnected(b.identity.public_key)
        while (event := await conn_b.next_event(15)) != Reconnected(a.identity.public_key):
            assert isinstance(event, Disconnected), event  # b may notice the silence too

        async def ok(_conn: PeerConnection, body: bytes) -> bytes:
            return b"ok " + body

        b.handle("ping", ok)
        assert await conn_a.request("ping", b"again") == b"ok again"


async def test_closing_ends_both_event_streams() -> None:
    async with mesh() as m:
        _a, _b, conn_a, conn_b = await _pair(m)
        await conn_a.close("done")
        events = [e async for e in conn_b.events()]
        assert isinstance(events[-1], Closed)
        assert "done" in events[-1].reason


async def test_bulk_sender_waits_until_the_peer_consumes_within_the_window() -> None:
    async with mesh() as m:
        _a, b, conn_a, conn_b = await _pair(m)
        b.handle("echo", _echo)
        await conn_b.next_event(5)  # Connected
        window = conn_a.transport.options.bulk_window
        for i in range(window):
            await asyncio.wait_for(conn_a.send_bulk(bytes([i]) * 1000), 5)
        blocked = asyncio.ensure_future(conn_a.send_bulk(b"one too many"))
        await _round_trip(conn_a)
        assert not blocked.done()  # window full: nothing consumed yet
        first = await _next_received(conn_b)  # consuming one returns one credit
        assert first.data == b"\x00" * 1000
        await asyncio.wait_for(blocked, 5)
        rest = [(await _next_received(conn_b)).data for _ in range(window)]
        assert rest[-1] == b"one too many"


@pytest.mark.parametrize("who_sends_presence", ["bulk sender", "bulk receiver"])
async def test_while_presence_flows_bulk_keeps_a_smaller_window(who_sends_presence: str) -> None:
    # A cursor queued behind bulk in SCTP waits for every bulk frame ahead of it.
    async with mesh() as m:
        _a, b, conn_a, conn_b = await _pair(m)
        b.handle("echo", _echo)
        await conn_b.next_event(5)  # Connected
        options = conn_a.transport.options
        assert options.live_bulk_window < options.bulk_window
        if who_sends_presence == "bulk sender":
            assert conn_a.send_presence(b"cursor")
        else:
            assert conn_b.send_presence(b"cursor")
            assert (await _next_received(conn_a)).channel == "presence"
        for i in range(options.live_bulk_window):
            await asyncio.wait_for(conn_a.send_bulk(bytes([i]) * 1000), 5)
        blocked = asyncio.ensure_future(conn_a.send_bulk(b"one too many"))
        await _round_trip(conn_a)
        assert not blocked.done()  # the live window is full although the bulk one is not
        while (await _next_received(conn_b)).channel != "bulk":  # bounded by its timeout
            pass
        await asyncio.wait_for(blocked, 5)


async def test_two_nodes_calling_each_other_at_once_end_up_with_one_connection() -> None:
    async def who(conn: PeerConnection, _body: bytes) -> bytes:
        return conn.transport.identity.public_key

    async with mesh() as m:
        a, b = await m.node(), await m.node()
        m.trust(a, b)
        a.handle("who", who)
        b.handle("who", who)
        conn_a, conn_b = await asyncio.gather(
            a.connect(b.identity.public_key), b.connect(a.identity.public_key)
        )
        assert conn_a.is_connected
        assert conn_b.is_connected
        assert conn_a.initiator != conn_b.initiator  # exactly one side owns reconnecting
        assert await conn_a.request("who", b"") == b.identity.public_key
        assert await conn_b.request("who", b"") == a.identity.public_key
        assert a.connection(b.identity.public_key) is conn_a
        assert b.connection(a.identity.public_key) is conn_b


async def test_requests_beyond_the_concurrency_limit_get_busy() -> None:
    release = asyncio.Event()

    async def slow(_conn: PeerConnection, body: bytes) -> bytes:
        await release.wait()
        return body

    async with mesh() as m:
        a = await m.node()
        b = await m.node(options=with_options(max_incoming_requests=2))
        m.trust(a, b)
        b.handle("slow", slow)
        conn = await a.connect(b.identity.public_key)
        calls = [asyncio.ensure_future(conn.request("slow", bytes([i]))) for i in range(4)]
        done: set[asyncio.Future[bytes]] = set()
        waiting = set(calls)
        async with asyncio.timeout(10):
            while len(done) < 2:
                finished, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                done |= finished
        assert len(done) == 2  # the two beyond the limit, answered while two are served
        assert all(isinstance(c.exception(), RemoteError) for c in done)
        release.set()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert sorted(r for r in results if isinstance(r, bytes)) == [b"\x00", b"\x01"]
        codes = {r.code for r in results if isinstance(r, RemoteError)}
        assert codes == {"busy"}
