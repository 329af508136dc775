"""The sending side of one study transfer, sans-IO: requests in, chunks out.

The sender offers the signed manifest (in parts, on the control channel), then
declares each instance's wire encoding as it is made (:meth:`Sender.declare`; sent in
signed batches by :meth:`Sender.declarations`, at most one batch per
:data:`DECLARE_EVERY` unless a batch is full), and answers chunk requests for declared
instances from the wire encodings ``source(index)`` gives it. A request for an
undeclared instance is refused (the receiver cannot have asked for it honestly). It
keeps nothing but a one-instance cache: the receiver pulls, so the receiver's window
is the credit. A :class:`~peer_transport.transfer.messages.Hurry` names an instance
to encode next (:attr:`Sender.hurried`, for the encoder), or, for one already
declared, has its declarations sent again (one was lost).

A receiver restarted with an unfinished spool asks for the offer again
(:class:`~peer_transport.transfer.messages.ResumeRequest`); a sender still serving that
transfer offers it again at once (:meth:`Sender.resume`). A request for a transfer
the sender does not serve (finished, withdrawn, another study) is ignored, not
refused: a refusal would tell the asker which transfers this node serves, and the
asker loses nothing by waiting for an offer.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence

from peer_transport.transfer.errors import LocalTransferError, MalformedMessage
from peer_transport.transfer.machine import Event, Machine, State
from peer_transport.transfer.manifest import MAX_DECLARATIONS, Manifest, WireDeclaration
from peer_transport.transfer.messages import (
    Cancel,
    Chunk,
    Declare,
    Finished,
    Hurry,
    Message,
    OfferPart,
    Request,
    ResumeRequest,
    chunk_digest,
    offer_parts,
)

REOFFER_MIN_INTERVAL = 1.0  # seconds between offers for resume requests with no request between
DECLARE_EVERY = 0.1  # seconds between declaration batches (a full batch goes at once)
# Times one instance is declared again for a receiver's hurry: a lost batch needs one; a
# flood of hurries would otherwise turn each small message into a signed batch of 32.
REDECLARE_LIMIT = 3


class Sender:
    """Answers chunk requests for one offered study. Stateless apart from a small cache.

    One Sender serves one peer (the runner gives it that peer's messages only), so
    whoever sends it a :class:`ResumeRequest` is the recipient the study was offered to.
    """

    def __init__(
        self,
        manifest: Manifest,
        source: Callable[[int], bytes],
        signed: bytes,
        sign_wires: Callable[[Sequence[WireDeclaration]], bytes],
    ) -> None:
        self.manifest = manifest
        self.signed = signed
        self.machine = Machine()
        self._source = source
        self._sign_wires = sign_wires
        self.declared: dict[int, WireDeclaration] = {}
        self.announced: dict[int, WireDeclaration] = {}  # entries listed before encoding
        self._unsent: dict[int, None] = {}  # declared, waiting for the next batch (ordered)
        self._redeclared: collections.Counter[int] = collections.Counter()
        self._declared_at = float("-inf")
        self.hurried: int | None = None  # for the encoder: encode this instance next
        self._cached: tuple[int, bytes] | None = None
        self._offered_at: float | None = None
        self._requested_since_offer = False
        self.chunks_sent = 0

    def offer(self, now: float) -> list[OfferPart]:
        """The signed manifest, in parts, to send on the control channel. Every
        declaration made so far goes again with the next :meth:`declarations`."""
        self._offered_at, self._requested_since_offer = now, False
        self._unsent = dict.fromkeys(sorted(self.declared.keys() | self.announced.keys()))
        self._declared_at = float("-inf")
        return offer_parts(self.signed, self.manifest.transfer_id)

    def declare(self, declaration: WireDeclaration) -> None:
        """Instance ``declaration.index`` is encoded: serve it, and declare it in the
        next batch. Declaring it again differently is a bug here."""
        known = self.declared.get(declaration.index)
        if known is not None and known != declaration:
            raise LocalTransferError(f"instance {declaration.index} was encoded twice, differently")
        self.declared[declaration.index] = declaration
        self._unsent[declaration.index] = None

    def announce(self, declaration: WireDeclaration) -> None:
        """Instance ``declaration.index``'s entry is known (its file de-identified), its
        encoding not yet: list it in the next batch, so the receiver can show it."""
        if declaration.index not in self.declared:
            self.announced[declaration.index] = declaration
            self._unsent[declaration.index] = None

    def next_declaration_at(self) -> float | None:
        """When :meth:`declarations` has something to send (None: nothing waits)."""
        if not self._unsent:
            return None
        if len(self._unsent) >= MAX_DECLARATIONS:
            return float("-inf")
        return self._declared_at + DECLARE_EVERY

    def declarations(self, now: float, flush: bool = False) -> list[Declare]:
        """Signed declaration batches due now: at most one round per DECLARE_EVERY
        (the first at once), unless a batch is full or ``flush`` (encoding is over)."""
        due = self.next_declaration_at()
        if due is None or (now < due and not flush):
            return []
        pending = list(self._unsent)
        self._unsent.clear()
        self._declared_at = now
        return [
            Declare(
                self.manifest.transfer_id,
                self._sign_wires(
                    [
                        self.declared.get(i) or self.announced[i]
                        for i in pending[start : start + MAX_DECLARATIONS]
                    ]
                ),
            )
            for start in range(0, len(pending), MAX_DECLARATIONS)
        ]

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
            if len(wire) != self.declared[index].wire_size:
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
        if isinstance(message, Hurry):
            self._hurry(message.index)
            return []
        if not isinstance(message, Request):
            raise MalformedMessage(
                "the sender only takes requests, hurries, cancel and finished "
                "(resume goes to resume())"
            )
        if self.machine.state is State.OFFERED:
            self.machine.fire(Event.ACCEPT)
        self.machine.fire(Event.DATA)
        self._requested_since_offer = True
        if not 0 <= message.index < self.manifest.count:
            raise MalformedMessage(f"request for instance {message.index}, not in the manifest")
        declaration = self.declared.get(message.index)
        if declaration is None:
            raise MalformedMessage(
                f"request for instance {message.index}, not declared yet: refused"
            )
        size = self.manifest.chunk_size
        if any(s >= declaration.chunk_count(size) for s in message.seqs):
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

    def _hurry(self, index: int) -> None:
        if not 0 <= index < self.manifest.count or self.machine.state not in (
            State.OFFERED,
            State.RUNNING,
        ):
            return
        if index not in self.declared:
            self.hurried = index
            return
        # Declared, yet the receiver asks: the batch it was in got lost. Declare that
        # stretch again, at most one batch per hurry and REDECLARE_LIMIT times an instance.
        again = [
            i
            for i in range(index, index + MAX_DECLARATIONS)
            if i in self.declared
            and i not in self._unsent
            and self._redeclared[i] < REDECLARE_LIMIT
        ]
        self._redeclared.update(again)
        self._unsent.update(dict.fromkeys(again))
