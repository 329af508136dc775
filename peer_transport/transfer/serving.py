"""The sending end of a study transfer over a link: :class:`StudySender` offers a
prepared study, encodes it while it serves (:meth:`PreparedStudy.encode`), declares each
encoding as it is made and answers the receiver's chunk requests.

The link is anything with ``send_control(bytes)`` and ``send_bulk(bytes)`` coroutines
(:class:`TransferLink`); ``send_bulk`` waits while the bulk queue is full, which is
where backpressure comes from. :mod:`.runner` puts a store and an audit log around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Protocol

from peer_transport.transfer.errors import IllegalTransition, RemoteTransferError
from peer_transport.transfer.machine import Event, State
from peer_transport.transfer.manifest import Manifest
from peer_transport.transfer.messages import (
    Cancel,
    Hurry,
    Message,
    OfferPart,
    ResumeRequest,
    from_wire,
)
from peer_transport.transfer.prepared import PreparedStudy
from peer_transport.transfer.receiver import DEFAULT_TIMEOUT
from peer_transport.transfer.sender import Sender

log = logging.getLogger(__name__)

INBOX_LIMIT = 1024  # control messages queued from the link before new ones are dropped
REOFFER_AFTER = 2 * DEFAULT_TIMEOUT  # seconds without a message before offering again


class TransferLink(Protocol):
    async def send_control(self, data: bytes) -> None: ...

    async def send_bulk(self, data: bytes) -> None: ...


class StudySender:
    """Offers a prepared study, encodes it while it serves, and answers the receiver's
    chunk requests for the instances declared so far."""

    def __init__(self, study: PreparedStudy, link: TransferLink) -> None:
        self.study = study
        self.link = link
        self.protocol = Sender(study.manifest, study.wire, study.signed, study.sign_wires)
        for announced in study.announced.values():  # entries known before encoding
            self.protocol.announce(announced)
        for declaration in study.declared.values():  # encoded before (from_files)
            self.protocol.declare(declaration)
        self._inbox: asyncio.Queue[Message] = asyncio.Queue(INBOX_LIMIT)
        self._wake = asyncio.Event()

    @property
    def manifest(self) -> Manifest:
        return self.study.manifest

    @property
    def state(self) -> State:
        return self.protocol.machine.state

    @property
    def chunks_sent(self) -> int:
        return self.protocol.chunks_sent

    def on_control(self, data: bytes) -> None:
        message = from_wire(data)
        with contextlib.suppress(asyncio.QueueFull):  # the receiver asks again on timeout
            self._inbox.put_nowait(message)
        self._wake.set()

    def _declared(self, index: int) -> None:
        self.protocol.declare(self.study.declared[index])
        self._wake.set()

    def _announced(self, index: int) -> None:
        self.protocol.announce(self.study.announced[index])
        self._wake.set()

    async def _offer(self, parts: Sequence[OfferPart]) -> None:
        for part in parts:
            await self.link.send_control(part.to_wire())

    async def _declare(self, now: float, flush: bool) -> None:
        for declaration in self.protocol.declarations(now, flush):
            await self.link.send_control(declaration.to_wire())

    async def run(self) -> State:
        """Offer, then encode and serve requests until the receiver finishes or cancels.

        A restarted receiver asks for the offer again (ResumeRequest); for one that
        does not, the offer is repeated while no message comes (a running receiver
        ignores it). A file that cannot be encoded cancels the transfer (the receiver
        is told why) and its BadInstance is raised.
        """
        loop = asyncio.get_running_loop()
        await self._offer(self.protocol.offer(loop.time()))
        encoder = loop.create_task(self.study.encode(self._declared, self._announced))
        encoder.add_done_callback(lambda _t: self._wake.set())
        heard = loop.time()
        try:
            while self.protocol.machine.state not in (State.COMPLETE, State.CANCELLED):
                self._wake.clear()
                now = loop.time()
                if encoder.done() and encoder.exception() is not None:
                    await self._fail(encoder.exception())
                await self._declare(now, flush=encoder.done())
                if not self._inbox.empty():
                    heard = now
                    await self._handle(self._inbox.get_nowait(), now)
                    continue
                if now - heard >= REOFFER_AFTER:
                    heard = now
                    await self._offer(self.protocol.offer(now))
                    continue
                wait = REOFFER_AFTER - (now - heard)
                due = self.protocol.next_declaration_at()
                if due is not None:
                    wait = min(wait, max(0.0, due - now))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
        finally:
            encoder.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await encoder
        return self.protocol.machine.state

    async def _fail(self, error: BaseException | None) -> None:
        """Encoding failed: tell the receiver why, stop serving, raise."""
        reason = f"the sender could not encode the study: {error}"
        with contextlib.suppress(IllegalTransition):
            self.protocol.machine.fire(Event.CANCEL)
        await self.link.send_control(Cancel(self.manifest.transfer_id, reason).to_wire())
        assert error is not None  # noqa: S101 -- called for a failed encoder
        raise error

    async def _handle(self, message: Message, now: float) -> None:
        if isinstance(message, ResumeRequest):
            await self._offer(self.protocol.resume(message, now))
            return
        try:
            chunks = self.protocol.receive(message)
        except RemoteTransferError as exc:
            log.warning("ignoring a bad transfer request: %s", exc)
            return
        if isinstance(message, Hurry) and self.protocol.hurried is not None:
            self.study.hurry(self.protocol.hurried)
            self.protocol.hurried = None
        for chunk in chunks:
            await self.link.send_bulk(chunk.to_wire())
