"""The peer session lifecycle as tables, and bulk credit as a pure object (no I/O here).

Two machines, one per level:

- a **link** (one WebRTC connection, or one memory link, and its crypto) goes
  ``CONNECTING`` (offer/answer, ICE, DTLS) -> ``HANDSHAKING`` (the SIGMA exchange
  on the control channel, frames in clear) -> ``OPEN`` (keys in place: every frame
  sealed) -> ``DOWN``, from any state. A link never comes back: a reconnect is a
  new link.
- a **connection** (:class:`~peer_transport.connection.PeerConnection`, what the
  application holds) survives links: ``CONNECTING`` -> ``OPEN`` when its first link
  is open, ``OPEN`` -> ``RECONNECTING`` when that link is lost and the connection
  may come back, ``RECONNECTING`` -> ``OPEN`` with the next link, and ``CLOSED``
  from anywhere, for good. An ``OPEN`` connection may take a new link (the peer
  called again: a restart, or a reconnect it noticed first).

::

    link:        CONNECTING --up--> HANDSHAKING --keyed--> OPEN
                      |                  |                   |
                      +------ fail ------+------ fail -------+--> DOWN

    connection:  CONNECTING --attach--> OPEN --lost--> RECONNECTING
                                        ^  |                 |
                                        |  +-- attach: the   |
                                        |      peer called   |
                                        +------ attach ------+
                 close, from every state but CLOSED --> CLOSED

:class:`BulkCredit` is the bulk channel's flow control: how many chunks may be
unconsumed by the peer (a smaller window while presence flows, so a cursor never
queues behind much bulk in SCTP's one send queue), and which acknowledgements
are plausible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from crypto.statetable import TransitionTable
from peer_transport.errors import LocalProtocolError, RemoteProtocolError


class LinkState(Enum):
    CONNECTING = "connecting"
    HANDSHAKING = "handshaking"
    OPEN = "open"
    DOWN = "down"


class LinkEvent(Enum):
    UP = "the link's channels opened"
    KEYED = "the handshake gave session keys"
    FAIL = "the link failed or was closed"


class ConnState(Enum):
    CONNECTING = "connecting"
    OPEN = "open"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"


class ConnEvent(Enum):
    ATTACH = "a new link finished its handshake"
    LOST = "the current link was lost; the connection may come back"
    CLOSE = "the connection was closed"


def _refuse_link(state: LinkState, event: LinkEvent) -> Exception:
    return LocalProtocolError(f"a link that is {state.value} cannot take: {event.value}")


def _refuse_conn(state: ConnState, event: ConnEvent) -> Exception:
    return LocalProtocolError(f"a connection that is {state.value} cannot take: {event.value}")


LINK = TransitionTable[LinkState, LinkEvent](
    {
        (LinkState.CONNECTING, LinkEvent.UP): LinkState.HANDSHAKING,
        (LinkState.HANDSHAKING, LinkEvent.KEYED): LinkState.OPEN,
        (LinkState.CONNECTING, LinkEvent.FAIL): LinkState.DOWN,
        (LinkState.HANDSHAKING, LinkEvent.FAIL): LinkState.DOWN,
        (LinkState.OPEN, LinkEvent.FAIL): LinkState.DOWN,
    },
    _refuse_link,
)

CONNECTION = TransitionTable[ConnState, ConnEvent](
    {
        (ConnState.CONNECTING, ConnEvent.ATTACH): ConnState.OPEN,
        (ConnState.OPEN, ConnEvent.ATTACH): ConnState.OPEN,
        (ConnState.RECONNECTING, ConnEvent.ATTACH): ConnState.OPEN,
        (ConnState.OPEN, ConnEvent.LOST): ConnState.RECONNECTING,
        (ConnState.CONNECTING, ConnEvent.CLOSE): ConnState.CLOSED,
        (ConnState.OPEN, ConnEvent.CLOSE): ConnState.CLOSED,
        (ConnState.RECONNECTING, ConnEvent.CLOSE): ConnState.CLOSED,
    },
    _refuse_conn,
)

LINK_TERMINAL = LINK.terminal(list(LinkState))
CONN_TERMINAL = CONNECTION.terminal(list(ConnState))


@dataclass
class BulkCredit:
    """Credit for the bulk channel of one link (sequence numbers restart with each link).

    The sender numbers chunks from 0; the peer acknowledges the highest chunk its
    application consumed. At most ``window`` chunks are unacknowledged, at most
    ``live_window`` while presence went either way within ``live_quiet`` seconds.
    ``now`` is passed in (the event loop's clock), never read here.
    """

    window: int
    live_window: int
    live_quiet: float
    sent: int = 0  # chunks sent on this link (the next chunk's sequence number)
    acked: int = -1  # highest sequence number the peer acknowledged
    consumed: int = -1  # highest incoming chunk this node's application consumed
    presence_at: float = -math.inf  # when presence last went either way

    def current_window(self, now: float) -> int:
        if now - self.presence_at < self.live_quiet:
            return min(self.window, self.live_window)
        return self.window

    def in_flight(self) -> int:
        return self.sent - self.acked - 1

    def may_send(self, now: float) -> bool:
        return self.in_flight() < self.current_window(now)

    def sent_one(self) -> None:
        """The chunk numbered :attr:`sent` left."""
        self.sent += 1

    def acknowledge(self, seq: int) -> None:
        """The peer consumed every chunk up to ``seq``."""
        if seq >= self.sent:
            raise RemoteProtocolError("the peer acknowledged bulk data never sent")
        self.acked = max(self.acked, seq)

    def consume(self) -> int:
        """This node consumed one more incoming chunk; the acknowledgement to send."""
        self.consumed += 1
        return self.consumed

    def presence(self, now: float) -> None:
        self.presence_at = now

    def new_link(self) -> None:
        """A new link starts its numbering again; presence recency is the peer's, kept."""
        self.sent, self.acked, self.consumed = 0, -1, -1


__all__ = [
    "CONNECTION",
    "CONN_TERMINAL",
    "LINK",
    "LINK_TERMINAL",
    "BulkCredit",
    "ConnEvent",
    "ConnState",
    "LinkEvent",
    "LinkState",
]
