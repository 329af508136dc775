"""In-memory links: the four channels of :class:`~peer_transport.rtc.RtcLink` without aiortc.

``TransportOptions(link=MemoryNetwork())`` makes a :class:`Transport` (and a
``NodeRuntime`` given those options) use memory links instead of WebRTC. Only the
link is fake: the offer and answer still travel as sealed, signed, replay-guarded
signals through whatever signaling the transport has, each side's SDP carries its
own (random, distinct) sha-256 fingerprint, and the SIGMA handshake bound to both
fingerprints and the per-channel encryption run on top exactly as over DTLS.

The offer names its link by a token in the SDP; the answer names the answering
link. When the offerer takes the answer, the two links join and both open: a
signal that never arrives (a relay that drops or spoils it) leaves ``wait_open`` to
time out, as ICE would. The ordered channels are reliable and keep their order
(delivery through the event loop, in send order); ``presence`` may lose or delay
messages (``presence_loss``, ``presence_delay``), as an unordered channel with no
retransmits does. :meth:`MemoryLink.partition` silently stops traffic both ways
(a frozen peer or a lost path); :meth:`MemoryLink.fail` takes the link down on
both sides (a failed connection).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import weakref
from collections.abc import Callable, Sequence

from peer_transport.errors import ConnectTimeout, LocalProtocolError
from peer_transport.rtc import CHANNELS, RtcOptions, SdpPair

_NAME_LINE = "a=x-radmesh-memory:"


def _sdp(kind: str, token: str, fingerprint: str) -> str:
    return "\r\n".join(
        [
            "v=0",
            f"o=- {int.from_bytes(os.urandom(4), 'big')} 0 IN IP4 127.0.0.1",
            f"s=radmesh memory {kind}",
            f"a=fingerprint:sha-256 {fingerprint}",
            f"{_NAME_LINE}{token}",
            "",
        ]
    )


def _token(sdp: str) -> str | None:
    for line in sdp.splitlines():
        if line.startswith(_NAME_LINE):
            return line.removeprefix(_NAME_LINE).strip()
    return None


class MemoryNetwork:
    """Where memory links find each other; pass it as ``TransportOptions(link=...)``.

    ``presence_loss``: a pattern applied in turn to presence messages (True: lost),
    e.g. ``(False, True)`` loses every second one. ``presence_delay``: seconds each
    presence message takes (the ordered channels are never delayed or lost).
    """

    def __init__(self, presence_loss: Sequence[bool] = (), presence_delay: float = 0.0) -> None:
        self.presence_loss = tuple(presence_loss)
        self.presence_delay = presence_delay
        self._links: weakref.WeakValueDictionary[str, MemoryLink] = weakref.WeakValueDictionary()

    def __call__(
        self,
        options: RtcOptions,
        on_message: Callable[[str, bytes], None],
        on_down: Callable[[str], None],
    ) -> MemoryLink:
        return MemoryLink(self, on_message, on_down)

    def __repr__(self) -> str:
        return f"MemoryNetwork(presence_loss={self.presence_loss}, delay={self.presence_delay})"


class MemoryLink(SdpPair):
    """One end of a memory link (see the module docstring); a ``rtc.Link``."""

    def __init__(
        self,
        network: MemoryNetwork,
        on_message: Callable[[str, bytes], None],
        on_down: Callable[[str], None],
    ) -> None:
        super().__init__()
        self._network = network
        self._on_message = on_message
        self._on_down = on_down
        self._token = os.urandom(12).hex()
        self._fingerprint = ":".join(f"{b:02X}" for b in os.urandom(32))
        self._expected: str | None = None  # the offerer's token, on the answering side
        self._peer: MemoryLink | None = None
        self._open = asyncio.Event()
        self._down = False
        self._partitioned = False
        self._presence = itertools.cycle(network.presence_loss or (False,))
        network._links[self._token] = self

    @property
    def is_down(self) -> bool:
        return self._down

    async def create_offer(self) -> str:
        self.local_sdp = _sdp("offer", self._token, self._fingerprint)
        return self.local_sdp

    async def accept_offer(self, sdp: str) -> str:
        self._take_remote(sdp)
        self._expected = _token(sdp)
        self.local_sdp = _sdp("answer", self._token, self._fingerprint)
        return self.local_sdp

    async def accept_answer(self, sdp: str) -> None:
        self._take_remote(sdp)
        token = _token(sdp)
        peer = self._network._links.get(token) if token is not None else None
        if peer is None or peer._expected != self._token or peer._down or self._down:
            return  # no path to such a link: wait_open times out, as ICE would
        self._peer, peer._peer = peer, self
        self._open.set()
        peer._open.set()

    async def wait_open(self, limit: float) -> None:
        try:
            async with asyncio.timeout(limit):
                await self._open.wait()
        except TimeoutError as exc:
            raise ConnectTimeout(
                f"no memory link within {limit:.0f} s: the answer never reached the offerer"
            ) from exc
        if self._down:
            raise ConnectTimeout("the memory link failed while it was being set up")

    def send(self, channel: str, data: bytes) -> None:
        if self._down:
            raise LocalProtocolError("the link is down")
        if channel not in CHANNELS:
            raise LocalProtocolError(f"no channel {channel!r}")
        peer = self._peer
        if peer is None:
            raise LocalProtocolError("the link is not open yet")
        if self._partitioned:
            return
        loop = asyncio.get_running_loop()
        if channel != "presence":
            loop.call_soon(peer._deliver, channel, bytes(data))
        elif not next(self._presence):
            loop.call_later(self._network.presence_delay, peer._deliver, channel, bytes(data))

    def _deliver(self, channel: str, data: bytes) -> None:
        if not self._down and not self._partitioned:
            self._on_message(channel, data)

    def selected_candidate_types(self) -> tuple[str, str] | None:
        return None  # no ICE here

    # -- faults a test injects ---------------------------------------------------------
    def partition(self) -> None:
        """Stop all traffic both ways from now on, telling neither side (a frozen peer)."""
        self._partitioned = True
        if self._peer is not None:
            self._peer._partitioned = True

    def fail(self, reason: str = "memory link failed") -> None:
        """Take the link down on both sides, as a failed WebRTC connection does."""
        for end in (self, self._peer):
            if end is not None:
                asyncio.get_running_loop().call_soon(end._went_down, reason)

    # -- shutdown ----------------------------------------------------------------------
    def _went_down(self, reason: str) -> None:
        if not self._down:
            self._down = True
            self._open.set()  # wake wait_open: it sees _down
            self._on_down(reason)

    async def close(self) -> None:
        if self._down:
            return
        self._down = True
        self._open.set()
        peer = self._peer
        # After whatever this side sent before closing; across a partition the close is
        # lost too (the peer notices the silence, as over a lost path).
        if peer is not None and not self._partitioned:
            asyncio.get_running_loop().call_soon(peer._went_down, "data channel closed")


__all__ = ["MemoryLink", "MemoryNetwork"]
