"""A hostile registry cannot impersonate, roll back or inject; directory and federation."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from crypto.envelope import ReplayGuard, open_sealed, seal
from crypto.errors import BadSignature, DecryptionFailed, Replayed
from crypto.identity import Identity, NodeId
from registry import wsproto
from registry.client import MultiRegistry, RegistryClient, SearchQuery, mirror
from registry.directory import MemoryFinder, PeerDirectory, RegistryFinder
from registry.errors import RemoteRecordError
from registry.netguard import Outbox
from registry.server import RegistryServer
from registry.trust import TrustState, TrustStore
from tests.registry.conftest import NOW, Clock, make_record

ALICE = Identity(bytes([31]) * 32)
BOB = Identity(bytes([32]) * 32)
MALLORY = Identity(bytes([33]) * 32)
# Relayed unchanged after the message under test, on the same ordered path: once Bob has
# it, every copy of the message the relay was going to deliver has been delivered.
CANARY = b"canary"


class HostileRegistry(RegistryServer):
    """Serves Mallory's record for anyone, replays stale records, mangles the relay."""

    swap_to: bytes | None = None
    replay: dict[NodeId, bytes]
    relay_mode = "honest"  # honest | drop | duplicate | tamper | misattribute

    def __post_init__(self) -> None:
        super().__post_init__()
        self.replay = {}

    async def _lookup(self, request: web.Request) -> web.Response:
        node_id = NodeId.parse(request.match_info["node_id"])
        if self.swap_to is not None:
            return web.Response(body=self.swap_to)
        if node_id in self.replay:
            return web.Response(body=self.replay[node_id])
        return await super()._lookup(request)

    async def _search(self, request: web.Request) -> web.Response:
        records = [self.swap_to] if self.swap_to else list(self.replay.values())
        junk = [b"\x93garbage", bytes(200)]
        return web.json_response(
            {"records": [base64.b64encode(w).decode() for w in [*records, *junk]]}
        )

    async def _relay(self, outbox: Outbox, sender: NodeId, frame: wsproto.Send) -> None:
        target = self.connections[frame.to]
        data, claimed = frame.data, sender
        mode = "honest" if data == CANARY else self.relay_mode
        if mode == "tamper":
            data = data[:-1] + bytes([data[-1] ^ 1])
        if mode == "misattribute":
            claimed = MALLORY.node_id
        copies = {"drop": 0, "duplicate": 2}.get(mode, 1)
        for _ in range(copies):
            target.push(wsproto.to_wire(wsproto.Deliver(claimed, frame.to, data)))
        outbox.push(wsproto.to_wire(wsproto.Ack(frame.ref, "delivered")))


@pytest.fixture
async def hostile(tmp_path: Path, clock: Clock) -> AsyncIterator[HostileRegistry]:
    server = HostileRegistry(tmp_path / "h.db", clock=clock)
    await server.start("127.0.0.1", 0)
    yield server
    await server.stop()


@pytest.fixture
def directory(tmp_path: Path) -> PeerDirectory:
    return PeerDirectory(tmp_path / "peers.db", TrustStore(tmp_path / "trust.db"))


async def test_swapped_key_is_detected(hostile: HostileRegistry) -> None:
    hostile.swap_to = make_record(MALLORY, name="Dr Alice (really Mallory)").to_wire()
    async with RegistryClient(hostile.url) as client:
        with pytest.raises(RemoteRecordError, match="swapped"):
            await client.lookup(ALICE.node_id, now=NOW)
        # Search results are self-certifying: Mallory's record is Mallory's, junk is dropped.
        results = await client.search(now=NOW)
        assert [r.node_id for r in results] == [MALLORY.node_id]
        assert client.rejected == 3


async def test_replayed_old_record_does_not_roll_back_directory(
    hostile: HostileRegistry, directory: PeerDirectory
) -> None:
    directory.remember(make_record(ALICE, seq=7, endpoints=("lan:http://127.0.0.1:2",)), "x", NOW)
    hostile.replay[ALICE.node_id] = make_record(
        ALICE, seq=3, endpoints=("lan:http://127.0.0.1:666",)
    ).to_wire()
    async with RegistryClient(hostile.url) as client:
        directory.finders = [RegistryFinder(MultiRegistry([client]))]
        peer = await directory.resolve(ALICE.node_id, NOW)
    assert peer is not None
    assert peer.record.sequence == 7
    assert peer.record.lan_urls == ("http://127.0.0.1:2",)
    assert directory.rejected == 1


async def test_federation_takes_newest_across_registries_and_survives_a_liar(
    live_registry: RegistryServer, hostile: HostileRegistry
) -> None:
    hostile.replay[ALICE.node_id] = make_record(ALICE, seq=1).to_wire()
    async with RegistryClient(live_registry.url) as honest, RegistryClient(hostile.url) as liar:
        multi = MultiRegistry([liar, honest])
        errors = await multi.publish(make_record(ALICE, seq=5))
        assert errors[honest.url] is None
        found = await multi.lookup(ALICE.node_id, now=NOW)
        assert found is not None
        assert found.sequence == 5
        hostile.swap_to = make_record(MALLORY).to_wire()
        found = await multi.lookup(ALICE.node_id, now=NOW)
        assert found is not None
        assert found.node_id == ALICE.node_id


