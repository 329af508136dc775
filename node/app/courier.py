"""Sealed messages in and out of a running node.

Two kinds of sealed messages reach a node, over the LAN endpoint or a registry
(relayed live, or kept in the registry's mailbox while the node is offline):
``rtc-signal`` (offer/answer, for the transport) and ``node-msg`` (consult
requests, responses and reports, which need no live connection). Both are
signed by the sender and sealed to the recipient; :class:`SignalRouter` reads
only the type of each one before handing it on, and the consumer opens it with
its checks (expiry, replay, signer).

:class:`Courier` owns that routing for one runtime: the router, the ``node-msg``
handlers the services register by kind, delivery of sealed bytes to a peer (its LAN
endpoint when trusted, else the registries: live or mailbox), and the look-up of an
untrusted sender's record (an organisation this node trusts may vouch for it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import nacl.exceptions
import nacl.public

from consult.errors import ConsultError
from crypto.envelope import SEALED_PREFIX, SignedEnvelope, open_sealed, seal
from crypto.errors import CryptoError
from crypto.identity import Identity, NodeId
from node.app.errors import RuntimeError_
from node.core.errors import NodeError
from peer_transport.errors import SignalingError
from peer_transport.signaling import SIGNAL_TYPE
from registry.errors import RegistryError
from registry.lan import post_signal
from registry.trust import TrustState

if TYPE_CHECKING:
    from node.app.runtime import NodeRuntime

log = logging.getLogger(__name__)

NODE_MSG = "node-msg"
NODE_MSG_TTL = 7 * 24 * 3600  # as long as a registry mailbox keeps it
MAX_NODE_MSG = 60 * 1024
QUEUE_SIZE = 256
LEARN_AGAIN = 60.0  # seconds before an untrusted sender's record is looked up again
MAX_LEARNING = 1024  # untrusted senders remembered for LEARN_AGAIN
MAX_LOOKUPS = 4  # untrusted senders' records looked up at once (more: not looked up)
MessageHandler = Callable[[NodeId, str, bytes], Awaitable[None]]
_UNREADABLE = (nacl.exceptions.CryptoError, CryptoError, ValueError)


def _signed_inside(identity: Identity, sealed: bytes) -> SignedEnvelope | None:
    """The signed envelope inside ``sealed`` (signature not checked), or None."""
    try:
        inner = nacl.public.SealedBox(identity.x25519_private()).decrypt(sealed)
        return SignedEnvelope.from_wire(inner)
    except _UNREADABLE:
        return None


def sealed_signer(identity: Identity, sealed: bytes) -> tuple[str, bytes] | None:
    """(message type, signer key) of ``sealed`` once its signature checks, or None.

    Enough to decide who pays for a message before anything else is done with it;
    the consumer still opens it with every check (recipient, expiry, replay)."""
    envelope = _signed_inside(identity, sealed)
    if envelope is None:
        return None
    try:
        envelope.verify(envelope.type)
    except _UNREADABLE:
        return None
    return envelope.type.removeprefix(SEALED_PREFIX), envelope.signer


@dataclass(frozen=True)
class NodeMessage:
    """The body of a sealed ``node-msg``: a service's message (``wire``) of ``kind``."""

    kind: str
    wire: bytes

    def to_body(self) -> dict[str, Any]:
        return {"kind": self.kind, "wire": self.wire}

    @classmethod
    def from_body(cls, body: Any) -> NodeMessage:
        if not (
            isinstance(body, dict)
            and isinstance(body.get("kind"), str)
            and isinstance(body.get("wire"), bytes)
        ):
            raise RuntimeError_("node message has the wrong shape")
        return cls(body["kind"], body["wire"])


def seal_node_message(identity: Identity, to: bytes, kind: str, wire: bytes, now: int) -> bytes:
    body = NodeMessage(kind, wire).to_body()
    return seal(identity, to, NODE_MSG, body, now=now, ttl=NODE_MSG_TTL)


