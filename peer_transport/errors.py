"""Errors raised by :mod:`peer_transport`: one base, split local vs remote.

Messages are written for the person who reads them in a log or on screen:
what happened, and what to do.
"""

from __future__ import annotations


class TransportError(Exception):
    """Base of every error raised by the peer transport."""


class LocalProtocolError(TransportError):
    """This node tried to do something the protocol does not allow (a bug here)."""


class RemoteProtocolError(TransportError):
    """The peer sent something malformed, oversized or out of order; it was disconnected."""


class FrameTooLarge(RemoteProtocolError):
    """A frame exceeded the size cap before it was even decoded."""


class PeerRejected(TransportError):
    """The peer is not trusted (or proved the wrong identity), so no session was opened."""


class HandshakeFailed(PeerRejected):
    """The session handshake failed: bad signature, wrong key, fingerprint mismatch, replay."""


class SignalingError(TransportError):
    """A signaling message could not be delivered or was refused (tampered, replayed, expired)."""


class ConnectionLost(TransportError):
    """The peer stopped answering or the link failed."""


class PeerNotReading(ConnectionLost):
    """The peer stopped acknowledging bulk data for too long; the connection was closed."""


class ConnectTimeout(ConnectionLost):
    """The connection could not be set up in time (no answer, ICE or DTLS failed)."""


class RequestTimeout(TransportError):
    """A request got no response in time; the connection may still be alive."""


class RemoteError(TransportError):
    """The peer's handler for a request failed; ``code`` says how, ``message`` is theirs."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"peer refused the request ({code}): {message}")
        self.code = code
        self.remote_message = message


class ConnectionClosed(TransportError):
    """The connection was closed (by either side); ``reason`` says why."""
