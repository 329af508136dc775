"""Signaling: how the SDP offer and answer reach the other node.

A :class:`Signaling` moves opaque sealed bytes (``crypto.envelope.seal``) to a
peer and hands over the sealed bytes that arrive for this node. It is never
trusted: :class:`SignalMessage` bodies are opened with ``open_sealed`` (signed
by the sender, sealed to us, nonce + expiry + ReplayGuard) before any SDP they
carry reaches ``setRemoteDescription``.

Implementations:

- :class:`MemorySignalingHub` / :class:`MemorySignaling`: in-memory, for tests
  (with an ``intercept`` hook that plays the untrusted relay);
- :class:`StreamSignaling`: length-prefixed over one byte stream (two processes).

A running node signals through its own router (``node.app.courier.SignalRouter``):
the peer's LAN endpoint first, then its registries' WebSockets.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from crypto.envelope import ReplayGuard, open_sealed, seal
from crypto.errors import CryptoError
from crypto.identity import Identity
from peer_transport.errors import SignalingError

log = logging.getLogger(__name__)

SIGNAL_TYPE = "rtc-signal"
MAX_SIGNAL = 64 * 1024  # checked before decrypting
SIGNAL_TTL = 120
QUEUE_SIZE = 256
KINDS = ("offer", "answer", "reject")


class Signaling(Protocol):
    async def send(self, to: bytes, sealed: bytes) -> None:
        """Deliver ``sealed`` to the node whose Ed25519 public key is ``to``."""
        ...

    async def receive(self) -> bytes:
        """The next sealed message that arrived for this node."""
        ...


@dataclass(frozen=True)
class SignalMessage:
    """An offer, answer or rejection for one connection attempt (``session``)."""

    kind: str
    session: bytes
    sdp: str = ""
    reason: str = ""

    def to_body(self) -> dict[str, Any]:
        return {"k": self.kind, "sid": self.session, "sdp": self.sdp, "r": self.reason}

    @classmethod
    def from_body(cls, body: Any) -> SignalMessage:
        if not isinstance(body, dict) or set(body) != {"k", "sid", "sdp", "r"}:
            raise SignalingError("signal message has the wrong fields")
        kind, sid, sdp, reason = body["k"], body["sid"], body["sdp"], body["r"]
        if kind not in KINDS or not isinstance(sid, bytes) or len(sid) != 16:
            raise SignalingError("signal message has a bad kind or session id")
        if not isinstance(sdp, str) or not isinstance(reason, str) or len(reason) > 500:
            raise SignalingError("signal message has a bad SDP or reason")
        return cls(kind, sid, sdp, reason)

    def seal(self, sender: Identity, recipient: bytes, now: int) -> bytes:
        return seal(sender, recipient, SIGNAL_TYPE, self.to_body(), now=now, ttl=SIGNAL_TTL)

    @classmethod
    def open(
        cls, recipient: Identity, data: bytes, now: int, guard: ReplayGuard
    ) -> tuple[bytes, SignalMessage]:
        """(sender public key, message); raises SignalingError for anything untrustworthy."""
        if len(data) > MAX_SIGNAL:
            raise SignalingError(f"signal is {len(data)} bytes, limit is {MAX_SIGNAL}")
        try:
            sealed = open_sealed(
                recipient, data, SIGNAL_TYPE, now=now, replay_guard=guard, max_size=MAX_SIGNAL
            )
        except CryptoError as exc:
            raise SignalingError(f"signal refused: {exc}") from exc
        return sealed.sender, cls.from_body(sealed.body)


class MemorySignaling:
    def __init__(self, hub: MemorySignalingHub, public_key: bytes) -> None:
        self._hub = hub
        self.public_key = public_key
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue(QUEUE_SIZE)

    async def send(self, to: bytes, sealed: bytes) -> None:
        await self._hub.route(self.public_key, to, sealed)

    async def receive(self) -> bytes:
        return await self.inbox.get()


class MemorySignalingHub:
    """Routes sealed bytes between endpoints. ``intercept(sender, to, data)`` may
    return replacement bytes (or None to drop): the untrusted relay in attack tests."""

    def __init__(self) -> None:
        self._endpoints: dict[bytes, MemorySignaling] = {}
        self.intercept: Callable[[bytes, bytes, bytes], bytes | None] | None = None
        self.log: list[tuple[bytes, bytes, bytes]] = []

    def endpoint(self, public_key: bytes) -> MemorySignaling:
        endpoint = MemorySignaling(self, public_key)
        self._endpoints[public_key] = endpoint
        return endpoint

    async def route(self, sender: bytes, to: bytes, data: bytes) -> None:
        self.log.append((sender, to, data))
        if self.intercept is not None:
            replaced = self.intercept(sender, to, data)
            if replaced is None:
                return
            data = replaced
        endpoint = self._endpoints.get(to)
        if endpoint is None:
            raise SignalingError("no such peer on this signaling hub")
        endpoint.inbox.put_nowait(data)

    async def inject(self, to: bytes, data: bytes) -> None:
        self._endpoints[to].inbox.put_nowait(data)


class StreamSignaling:
    """Point-to-point signaling over one byte stream (length-prefixed sealed messages).

    For two processes joined by a socket (benchmarks, network-namespace tests);
    whoever sits on the other end of the stream only relays opaque sealed bytes.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, to: bytes, sealed: bytes) -> None:
        if len(sealed) > MAX_SIGNAL:
            raise SignalingError(f"signal is {len(sealed)} bytes, limit is {MAX_SIGNAL}")
        self.writer.write(len(sealed).to_bytes(4, "big") + sealed)
        await self.writer.drain()

    async def receive(self) -> bytes:
        size = int.from_bytes(await self.reader.readexactly(4), "big")
        if size > MAX_SIGNAL:
            raise SignalingError(f"signal is {size} bytes, limit is {MAX_SIGNAL}")
        return await self.reader.readexactly(size)


__all__ = [
    "MemorySignaling",
    "MemorySignalingHub",
    "SignalMessage",
    "Signaling",
    "StreamSignaling",
]
