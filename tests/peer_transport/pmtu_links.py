"""What the path MTU tests do on a connected pair (the tests in this process and the
network-namespace peer, ``pmtu_netns_peer``, alike): wait on the search, send bulk."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

from peer_transport import sctp
from peer_transport.pmtu import State


async def until(search: sctp.PathMtu, done: Callable[[], bool], limit: float = 20) -> None:
    """Wait (bounded) until ``done()``, looking again after each step of the search."""
    async with asyncio.timeout(limit):
        while not done():
            search.stepped.clear()
            await search.stepped.wait()


async def settled(search: sctp.PathMtu, state: State) -> None:
    """Wait until the search reaches ``state`` with no probe in flight."""
    await until(search, lambda: search.search.state is state and search.search.probing is None)


def random_messages(count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.randrange(1, 64 * 1024)) for _ in range(count)]


async def bulk(
    link_a: Any,
    link_b: Any,
    messages: list[bytes],
    *,
    at: tuple[int, Callable[[], None]] | None = None,
) -> list[bytes]:
    """Send ``messages`` from a to b and return what b got, in order; ``at=(n, act)``
    runs ``act`` as the n-th message arrives (the path changes under the transfer)."""
    got: list[bytes] = []
    done = asyncio.Event()

    def on_bulk(data: bytes) -> None:
        got.append(data)
        if at is not None and len(got) == at[0]:
            at[1]()
        if len(got) == len(messages):
            done.set()

    link_b.attach(lambda _d: None, on_bulk)
    for data in messages:
        await link_a.send_bulk(data)
    await asyncio.wait_for(done.wait(), 60)
    return got
