"""The aiortc wrapper: with :mod:`peer_transport.sctp` (its SCTP receive-path adapter),
the only module in radmesh that imports aiortc (and aioice).

:class:`RtcLink` is one RTCPeerConnection with four negotiated data channels:

- ``control``  ordered, reliable: handshake, requests/responses, heartbeat;
- ``bulk``     ordered, reliable: study data;
- ``live``     ordered, reliable: shared consult state, chat;
- ``presence`` unordered, ``maxRetransmits=0``: cursors, viewports.

ICE servers always come from the caller (the node's config or its registries);
an empty list is allowed, aiortc's public Google STUN default is never used.
aiortc gathers every candidate before the SDP is final, so there is no trickle
ICE: one offer, one answer. It has no ICE restart either, so a reconnect is a
new :class:`RtcLink`.

Each link's SCTP association acknowledges every second packet instead of every one
(:func:`peer_transport.sctp.delay_acks`, RFC 9260 6.2) and searches for the largest
packet its path carries (:class:`peer_transport.sctp.PathMtu`, RFC 8899: up to a
whole 16 KiB DTLS record on loopback or a jumbo-frame LAN; aiortc's 1,189 bytes on
an ordinary path or with a stock aiortc peer); figures in README.md, Benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aioice.ice
from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.rtcconfiguration import RTCIceTransportPolicy

from peer_transport import sctp
from peer_transport.errors import ConnectTimeout, LocalProtocolError, RemoteProtocolError

log = logging.getLogger(__name__)

CHANNELS = ("control", "bulk", "live", "presence")
MAX_SDP = 16 * 1024  # an SDP with a handful of candidates is ~1-2 KiB


@dataclass(frozen=True)
class IceServer:
    """A STUN or TURN server, e.g. ``IceServer(["turn:127.0.0.1:3478"], "exp:x", "pw")``."""

    urls: tuple[str, ...]
    username: str | None = None
    credential: str | None = None


@dataclass(frozen=True)
class RtcOptions:
    ice_servers: tuple[IceServer, ...] = ()
    relay_only: bool = False  # only TURN-relayed candidates (iceTransportPolicy "relay")


class Link(Protocol):
    """What a connection needs from a link: :class:`RtcLink`, or ``memory.MemoryLink``.

    Four channels (:data:`CHANNELS`); the three ordered ones reliable, ``presence``
    unordered and lossy. Offer and answer are SDP text carrying one sha-256 DTLS
    fingerprint each, which the session handshake binds.
    """

    local_sdp: str
    remote_sdp: str

    @property
    def local_fingerprint(self) -> str: ...

    @property
    def remote_fingerprint(self) -> str: ...

    @property
    def is_down(self) -> bool: ...

    async def create_offer(self) -> str: ...

    async def accept_offer(self, sdp: str) -> str: ...

    async def accept_answer(self, sdp: str) -> None: ...

    async def wait_open(self, limit: float) -> None: ...

    def send(self, channel: str, data: bytes) -> None: ...

    def selected_candidate_types(self) -> tuple[str, str] | None: ...

    async def close(self) -> None: ...


class LinkFactory(Protocol):
    """Makes one link: ``on_message(channel, data)`` per message, ``on_down(reason)`` once."""

    def __call__(
        self,
        options: RtcOptions,
        on_message: Callable[[str, bytes], None],
        on_down: Callable[[str], None],
    ) -> Link: ...


def restrict_host_addresses(addresses: Sequence[str]) -> None:
    """Gather host candidates only on ``addresses`` (tests and benches use 127.0.0.1).

    Process-wide: aioice has no per-connection setting for this.
    """
    chosen = list(addresses)
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: list(chosen)


def dtls_fingerprint(sdp: str) -> str:
    """The sha-256 DTLS fingerprint in an SDP, as ``"sha-256 AB:CD:…"``."""
    if len(sdp) > MAX_SDP:
        raise RemoteProtocolError(f"SDP is {len(sdp)} characters, limit is {MAX_SDP}")
    found = {
        line.split(":", 1)[1].strip()
        for line in sdp.splitlines()
        if line.startswith("a=fingerprint:sha-256 ")
    }
    if len(found) != 1:
        raise RemoteProtocolError("SDP must carry exactly one sha-256 DTLS fingerprint")
    return found.pop()


class SdpPair:
    """The offer and answer a link exchanged, and the DTLS fingerprint each carries (the
    session handshake binds both). The peer's SDP is checked before it is kept."""

    def __init__(self) -> None:
        self.local_sdp = ""
        self.remote_sdp = ""

    @property
    def local_fingerprint(self) -> str:
        return dtls_fingerprint(self.local_sdp)

    @property
    def remote_fingerprint(self) -> str:
        return dtls_fingerprint(self.remote_sdp)

    def _take_remote(self, sdp: str) -> None:
        dtls_fingerprint(sdp)  # size capped, exactly one fingerprint: else refused here
        self.remote_sdp = sdp


