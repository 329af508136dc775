"""Two whole nodes on loopback: `send` and `fetch` move a stored study, both audit it."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest

from bench.bench_codec import ct_series
from node.app.sending import progress_line, send_to_peer
from node.cli.transfer import fetch_from_peer
from peer_transport.transfer.machine import State
from peer_transport.transfer.progress import Progress
from tests.node.pair import two_trusted_nodes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


async def test_send_and_fetch_between_two_trusted_nodes(tmp_path: Path) -> None:
    async with two_trusted_nodes(tmp_path) as (a, b):
        alice, bob = a.identity, b.identity
        files = ct_series(6, seed=51, size=256)
        study_uid = {a.store.add_bytes(f, source="test").study_uid for f in files}.pop()
        shown = io.StringIO()
        fetching = asyncio.create_task(fetch_from_peer(b, str(alice.node_id), 30, shown))
        state = await send_to_peer(a, study_uid, str(bob.node_id), identified=True)
        progress = await asyncio.wait_for(fetching, 30)
        assert state is State.COMPLETE
        assert progress.instances_done == 6
        for row in a.store.instances(study_uid):
            uid = row.sop_instance_uid
            assert b.store.read_instance(uid) == a.store.read_instance(uid)
        assert "6/6" in shown.getvalue()
        assert [r.peer for r in a.audit.records(kind="transfer")] == [str(bob.node_id)]
        assert [r.peer for r in b.audit.records(kind="receive")] == [str(alice.node_id)]


def test_progress_line_shows_bar_counts_rate_and_eta() -> None:
    line = progress_line(Progress(50_000_000, 100_000_000, 3, 6, 2_000_000.0, 25.0))
    assert line.startswith("[" + "#" * 15 + "." * 15 + "]")
    assert "3/6" in line
    assert "2.0 MB/s" in line
    assert "25 s" in line
