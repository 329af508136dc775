"""The study transfer's errors: one base, split into this node's mistakes and the peer's.

A :class:`RemoteTransferError` is what a peer can cause (a damaged chunk, a lying
manifest, a bomb); a :class:`LocalTransferError` is a bug or misuse on this side.
"""

from __future__ import annotations

from peer_transport.errors import LocalProtocolError, RemoteProtocolError, TransportError


class TransferError(TransportError):
    """Base of the study transfer errors."""


class LocalTransferError(TransferError, LocalProtocolError):
    """This node used the protocol wrongly (a bug here, not the peer's fault)."""


class IllegalTransition(LocalTransferError):
    """An action is not allowed in the transfer's current state."""


class TransferCancelled(TransferError):
    """The transfer was cancelled (by this side's user, or the other side said so)."""


class RemoteTransferError(TransferError, RemoteProtocolError):
    """The peer sent something wrong; the transfer cannot trust it."""


class MalformedMessage(RemoteTransferError):
    """A transfer message could not be parsed."""


class ChunkRejected(RemoteTransferError):
    """A chunk was damaged, not requested, or does not fit the declared size."""


class InstanceRejected(RemoteTransferError):
    """An assembled instance does not match what the manifest declared."""


class ManifestMismatch(RemoteTransferError):
    """The peer's manifest and the data it sends disagree; the transfer is stopped."""


class DecompressionBomb(RemoteTransferError):
    """The peer declared more decoded data than its wire bytes or the receiver's budgets
    allow; refused before anything was allocated, and the peer is disconnected."""