class SignalRouter:
    """The transport's :class:`~peer_transport.signaling.Signaling`, and the node-msg inbox.

    Outgoing: straight to the peer's LAN endpoint when the directory knows one,
    else through the first registry that takes it. Incoming from every source:
    ``rtc-signal`` goes to the transport, ``node-msg`` to the courier's handlers.
    """

    def __init__(self, courier: Courier) -> None:
        self._courier = courier
        self._rtc: asyncio.Queue[bytes] = asyncio.Queue(QUEUE_SIZE)
        # Offers from keys this node does not trust wait in their own small queue,
        # read only when no trusted signal is waiting: strangers never starve peers.
        self._rtc_strangers: asyncio.Queue[bytes] = asyncio.Queue(QUEUE_SIZE // 8)
        self._arrived = asyncio.Event()
        self.errors = 0  # messages whose handling failed unexpectedly (logged, loop went on)

    async def feed(self, sealed: bytes) -> None:
        """Take one sealed message from any source; never raises (one bad message must
        not end the loop that feeds this)."""
        try:
            await self._feed(sealed)
        except Exception:
            self.errors += 1
            log.exception("a sealed message could not be handled; dropped it and went on")

    async def _feed(self, sealed: bytes) -> None:
        if len(sealed) > MAX_NODE_MSG:
            return
        courier, rt = self._courier, self._courier.rt
        opened = sealed_signer(rt.identity, sealed)
        if opened is None:
            log.info("dropped a sealed message this node cannot open")
            return
        kind, signer = opened
        trusted = rt.trust.is_trusted(signer, rt.now())
        if not trusted and not rt.strangers.allow(signer, rt.clock()):
            return  # over the unknown-key budget: dropped quietly, counted by the gate
        if kind == SIGNAL_TYPE and not trusted and (sender := courier.to_learn(sealed)) is not None:
            rt.spawn(self._learn_then_queue(sender, signer, sealed))
        elif kind == SIGNAL_TYPE:
            self._queue(sealed, trusted)
        elif kind == NODE_MSG:
            await courier.on_node_message(sealed)
        else:
            log.info("dropped a sealed message this node cannot use (%s)", kind)

    def _queue(self, sealed: bytes, trusted: bool) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            (self._rtc if trusted else self._rtc_strangers).put_nowait(sealed)
            self._arrived.set()

    async def _learn_then_queue(self, sender: NodeId, signer: bytes, sealed: bytes) -> None:
        """A call from a node we do not trust yet: its record may carry a certificate from
        an organisation we trust (a consortium member we never looked up)."""
        rt = self._courier.rt
        await self._courier.learn_certificate(sender)
        self._queue(sealed, rt.trust.is_trusted(signer, rt.now()))

    async def send(self, to: bytes, sealed: bytes) -> None:
        """Deliver a signal; a peer this node cannot reach now is the transport's
        :class:`SignalingError` (a reconnect then tries again later, it does not die)."""
        try:
            await self._courier.send_sealed(to, sealed)
        except RuntimeError_ as exc:
            raise SignalingError(str(exc)) from exc

    async def receive(self) -> bytes:
        while True:
            for queue in (self._rtc, self._rtc_strangers):
                if not queue.empty():
                    return queue.get_nowait()
            self._arrived.clear()
            await self._arrived.wait()


class Courier:
    """Routes the sealed messages of one runtime (see the module docstring).

    The runtime's trust store, directory, replay guard, stranger gate and registry
    connections are read when a message comes or goes, so the courier exists before
    they do (services register their handlers before the node starts)."""

    def __init__(self, runtime: NodeRuntime) -> None:
        self.rt = runtime
        self.router = SignalRouter(self)
        self.handlers: dict[str, MessageHandler] = {}
        self._learned: dict[NodeId, float] = {}  # untrusted sender -> when its record was sought
        self._lookups = 0

    # -- out ----------------------------------------------------------------------------
    async def send_message(self, to: bytes, kind: str, wire: bytes) -> str:
        """Send a signed consult message (request, response, report) to a peer."""
        rt = self.rt
        if rt.trust.state(to, rt.now()) is TrustState.REVOKED:
            raise RuntimeError_(
                f"{NodeId.from_public_key(to).short()} was revoked: nothing is sent to it"
            )
        return await self.send_sealed(to, seal_node_message(rt.identity, to, kind, wire, rt.now()))

    async def send_sealed(self, to: bytes, sealed: bytes) -> str:
        """Deliver sealed bytes: LAN endpoint first, then registries (live or mailbox)."""
        node_id = NodeId.from_public_key(to)
        errors: list[str] = []
        for url in await self._lan_urls(to):
            try:
                await post_signal(url, sealed)
                return "delivered (LAN)"
            except RegistryError as exc:
                errors.append(f"LAN {url}: {exc}")
        for url, conn in list(self.rt.registry_connections.items()):
            try:
                return f"{await conn.send(node_id, sealed)} (registry {url})"
            except RegistryError as exc:
                errors.append(f"registry {url}: {exc}")
        raise RuntimeError_(
            f"could not reach {node_id.short()}: "
            + ("; ".join(errors) or "no LAN address known and no registry connected")
            + ". Check `radmesh peers show` and `radmesh doctor`."
        )

    async def _lan_urls(self, to: bytes) -> tuple[str, ...]:
        """A peer's LAN URLs, only when its key is trusted: the URL is the peer's choice,
        so an unknown key must not make this node contact anything (it is reached
        through a registry, which relays to the key and nowhere else; nor is its
        record looked up and kept for it)."""
        rt = self.rt
        if not rt.trust.is_trusted(to, rt.now()):
            return ()
        peer = await rt.directory.resolve(NodeId.from_public_key(to), rt.now())
        return () if peer is None else peer.record.lan_urls

    # -- in -----------------------------------------------------------------------------
    async def on_node_message(self, sealed: bytes) -> None:
        rt = self.rt
        try:
            opened = open_sealed(
                rt.identity,
                sealed,
                NODE_MSG,
                now=rt.now(),
                replay_guard=rt.guard,
                max_size=MAX_NODE_MSG,
            )
            message = NodeMessage.from_body(opened.body)
            handler = self.handlers.get(message.kind)
            if handler is None:
                raise RuntimeError_(f"no handler for node message kind {message.kind!r}")
            await handler(opened.sender_id, message.kind, message.wire)
        except (CryptoError, NodeError, ConsultError, RegistryError) as exc:
            log.warning("refused a node message: %s", exc)

    # -- strangers ----------------------------------------------------------------------
    def to_learn(self, sealed: bytes) -> NodeId | None:
        """The (claimed, not yet verified) signer of a sealed signal if it is not trusted
        and its record was not looked up lately; None otherwise."""
        envelope = _signed_inside(self.rt.identity, sealed)
        if envelope is None:
            return None
        try:
            sender = NodeId.from_public_key(envelope.signer)
        except _UNREADABLE:
            return None
        if self.rt.trust.is_trusted(envelope.signer, self.rt.now()):
            return None
        if self.rt.clock() - self._learned.get(sender, -LEARN_AGAIN) < LEARN_AGAIN:
            return None
        return sender if self._lookups < MAX_LOOKUPS else None

    async def learn_certificate(self, sender: NodeId) -> None:
        """Look up an untrusted sender's published record: the directory keeps the
        organisation certificate it carries, if one this node trusts vouches for it.
        At most once per LEARN_AGAIN per sender, so strangers cannot make us look up."""
        now = self.rt.clock()
        if now - self._learned.get(sender, -LEARN_AGAIN) < LEARN_AGAIN:
            return
        if self._lookups >= MAX_LOOKUPS:
            return
        if len(self._learned) >= MAX_LEARNING:
            self._learned = {k: t for k, t in self._learned.items() if now - t < LEARN_AGAIN}
            if len(self._learned) >= MAX_LEARNING:
                return
        self._learned[sender] = now
        self._lookups += 1
        try:
            with contextlib.suppress(RegistryError):
                await self.rt.directory.resolve(sender, self.rt.now())
        finally:
            self._lookups -= 1