async def test_mirror_copies_self_certifying_records(
    live_registry: RegistryServer, tmp_path: Path, clock: Clock
) -> None:
    target = RegistryServer(tmp_path / "t.db", clock=clock)
    await target.start("127.0.0.1", 0)
    try:
        async with RegistryClient(live_registry.url) as src, RegistryClient(target.url) as dst:
            for i in range(1, 5):
                await src.publish(make_record(Identity(bytes([40 + i]) * 32), seq=i))
            result = await mirror(src, dst, now=NOW)
            assert result.copied == 4
            again = await mirror(src, dst, now=NOW)
            assert again.already_current == 4
            assert len(await dst.search(now=NOW)) == 4
    finally:
        await target.stop()


@pytest.mark.parametrize("mode", ["tamper", "misattribute", "duplicate", "drop"])
async def test_hostile_relay_is_detected_or_harmless(hostile: HostileRegistry, mode: str) -> None:
    hostile.relay_mode = mode
    guard = ReplayGuard()
    async with (
        RegistryClient(hostile.url, ALICE) as a,
        RegistryClient(hostile.url, BOB) as b,
        a.connect() as alice,
        b.connect() as bob,
    ):
        sealed = seal(ALICE, BOB.public_key, "offer", {"n": 1}, now=NOW)
        await alice.send(BOB.node_id, sealed)
        await alice.send(BOB.node_id, CANARY)
        received = []
        async with asyncio.timeout(10):
            while (message := await bob.receive()).data != CANARY:
                received.append(message)
    opened = []
    for message in received:
        try:
            opened.append(open_sealed(BOB, message.data, "offer", now=NOW, replay_guard=guard))
        except (DecryptionFailed, BadSignature, Replayed):
            continue
    if mode == "tamper":
        assert len(received) == 1
        assert opened == []
    elif mode == "misattribute":
        assert received[0].sender == MALLORY.node_id
        assert [o.sender_id for o in opened] == [ALICE.node_id]  # the truth comes from the seal
    elif mode == "duplicate":
        assert len(received) == 2
        assert len(opened) == 1
    else:  # drop: nothing arrives, nothing false is believed; the transport retries
        assert received == []


async def test_two_nodes_find_each_other_by_registry_then_from_memory_when_it_stops(
    tmp_path: Path, clock: Clock
) -> None:
    server = RegistryServer(tmp_path / "r.db", clock=clock)
    url = await server.start("127.0.0.1", 0)
    dirs = {}
    async with RegistryClient(url, ALICE) as a, RegistryClient(url, BOB) as b:
        await a.publish(make_record(ALICE, endpoints=("lan:http://127.0.0.1:1111",)))
        await b.publish(make_record(BOB, endpoints=("lan:http://127.0.0.1:2222",)))
        for name, client in (("alice", a), ("bob", b)):
            d = PeerDirectory(tmp_path / f"{name}.db", TrustStore(tmp_path / f"{name}-t.db"))
            d.finders = [RegistryFinder(MultiRegistry([client]))]
            dirs[name] = d
        alice_sees = await dirs["alice"].resolve(BOB.node_id, NOW)
        bob_sees = await dirs["bob"].resolve(ALICE.node_id, NOW)
        assert alice_sees is not None
        assert bob_sees is not None
        assert alice_sees.record.lan_urls == ("http://127.0.0.1:2222",)
        assert alice_sees.source == "registry"
        assert alice_sees.trust is TrustState.UNKNOWN
        await server.stop()
        # Every registry is down: the remembered record still resolves (also after expiry).
        again = await dirs["alice"].resolve(BOB.node_id, NOW + 10)
        assert again is not None
        assert again.record == alice_sees.record
        later = await dirs["alice"].resolve(BOB.node_id, NOW + 7200)
        assert later is not None
        assert not later.fresh
        bob_again = await dirs["bob"].resolve(ALICE.node_id, NOW + 10)
        assert bob_again is not None
        assert bob_again.record.lan_urls == ("http://127.0.0.1:1111",)


async def test_directory_merges_sources_and_reports_trust(directory: PeerDirectory) -> None:
    old = make_record(ALICE, seq=1, subs=("neuro",))
    new = make_record(ALICE, seq=2, subs=("neuro", "msk"))
    forged = make_record(MALLORY, seq=99)
    directory.finders = [
        MemoryFinder([old], "registry"),
        MemoryFinder([new, make_record(BOB, subs=("cardiac",))], "mdns"),
    ]
    peer = await directory.resolve(ALICE.node_id, NOW)
    assert peer is not None
    assert peer.record.sequence == 2
    assert peer.source == "mdns"
    # A finder answering with another node's record for Alice's id is ignored.
    directory.finders = [MemoryFinder([], "x")]
    directory.finders[0].records[ALICE.node_id] = forged  # type: ignore[attr-defined]
    peer = await directory.resolve(ALICE.node_id, NOW)
    assert peer is not None
    assert peer.record == new
    directory.trust.mark_verified(ALICE.node_id, NOW)
    directory.finders = [MemoryFinder([new, make_record(BOB, subs=("cardiac",))])]
    found = await directory.search(SearchQuery(subspecialty="msk"), NOW)
    assert [(p.record.node_id, p.trust) for p in found] == [(ALICE.node_id, TrustState.VERIFIED)]
