"""Two aiortc peers over ``lo`` inside a network namespace whose ``lo`` MTU the test sets
(tests/peer_transport/test_pmtu.py runs this with ``ip netns exec``): the kernel, not
a simulation, refuses datagrams with DF set above the MTU and fragments the others.

``python -m tests.peer_transport.pmtu_netns_peer static|shrink``; prints one JSON line.
``static``: ``lo`` is already at 1,500 bytes. ``shrink``: ``lo`` starts at 65,536 and
drops to 1,500 once ten messages of the transfer have arrived.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

from bench import bench_transfer as rtc_link
from peer_transport import sctp
from peer_transport.pmtu import State
from tests.peer_transport.pmtu_links import bulk, random_messages, settled


def _received_sizes(pc: Any) -> list[int]:
    """Sizes of the datagrams this peer's ICE transport hands to DTLS (reassembled)."""
    ice = pc.sctp.transport.transport
    inner = ice._recv
    sizes: list[int] = []

    async def recv() -> bytes:
        data: bytes = await inner()
        sizes.append(len(data))
        return data

    ice._recv = recv
    return sizes


async def main(mode: str) -> dict[str, Any]:
    rtc_link.loopback_only()
    pc_a, link_a = rtc_link.peer()
    pc_b, link_b = rtc_link.peer()
    a, _b = sctp.path_mtu(pc_a.sctp), sctp.path_mtu(pc_b.sctp)
    arrived = _received_sizes(pc_b)
    await rtc_link.finish(pc_a, await rtc_link.answer(pc_b, await rtc_link.offer(pc_a)))
    async with asyncio.timeout(15):
        await asyncio.gather(rtc_link.wait_open(link_a), rtc_link.wait_open(link_b))
    await settled(a, State.DONE)
    confirmed = a.size
    messages = random_messages(60, seed=1)
    before_shrink: list[int] = []

    def shrink() -> None:
        before_shrink.extend(arrived)
        arrived.clear()
        subprocess.run(["ip", "link", "set", "lo", "mtu", "1500"], check=True, timeout=10)

    got = await bulk(link_a, link_b, messages, at=(10, shrink) if mode == "shrink" else None)
    result = {
        "confirmed": confirmed,
        "probes": a.probes,
        "size": a.size,
        "black_holes": a.search.black_holes,
        "exact": got == messages,
        "largest_before": max(before_shrink, default=0),
        "largest": max(arrived, default=0),
        "over_mtu": sum(1 for n in arrived if n > 1500 - 28),
    }
    for pc in (pc_a, pc_b):
        await pc.close()
    return result


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1]))), flush=True)
