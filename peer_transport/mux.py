"""Study transfers over a :class:`~peer_transport.connection.PeerConnection`:
:class:`ChannelLink` (a ``transfer.runner.TransferLink``) and the per-connection
:class:`TransferMux` that tells several transfers on one connection apart.

The connection knows nothing of transfers: the mux takes the connection's
``message`` and ``bulk`` receivers (:meth:`PeerConnection.set_receiver`) the first
time a link is made on it, and routes what arrives there by transfer id.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

from peer_transport import transfer as tr
from peer_transport.connection import PeerConnection
from peer_transport.errors import RemoteProtocolError

CONTROL_CHANNEL = "message"  # the connection's one-way control messages: offers, requests
BULK_CHANNEL = "bulk"  # the connection's bulk channel: chunks

# One mux per connection, for as long as the connection lives.
_MUXES: weakref.WeakKeyDictionary[PeerConnection, TransferMux] = weakref.WeakKeyDictionary()


class ChannelLink:
    """One study transfer on a PeerConnection, seen as a ``transfer.runner.TransferLink``.

    ``send_control`` travels as control-channel messages, ``send_bulk`` on the
    bulk channel with credit-based backpressure; :meth:`attach` routes the
    transfer's incoming messages to callbacks instead of the event stream. Several
    transfers may share a connection (two consults between the same two nodes):
    they are told apart by transfer id (see :class:`TransferMux`).
    """

    def __init__(self, conn: PeerConnection) -> None:
        self.conn = conn
        self.callbacks: tuple[Callable[[bytes], None], Callable[[bytes], None]] | None = None
        self._mux = TransferMux.of(conn)

    async def send_control(self, data: bytes) -> None:
        self._mux.sending(self, data)
        await self.conn.send_message(data)

    async def send_bulk(self, data: bytes) -> None:
        await self.conn.send_bulk(data)

    def attach(self, on_control: Callable[[bytes], None], on_bulk: Callable[[bytes], None]) -> None:
        self.callbacks = (on_control, on_bulk)
        self._mux.links.append(self)

    def detach(self) -> None:
        """The transfer is over: its messages are no longer routed here."""
        self._mux.remove(self)

    def drop(self, error: RemoteProtocolError) -> None:
        """The peer misbehaved in this transfer (a decompression bomb, an instance that is
        not the one its manifest names): disconnect it, as for a malformed frame."""
        self.conn.drop(error)


class TransferMux:
    """The study transfers of one connection, told apart by transfer id.

    A link is bound to a transfer id when it sends that transfer's offer (a sender)
    or its first chunk request (a receiver). Incoming messages go to the link bound
    to their id; an offer for an id no link holds goes to every link not bound yet
    (receivers waiting for their offer: each takes only the study it expects), and so
    does a wire declaration (it may come before the receiver's first request); other
    messages for unknown ids are dropped (a finished or cancelled transfer's tail).
    """

    def __init__(self, conn: PeerConnection) -> None:
        self.links: list[ChannelLink] = []
        self.bound: dict[bytes, ChannelLink] = {}
        conn.set_receiver(CONTROL_CHANNEL, lambda data: self._route(data, 0))
        conn.set_receiver(BULK_CHANNEL, lambda data: self._route(data, 1))

    @classmethod
    def of(cls, conn: PeerConnection) -> TransferMux:
        """The connection's mux, made (and its receivers taken) on first use."""
        mux = _MUXES.get(conn)
        if mux is None:
            mux = _MUXES[conn] = cls(conn)
        return mux

    def sending(self, link: ChannelLink, data: bytes) -> None:
        kind, transfer_id = tr.peek(data)
        if kind in ("offer", "req", "hurry"):
            self.bound[transfer_id] = link

    def remove(self, link: ChannelLink) -> None:
        if link in self.links:
            self.links.remove(link)
        for transfer_id in [t for t, bound in self.bound.items() if bound is link]:
            del self.bound[transfer_id]

    def _targets(self, data: bytes) -> list[ChannelLink]:
        kind, transfer_id = tr.peek(data)  # the receiver decodes the rest
        link = self.bound.get(transfer_id)
        if link is not None:
            return [link]
        if kind in ("offer", "wire"):  # a receiver is bound by its first request, later
            held = set(map(id, self.bound.values()))
            return [candidate for candidate in self.links if id(candidate) not in held]
        return []

    def _route(self, data: bytes, channel: int) -> None:  # 0: control, 1: bulk
        for link in self._targets(data):
            if link.callbacks is not None:
                link.callbacks[channel](data)


__all__ = ["BULK_CHANNEL", "CONTROL_CHANNEL", "ChannelLink", "TransferMux"]
