"""The sending side of one study transfer, sans-IO: requests in, chunks out.

The sender offers the signed manifest (in parts, on the control channel) and answers
chunk requests from the wire encodings ``source(index)`` gives it. It keeps nothing
but a one-instance cache: the receiver pulls, so the receiver's window is the credit.

A receiver restarted with an unfinished spool asks for the offer again
(:class:`~peer_transport.transfer.messages.ResumeRequest`); a sender still serving that
transfer offers it again at once (:meth:`Sender.resume`). A request for a transfer
the sender does not serve (finished, withdrawn, another study) is ignored, not
refused: a refusal would tell the asker which transfers this node serves, and the
asker loses nothing by waiting for an offer.
"""

from __future__ import annotations

from collections.abc import Callable

from peer_transport.transfer.errors import LocalTransferError, MalformedMessage
from peer_transport.transfer.machine import Event, Machine, State
from peer_transport.transfer.manifest import Manifest
from peer_transport.transfer.messages import (
    Cancel,
    Chunk,
    Finished,
    Message,
    OfferPart,
    Request,
    ResumeRequest,
    chunk_digest,
    offer_parts,
)

REOFFER_MIN_INTERVAL = 1.0  # seconds between offers for resume requests with no request between


class Sender:
    """Answers chunk requests for one offered study. Stateless apart from a small cache.

    One Sender serves one peer (the runner gives it that peer's messages only), so
    whoever sends it a :class:`ResumeRequest` is the recipient the study was offered to.
    """

    def __init__(self, manifest: Manifest, source: Callable[[int], bytes], signed: bytes) -> None:
        self.manifest = manifest
        self.signed = signed
        self.machine = Machine()
        self._source = source
        self._cached: tuple[int, bytes] | None = None
        self._offered_at: float | None = None
        self._requested_since_offer = False
        self.chunks_sent = 0

    def offer(self, now: float) -> list[OfferPart]:
        """The signed manifest, in parts, to send on the control channel."""
        self._offered_at, self._requested_since_offer = now, False
        return offer_parts(self.signed, self.manifest.transfer_id)

    def resume(self, request: ResumeRequest, now: float) -> list[OfferPart]:
        """Offer again at once for a receiver that restarted mid-transfer.

        Nothing for another transfer id, for a transfer that is over (a finished or
        cancelled share is never served again), or when the last offer went out less
        than REOFFER_MIN_INTERVAL ago and no request came since (a receiver repeating
        itself gets no flood of manifests).
        """
        recent = self._offered_at is not None and now - self._offered_at < REOFFER_MIN_INTERVAL
        if (
            request.transfer_id != self.manifest.transfer_id
            or self.machine.state not in (State.OFFERED, State.RUNNING)
            or (recent and not self._requested_since_offer)
        ):
            return []
        return self.offer(now)

    def _wire(self, index: int) -> bytes:
        if self._cached is None or self._cached[0] != index:
            wire = self._source(index)
            if len(wire) != self.manifest.entries[index].wire_size:
                raise LocalTransferError(f"wire encoding of instance {index} changed size")
            self._cached = (index, wire)
        return self._cached[1]

    def receive(self, message: Message) -> list[Chunk]:
        if message.transfer_id != self.manifest.transfer_id:
            raise MalformedMessage("message for another transfer")
        if isinstance(message, Cancel):
            self.machine.fire(Event.CANCEL)
            return []
        if isinstance(message, Finished):
            self.machine.fire(Event.FINISH)
            self._cached = None
            return []
        if not isinstance(message, Request):
            raise MalformedMessage(
                "the sender only takes requests, cancel and finished (resume goes to resume())"
            )
        if self.machine.state is State.OFFERED:
            self.machine.fire(Event.ACCEPT)
        self.machine.fire(Event.DATA)
        self._requested_since_offer = True
        if not 0 <= message.index < len(self.manifest.entries):
            raise MalformedMessage(f"request for instance {message.index}, not in the manifest")
        entry = self.manifest.entries[message.index]
        size = self.manifest.chunk_size
        if any(s >= entry.chunk_count(size) for s in message.seqs):
            raise MalformedMessage("request for a chunk past the end of the instance")
        wire = self._wire(message.index)
        out = []
        for seq in message.seqs:
            data = wire[seq * size : (seq + 1) * size]
            out.append(
                Chunk(self.manifest.transfer_id, message.index, seq, chunk_digest(data), data)
            )
        self.chunks_sent += len(out)
        return out