def _configuration(options: RtcOptions) -> RTCConfiguration:
    servers = [
        RTCIceServer(urls=list(s.urls), username=s.username, credential=s.credential)
        for s in options.ice_servers
    ]
    policy = RTCIceTransportPolicy.RELAY if options.relay_only else RTCIceTransportPolicy.ALL
    return RTCConfiguration(iceServers=servers, iceTransportPolicy=policy)


class RtcLink(SdpPair):
    """One WebRTC peer connection with radmesh's four channels.

    ``on_message(channel, data)`` is called for each incoming message;
    ``on_down(reason)`` once when the link fails or closes.
    """

    def __init__(
        self,
        options: RtcOptions,
        on_message: Callable[[str, bytes], None],
        on_down: Callable[[str], None],
    ) -> None:
        super().__init__()
        self._pc = RTCPeerConnection(_configuration(options))
        self._on_message = on_message
        self._on_down = on_down
        self._down = False
        self.channels: dict[str, RTCDataChannel] = {}
        for index, name in enumerate(CHANNELS):
            unordered = name == "presence"
            channel = self._pc.createDataChannel(
                name,
                negotiated=True,
                id=index,
                ordered=not unordered,
                maxRetransmits=0 if unordered else None,
            )
            channel.on("message", self._receiver(name))
            channel.on("close", lambda: self._went_down("data channel closed"))
            self.channels[name] = channel
        sctp.delay_acks(self._pc.sctp)  # created with the first data channel
        sctp.mark_in_serial_order(self._pc.sctp)
        self.path_mtu = sctp.path_mtu(self._pc.sctp)
        self._pc.on("connectionstatechange", self._state_changed)

    def _receiver(self, name: str) -> Callable[[Any], None]:
        def receive(data: Any) -> None:
            if isinstance(data, str):
                data = data.encode()
            self._on_message(name, data)

        return receive

    def _state_changed(self) -> None:
        if self._pc.connectionState in ("failed", "closed"):
            self._went_down(f"WebRTC connection {self._pc.connectionState}")

    def _went_down(self, reason: str) -> None:
        if not self._down:
            self._down = True
            self._on_down(reason)

    async def create_offer(self) -> str:
        await self._pc.setLocalDescription(await self._pc.createOffer())
        self.local_sdp = self._pc.localDescription.sdp
        return self.local_sdp

    async def accept_offer(self, sdp: str) -> str:
        """Take the peer's (already verified) offer; return our answer SDP."""
        self._take_remote(sdp)
        await self._pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        await self._pc.setLocalDescription(await self._pc.createAnswer())
        self.local_sdp = self._pc.localDescription.sdp
        return self.local_sdp

    async def accept_answer(self, sdp: str) -> None:
        self._take_remote(sdp)
        await self._pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))

    async def wait_open(self, limit: float) -> None:
        """Wait until all four channels are open (ICE, DTLS and SCTP are up)."""

        async def opened(channel: RTCDataChannel) -> None:
            if channel.readyState == "open":
                return
            event = asyncio.Event()
            channel.on("open", event.set)
            while channel.readyState != "open":
                if self._down:
                    raise ConnectTimeout("the WebRTC connection failed while it was being set up")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.2):  # not wait_for: 3.11's can drop a cancel
                        await event.wait()

        try:
            async with asyncio.timeout(limit):
                await asyncio.gather(*(opened(c) for c in self.channels.values()))
        except TimeoutError as exc:
            raise ConnectTimeout(
                f"no WebRTC connection within {limit:.0f} s: the peer may be offline, or "
                "no network path exists (configure a TURN server)"
            ) from exc

    def send(self, channel: str, data: bytes) -> None:
        if self._down:
            raise LocalProtocolError("the link is down")
        self.channels[channel].send(data)

    def selected_candidate_types(self) -> tuple[str, str] | None:
        """(local, remote) candidate types of the pair ICE nominated, e.g. ("relay", "host")."""
        with contextlib.suppress(AttributeError, KeyError):
            sctp: Any = self._pc.sctp
            connection = sctp.transport.transport._connection
            pair = connection._nominated[1]
            return str(pair.local_candidate.type), str(pair.remote_candidate.type)
        return None

    @property
    def is_down(self) -> bool:
        return self._down

    async def close(self) -> None:
        self._down = True
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await self._pc.close()


__all__ = [
    "CHANNELS",
    "IceServer",
    "Link",
    "LinkFactory",
    "RtcLink",
    "RtcOptions",
    "dtls_fingerprint",
]
