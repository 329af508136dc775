"""LAN discovery: two nodes find each other by mDNS alone (zeroconf bound to 127.0.0.1)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from crypto.envelope import ReplayGuard, open_sealed, seal
from crypto.identity import Identity
from registry.directory import MdnsFinder, PeerDirectory
from registry.errors import RecordError, RemoteRegistryError
from registry.lan import LanEndpoint, fetch_record, post_signal
from registry.mdns import LanDiscovery
from registry.records import LanPointer, NodeRecord
from registry.trust import TrustStore
from registry.wsproto import MAX_SEALED
from tests.registry.conftest import make_record

ALICE = Identity(bytes([11]) * 32)
BOB = Identity(bytes([12]) * 32)
MALLORY = Identity(bytes([13]) * 32)


class LanNode:
    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self.record: NodeRecord | None = None
        self.signals: asyncio.Queue[bytes] = asyncio.Queue(16)
        self.endpoint = LanEndpoint(self._record, self.signals.put)
        # Every key counts as trusted here: these tests are about mDNS itself.
        self.discovery = LanDiscovery(
            interfaces=["127.0.0.1"], own_id=identity.node_id, is_trusted=lambda _key: True
        )

    def _record(self) -> NodeRecord:
        assert self.record is not None
        return self.record

    async def start(self, *, advertise_as: Identity | None = None) -> None:
        url = await self.endpoint.start("127.0.0.1", 0)
        now = int(time.time())
        self.record = make_record(self.identity, now=now, endpoints=(f"lan:{url}",))
        await self.discovery.start()
        await self.discovery.advertise(LanPointer.create(advertise_as or self.identity, url, 1))
        await self.discovery.browse()

    async def stop(self) -> None:
        await self.discovery.stop()
        await self.endpoint.stop()


async def test_two_nodes_find_each_other_by_mdns_alone_and_signal_directly(
    tmp_path: Path,
) -> None:
    alice, bob = LanNode(ALICE), LanNode(BOB)
    await alice.start()
    await bob.start()
    try:
        async with asyncio.timeout(15):
            found_bob = await alice.discovery.wait_for(BOB.node_id)
            found_alice = await bob.discovery.wait_for(ALICE.node_id)
        assert found_bob == bob.record
        assert found_alice == alice.record
        # The directory resolves Bob from mDNS alone (no registry configured).
        directory = PeerDirectory(tmp_path / "peers.db", TrustStore(tmp_path / "trust.db"))
        directory.finders = [MdnsFinder(alice.discovery)]
        peer = await directory.resolve(BOB.node_id, int(time.time()))
        assert peer is not None
        assert peer.source == "mdns"
        assert peer.record == bob.record
        # Direct LAN signaling to the discovered endpoint, opened with open_sealed.
        sealed = seal(ALICE, BOB.public_key, "offer", {"x": 1}, now=int(time.time()))
        await post_signal(found_bob.lan_urls[0], sealed)
        async with asyncio.timeout(5):
            got = await bob.signals.get()
        opened = open_sealed(BOB, got, "offer", now=int(time.time()), replay_guard=ReplayGuard())
        assert opened.sender_id == ALICE.node_id
    finally:
        await alice.stop()
        await bob.stop()


async def test_advertisement_signed_by_another_key_is_not_trusted() -> None:
    """Mallory advertises a pointer to Bob's id but signs it herself: ignored."""
    honest, liar = LanNode(ALICE), LanNode(BOB)
    await honest.start()
    await liar.start(advertise_as=MALLORY)  # TXT id is Mallory's, endpoint serves Bob's record
    try:
        async with asyncio.timeout(10):
            while honest.discovery.rejected < 1:  # noqa: ASYNC110 - bounded poll of a counter
                await asyncio.sleep(0.05)
        # The refusal counted above is the liar's only advertisement being turned away.
        assert BOB.node_id not in honest.discovery.found
        assert MALLORY.node_id not in honest.discovery.found
        assert honest.discovery.rejected >= 1
    finally:
        await honest.stop()
        await liar.stop()


async def test_fetch_record_checks_whose_record_it_is() -> None:
    node = LanNode(ALICE)
    url = await node.endpoint.start("127.0.0.1", 0)
    node.record = make_record(ALICE, now=int(time.time()))
    try:
        assert await fetch_record(url, int(time.time()), ALICE.node_id) == node.record
        with pytest.raises(RecordError, match="swapped"):
            await fetch_record(url, int(time.time()), BOB.node_id)
        with pytest.raises(RemoteRegistryError):
            await post_signal(url, b"x" * (MAX_SEALED + 1))
    finally:
        await node.endpoint.stop()


async def test_avahi_browse_sees_the_advertisement() -> None:
    if shutil.which("avahi-browse") is None:
        pytest.skip("avahi-browse missing: apt-get install avahi-utils")
    probe = await asyncio.to_thread(
        subprocess.run,
        ["avahi-browse", "-a", "-t", "-p"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    if probe.returncode != 0:
        pytest.skip(
            "avahi-daemon is not running (the test does not start it: the daemon would "
            f"multicast on the host's real interfaces): {probe.stderr.strip()[:80]}"
        )
    node = LanNode(ALICE)
    await node.start()
    try:
        await asyncio.sleep(1)
        result = await asyncio.to_thread(
            subprocess.run,
            ["avahi-browse", "-r", "-t", "-p", "_radmesh._tcp"],
            capture_output=True,
            text=True,
            timeout=15,
        )
        assert "radmesh-" in result.stdout, result.stdout + result.stderr
    finally:
        await node.stop()


async def test_lan_signal_endpoint_refuses_oversized_bodies_before_the_callback() -> None:
    node = LanNode(ALICE)
    url = await node.endpoint.start("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/v1/signal", data=b"x" * (MAX_SEALED + 1)) as response:
                assert response.status == 413
            async with session.post(url + "/v1/signal", data=b"small") as response:
                assert response.status == 202
        assert node.signals.qsize() == 1
        assert node.signals.get_nowait() == b"small"
    finally:
        await node.endpoint.stop()
