"""Test nodes: real Transports over memory links (or real aiortc on 127.0.0.1), signaling
in memory.

Memory links keep the whole security path (signed, sealed offers and answers, the SIGMA
handshake bound to each side's fingerprint, per-channel encryption); only ICE, DTLS and
SCTP are left out. ``mesh(real=True)`` runs the same nodes over aiortc: each layer keeps
one such test, marked ``webrtc``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

from crypto.identity import Identity
from peer_transport.connection import PeerConnection, Transport, TransportOptions
from peer_transport.memory import MemoryLink, MemoryNetwork
from peer_transport.rtc import RtcLink, RtcOptions, restrict_host_addresses
from peer_transport.signaling import MemorySignalingHub

FAST = TransportOptions(
    rtc=RtcOptions(ice_servers=()),  # explicit: never aiortc's public STUN default
    link=MemoryNetwork(),
    connect_timeout=10.0,
    handshake_timeout=5.0,
    stall_timeout=3.0,
    backoff_initial=0.2,
)
REAL = replace(FAST, link=RtcLink)


class Mesh:
    """Nodes on one in-memory signaling hub that all trust each other unless told otherwise."""

    def __init__(self, real: bool = False) -> None:
        restrict_host_addresses(["127.0.0.1"])
        self.defaults = REAL if real else FAST
        self.hub = MemorySignalingHub()
        self.trusted: dict[bytes, set[bytes]] = {}
        self.nodes: list[Transport] = []

    async def node(
        self,
        cls: type[Transport] = Transport,
        options: TransportOptions | None = None,
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
            options=options or self.defaults,
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
async def mesh(real: bool = False) -> AsyncIterator[Mesh]:
    m = Mesh(real)
    try:
        yield m
    finally:
        await m.close()


def with_options(**changes: object) -> TransportOptions:
    return replace(FAST, **changes)  # type: ignore[arg-type]


def current_link(conn: PeerConnection) -> MemoryLink | RtcLink:
    """The link under ``conn`` right now (tests inject faults into it)."""
    session = conn._session
    assert session is not None
    link = session.link
    assert isinstance(link, MemoryLink | RtcLink)
    return link


async def kill_link(conn: PeerConnection) -> None:
    """Fail the link under ``conn`` as a failed connection would (both ends see it go)."""
    link = current_link(conn)
    if isinstance(link, MemoryLink):
        link.fail("the link failed")
    else:
        await link._pc.close()
