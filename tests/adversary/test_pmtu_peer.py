"""A connected peer that lies to the path MTU search (peer_transport.sctp.PathMtu).

The peer is authenticated (DTLS, the handshake), so what it can do is confirm probes
that never arrived: it sees our nonce in the probes that do. The search cannot tell a
forged confirmation of the size being probed from a real one; what keeps the link
whole is the black-hole detection (data at that size keeps being lost: back to the
base size). A confirmation of any other size, or of the wrong shape, changes nothing.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from aiortc import rtcsctptransport as stock

from peer_transport import sctp
from peer_transport.pmtu import State
from tests.peer_transport.pmtu_links import bulk, random_messages, settled, until
from tests.peer_transport.test_pmtu import BASE, GCM, _close, _pair

pytestmark = pytest.mark.webrtc


async def _forge_ack(pc: Any, info: bytes) -> None:
    """The peer sends a HEARTBEAT-ACK carrying ``info``, as if echoing our probe."""
    chunk = stock.HeartbeatAckChunk()
    chunk.params = [(sctp.HEARTBEAT_INFO, info)]
    await pc.sctp._send_chunk(chunk)


def _probe_info(search: sctp.PathMtu, size: int) -> bytes:
    return sctp.PROBE + search.nonce + struct.pack("!I", size)


async def test_a_forged_confirmation_of_a_size_the_path_drops_ends_in_a_fallback() -> None:
    mtu = 4000 + GCM + 20  # the path carries 4,000-byte packets, not 8,876
    pc_a, link_a, pc_b, link_b, (a, _b), (path_a, _path_b) = await _pair(mtu=mtu)
    try:
        assert a is not None
        await until(a, lambda: a.search.probing == 8876)  # a probe the peer cannot see
        await _forge_ack(pc_b, _probe_info(a, 8876))
        await until(a, lambda: a.size == 8876, limit=10)
        messages = random_messages(30, seed=21)
        assert await bulk(link_a, link_b, messages) == messages  # every byte, in order
        assert a.search.black_holes == 1
        assert a.size == BASE
        assert path_a.dropped  # the lie cost some lost packets, nothing more
    finally:
        await _close(pc_a, pc_b)


async def test_confirmations_of_other_sizes_or_shapes_change_nothing() -> None:
    pc_a, link_a, pc_b, link_b, (a, _b), _paths = await _pair(mtu=1384 + GCM + 20)
    try:
        assert a is not None
        await settled(a, State.DONE)
        assert a.size == 1384
        forged = [
            _probe_info(a, 16384),  # a size nobody probes now
            _probe_info(a, 8876) + b"x",  # one byte too long
            sctp.PROBE + bytes(8) + struct.pack("!I", 4000),  # another nonce
            sctp.PROBE + a.nonce,  # no size
        ]
        for info in forged:
            await _forge_ack(pc_b, info)
        canary = random_messages(3, seed=22)  # after the forgeries, on the same association
        assert await bulk(link_a, link_b, canary) == canary
        assert a.size == 1384
        assert a.search.state is State.DONE
        assert a.search.confirmed == 1  # 1,384 only, confirmed by the real path
    finally:
        await _close(pc_a, pc_b)
