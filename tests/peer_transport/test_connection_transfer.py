"""The study transfer protocol runs unchanged over an encrypted PeerConnection (ChannelLink)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bench.bench_codec import ct_series
from crypto.identity import Identity
from peer_transport.mux import ChannelLink
from peer_transport.transfer.machine import State
from peer_transport.transfer.prepared import PreparedStudy
from tests.peer_transport.helpers import mesh
from tests.peer_transport.transfer_links import MemoryStore, attached

pytestmark = pytest.mark.timeout(60)


async def test_a_study_crosses_an_encrypted_connection_byte_exact(tmp_path: Path) -> None:
    files = ct_series(6, seed=5, size=256)
    study = await PreparedStudy.from_files(files, Identity.generate())
    async with mesh() as m:
        a, b = await m.node(), await m.node()
        m.trust(a, b)
        link_a = ChannelLink(await a.connect(b.identity.public_key))
        link_b = ChannelLink(await b.accept(10))
        store = MemoryStore()
        sender, receiver = attached(study, link_a, link_b, tmp_path / "spool", store)
        progress, state = await asyncio.wait_for(asyncio.gather(receiver.run(), sender.run()), 40)
    assert state is State.COMPLETE
    assert sorted(store.by_hash.values()) == sorted(files)
    assert progress.instances_done == 6
