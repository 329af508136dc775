"""Test nodes: real Transports with real aiortc, on 127.0.0.1 only, signaling in memory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

from crypto.identity import Identity
from peer_transport.connection import Transport, TransportOptions
from peer_transport.rtc import RtcOptions, restrict_host_addresses
from peer_transport.signaling import MemorySignalingHub

FAST = TransportOptions(
    rtc=RtcOptions(ice_servers=()),  # explicit: never aiortc's public STUN default
    connect_timeout=10.0,
    handshake_timeout=5.0,
    stall_timeout=3.0,
    backoff_initial=0.2,
)


class Mesh:
    """Nodes on one in-memory signaling hub that all trust each other unless told otherwise."""

    def __init__(self) -> None:
        restrict_host_addresses(["127.0.0.1"])
        self.hub = MemorySignalingHub()
        self.trusted: dict[bytes, set[bytes]] = {}
        self.nodes: list[Transport] = []

    async def node(
        self,
        cls: type[Transport] = Transport,
        options: TransportOptions = FAST,
        identity: Identity | None = None,
        **kwargs: object,
    ) -> Transport:
        identity = identity or Identity.generate()
        me = identity.public_key
        self.trusted.setdefault(me, set())
        node = cls(
            identity,
            self.hub.endpoint(me),
            is_trusted=lambda key: key in self.trusted[me],
            options=options,
            **kwargs,  # type: ignore[arg-type]
        )
        await node.start()
        self.nodes.append(node)
        return node

    def trust(self, a: Transport, b: Transport) -> None:
        self.trusted[a.identity.public_key].add(b.identity.public_key)
        self.trusted[b.identity.public_key].add(a.identity.public_key)

    async def close(self) -> None:
        await asyncio.gather(*(n.close() for n in self.nodes), return_exceptions=True)


@asynccontextmanager
async def mesh() -> AsyncIterator[Mesh]:
    m = Mesh()
    try:
        yield m
    finally:
        await m.close()


def with_options(**changes: object) -> TransportOptions:
    return replace(FAST, **changes)  # type: ignore[arg-type]
