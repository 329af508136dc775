"""Attacks on the peer transport between two running nodes (real aiortc on loopback).

Revocation is revocation: a peer revoked while connected, with a live session open,
loses its connection and its place in the session at once, gets nothing more (no
draft, no chat), and whatever it sends next (a request, a fetch, a live message, a
reconnect) is refused, whether the revocation is made by the running node itself or
by `radmesh trust revoke` from another process.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from consult.live import LiveConsult
from consult.requests import Event, Priority, State
from node.app import consults
from node.app.runtime import NodeRuntime
from node.cli import main
from node.demo.phantom import generate_ct
from peer_transport.connection import PeerConnection
from peer_transport.errors import PeerRejected, RemoteError, TransportError
from tests.node.test_runtime import FAST, make_home, wait_for

CANARY = "test.canary"


@dataclass
class Pair:
    hospital: NodeRuntime
    consultant: NodeRuntime
    consult_id: str
    hospital_live: LiveConsult
    consultant_live: LiveConsult
    served: list[bytes]  # canary requests the hospital answered

    @property
    def consultant_key(self) -> bytes:
        return self.consultant.identity.public_key

    @property
    def hospital_key(self) -> bytes:
        return self.hospital.identity.public_key

    def link(self) -> PeerConnection:
        conn = self.consultant.transport.connection(self.hospital_key)
        assert conn is not None
        return conn


@pytest.fixture
async def pair(tmp_path: Path, registry: str) -> AsyncIterator[Pair]:
    """A hospital and a consultant that verified each other, a consult accepted and its
    study fetched, and a live session with both in it."""
    hospital_home, hospital_id = make_home(tmp_path, "hospital", registry, [])
    consultant_home, consultant_id = make_home(tmp_path, "consultant", registry, ["neuro"])
    hospital = NodeRuntime(hospital_home, hospital_id, transport_options=FAST)
    consultant = NodeRuntime(consultant_home, consultant_id, transport_options=FAST)
    await hospital.start()
    await consultant.start()
    try:
        served: list[bytes] = []

        async def canary(conn: PeerConnection, body: bytes) -> bytes:
            served.append(body)
            return b"served"

        hospital.transport.handle(CANARY, canary)
        hospital.trust.mark_verified(consultant_id.node_id, hospital.now())
        consultant.trust.mark_verified(hospital_id.node_id, consultant.now())
        for path in generate_ct(tmp_path / "ct", slices=2, rows=32):
            hospital.store.add_file(path, source="test")
        request, _, _ = await hospital.consulting.request_consult(
            consultant_id.public_key,
            hospital.store.studies()[0].study_uid,
            consults.Terms("q", Priority.URGENT, "neuro", "IE"),
        )
        await wait_for(lambda: bool(consultant.consults.cases()))
        await consultant.consulting.respond(request.id, Event.ACCEPT)
        await wait_for(lambda: hospital.consults.get(request.id).state is State.ACCEPTED)
        await consultant.consulting.studies.fetch(request.id)
        hospital_live = hospital.live_hub().open(request.id)
        await hospital.live_hub().invite(request.id, consultant_id.public_key)
        await wait_for(lambda: request.id in consultant.live_hub().sessions)
        consultant_live = consultant.live_hub().sessions[request.id]
        hospital_live.say("before revocation")
        await wait_for(lambda: [m.text for m in consultant_live.chat()] == ["before revocation"])
        yield Pair(hospital, consultant, request.id, hospital_live, consultant_live, served)
    finally:
        await hospital.stop()
        await consultant.stop()


async def test_revoking_a_peer_closes_its_connection_and_live_session_at_once(
    pair: Pair,
) -> None:
    hospital, consultant = pair.hospital, pair.consultant
    assert hospital.transport.connection(pair.consultant_key) is not None
    assert pair.hospital_live.is_bound(pair.consultant_key)

    hospital.trust.revoke(consultant.identity.node_id, hospital.now())

    # At once, in the same call: out of the live session, its connection closing.
    assert not pair.hospital_live.is_bound(pair.consultant_key)
    await wait_for(lambda: hospital.transport.connection(pair.consultant_key) is None, 5.0)
    # The draft and the chat written after the revocation never reach it.
    pair.hospital_live.set_report_text("draft after revocation")
    pair.hospital_live.say("after revocation")
    await wait_for(lambda: consultant.transport.connection(pair.hospital_key) is None, 5.0)
    assert pair.consultant_live.report_text() == ""
    assert [m.text for m in pair.consultant_live.chat()] == ["before revocation"]
    # Fetching the study again is refused: the hospital no longer takes its call.
    with pytest.raises(PeerRejected, match="refused the connection"):
        await consultant.consulting.studies.fetch(pair.consult_id)
    # Nor will the hospital call it (a reconnect, a new fetch, an invite).
    with pytest.raises(PeerRejected, match="not trusted"):
        await hospital.transport.connect(pair.consultant_key)


async def test_a_revocation_by_another_process_refuses_the_next_message(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    hospital, consultant = pair.hospital, pair.consultant
    link = pair.link()
    assert await link.request(CANARY, b"before") == b"served"

    # `radmesh trust revoke` run beside the running hospital (its own database connection).
    revoke = ["--home", str(hospital.home.root), "trust", "revoke"]
    assert main([*revoke, str(consultant.identity.node_id)]) == 0
    # The consultant speaks at once: chat, then a request. Whichever comes first, the
    # message's own check or the node noticing the database change, neither is served.
    with caplog.at_level(logging.INFO):
        pair.consultant_live.say("chat after revocation")
        with pytest.raises(TransportError) as refused:
            await link.request(CANARY, b"after")
        assert not isinstance(refused.value, RemoteError)  # refused, not answered
        await wait_for(lambda: hospital.transport.connection(pair.consultant_key) is None, 5.0)
    assert pair.served == [b"before"]
    assert [m.text for m in pair.hospital_live.chat()] == ["before revocation"]
    assert not pair.hospital_live.is_bound(pair.consultant_key)
    assert any("no longer trusted" in r.getMessage() for r in caplog.records)
    # And it cannot come back: a new connection (a reconnect, a fetch) is refused.
    await wait_for(lambda: consultant.transport.connection(pair.hospital_key) is None, 15.0)
    with pytest.raises(PeerRejected, match="refused the connection"):
        await consultant.transport.connect(pair.hospital_key)


async def test_a_peer_revoked_while_its_link_is_down_is_not_called_back() -> None:
    from peer_transport.connection import Closed, Connected, Disconnected
    from peer_transport.errors import ConnectionLost
    from tests.peer_transport.helpers import mesh

    async with mesh() as m:
        a, b = await m.node(), await m.node()
        m.trust(a, b)
        conn = await a.connect(b.identity.public_key)
        assert isinstance(await conn.next_event(5.0), Connected)
        session = conn._session
        assert session is not None
        # Revoked, and in the same step the link dies: the reconnect must ask again.
        m.trusted[a.identity.public_key].discard(b.identity.public_key)
        conn._session_failed(session, ConnectionLost("link died"))
        events = [await conn.next_event(10.0) for _ in range(2)]
        assert isinstance(events[0], Disconnected)
        assert isinstance(events[1], Closed), events[1]  # not Reconnected
        # Nor is a connection handed out again for it.
        with pytest.raises(PeerRejected, match="not trusted"):
            await a.connect(b.identity.public_key)


async def test_connect_does_not_hand_out_a_live_connection_to_a_revoked_peer() -> None:
    from tests.peer_transport.helpers import mesh

    async with mesh() as m:
        a, b = await m.node(), await m.node()
        m.trust(a, b)
        conn = await a.connect(b.identity.public_key)
        m.trusted[a.identity.public_key].discard(b.identity.public_key)
        with pytest.raises(PeerRejected, match="not trusted"):
            await a.connect(b.identity.public_key)
        assert conn.closed


async def test_a_frame_from_a_peer_no_longer_trusted_is_refused_not_served() -> None:
    from tests.peer_transport.helpers import mesh

    async with mesh() as m:
        a, b = await m.node(), await m.node()
        m.trust(a, b)
        served: list[bytes] = []

        async def canary(conn: PeerConnection, body: bytes) -> bytes:
            served.append(body)
            return b"served"

        b.handle(CANARY, canary)
        conn = await a.connect(b.identity.public_key)
        assert await conn.request(CANARY, b"before") == b"served"
        # b stops trusting a; nothing tells b's transport: only the per-frame check can.
        m.trusted[b.identity.public_key].discard(a.identity.public_key)
        with pytest.raises(TransportError) as refused:
            await conn.request(CANARY, b"after")
        assert not isinstance(refused.value, RemoteError)
        assert served == [b"before"]
        their = b.connection(a.identity.public_key)
        assert their is None or their.closed
