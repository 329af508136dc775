"""A bare aiortc data-channel pair on 127.0.0.1 for the transfer test and benchmark.

Stand-in until peer_transport/connection.py (handshake, encryption, heartbeat)
lands: two negotiated channels, ``control`` and ``bulk``, and a
:class:`ChannelLink` that gives the transfer runner ``send_control`` and a
``send_bulk`` that waits on ``bufferedamountlow`` (backpressure).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aioice.ice
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

HIGH_WATER = 1 << 20  # bytes queued in SCTP before send_bulk waits
LOW_WATER = 256 << 10


def loopback_only() -> None:
    """Gather only 127.0.0.1 host candidates: tests and benches never touch real NICs."""
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]


class ChannelLink:
    def __init__(self, control: Any, bulk: Any) -> None:
        self.control, self.bulk = control, bulk
        bulk.bufferedAmountLowThreshold = LOW_WATER
        self._low = asyncio.Event()
        bulk.on("bufferedamountlow", self._low.set)

    async def send_control(self, data: bytes) -> None:
        self.control.send(data)

    async def send_bulk(self, data: bytes) -> None:
        while self.bulk.bufferedAmount > HIGH_WATER:
            self._low.clear()
            await asyncio.wait_for(self._low.wait(), 30)
        self.bulk.send(data)

    def attach(self, on_control: Callable[[bytes], None], on_bulk: Callable[[bytes], None]) -> None:
        self.control.on("message", on_control)
        self.bulk.on("message", on_bulk)


def peer() -> tuple[RTCPeerConnection, ChannelLink]:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # never aiortc's public STUN
    control = pc.createDataChannel("control", negotiated=True, id=0)
    bulk = pc.createDataChannel("bulk", negotiated=True, id=1)
    return pc, ChannelLink(control, bulk)


async def wait_open(link: ChannelLink) -> None:
    for channel in (link.control, link.bulk):
        opened = asyncio.Event()
        channel.on("open", opened.set)
        if channel.readyState != "open":
            await opened.wait()


async def offer(pc: RTCPeerConnection) -> dict[str, str]:
    await pc.setLocalDescription(await pc.createOffer())
    return {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}


async def answer(pc: RTCPeerConnection, remote: dict[str, str]) -> dict[str, str]:
    await pc.setRemoteDescription(RTCSessionDescription(**remote))
    await pc.setLocalDescription(await pc.createAnswer())
    return {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}


async def finish(pc: RTCPeerConnection, remote: dict[str, str]) -> None:
    await pc.setRemoteDescription(RTCSessionDescription(**remote))


async def pair() -> tuple[RTCPeerConnection, ChannelLink, RTCPeerConnection, ChannelLink]:
    loopback_only()
    pc_a, link_a = peer()
    pc_b, link_b = peer()
    await finish(pc_a, await answer(pc_b, await offer(pc_a)))
    async with asyncio.timeout(15):
        await asyncio.gather(wait_open(link_a), wait_open(link_b))
    return pc_a, link_a, pc_b, link_b
