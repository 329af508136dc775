"""The study transfer protocol runs unchanged over an encrypted PeerConnection (ChannelLink)."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from bench.bench_codec import ct_series
from crypto.identity import Identity
from peer_transport.mux import ChannelLink
from peer_transport.transfer.machine import State
from peer_transport.transfer.prepared import PreparedStudy
from peer_transport.transfer.runner import StudyReceiver, StudySender
from tests.peer_transport.helpers import mesh

pytestmark = pytest.mark.timeout(60)


class MemoryStore:
    def __init__(self) -> None:
        self.by_hash: dict[str, bytes] = {}

    def has_hash(self, content_hash: str) -> bool:
        return content_hash in self.by_hash

    def add_bytes(self, data: bytes, *, source: str, warm: bool = True) -> str:
        digest = hashlib.sha256(data).hexdigest()
        self.by_hash[digest] = data
        return digest


async def test_a_study_crosses_an_encrypted_connection_byte_exact(tmp_path: Path) -> None:
    files = ct_series(6, seed=5, size=256)
    study = await PreparedStudy.from_files(files, Identity.generate())
    async with mesh() as m:
        a, b = await m.node(), await m.node()
        m.trust(a, b)
        link_a = ChannelLink(await a.connect(b.identity.public_key))
        link_b = ChannelLink(await b.accept(10))
        store = MemoryStore()
        receiver = StudyReceiver(link_b, tmp_path / "spool", store, "peer-a")
        sender = StudySender(study, link_a)
        link_a.attach(sender.on_control, lambda _d: None)
        link_b.attach(receiver.on_control, receiver.on_bulk)
        progress, state = await asyncio.wait_for(asyncio.gather(receiver.run(), sender.run()), 40)
    assert state is State.COMPLETE
    assert sorted(store.by_hash.values()) == sorted(files)
    assert progress.instances_done == 6
