"""Errors raised by :mod:`crypto`.

Every error a person may read says what happened and what to do next.
"""

from __future__ import annotations


class CryptoError(Exception):
    """Base of every error raised by the crypto package."""


class EncodingError(CryptoError):
    """Bytes are not a valid canonical encoding (malformed, non-canonical, too large)."""


class InvalidNodeId(CryptoError):
    """A node id string is malformed or its check characters are wrong."""


class BadSignature(CryptoError):
    """A signature does not verify: the object was altered or signed by someone else."""


class WrongDomain(CryptoError):
    """A signed object of one type was presented where another type was expected."""


class Expired(CryptoError):
    """A signed object is past its expiry time."""


class NotYetValid(CryptoError):
    """A signed object is not valid yet (its validity starts in the future)."""


class Revoked(CryptoError):
    """A certificate or key has been revoked by its organisation."""


class Replayed(CryptoError):
    """A sealed message was seen before (same nonce): a replay."""


class DecryptionFailed(CryptoError):
    """Ciphertext does not authenticate: tampered, truncated or not for this key."""


class WrongPassphrase(CryptoError):
    """The key file passphrase is wrong."""

    def __init__(self) -> None:
        super().__init__(
            "wrong passphrase for the key file: try again, or set RADMESH_PASSPHRASE "
            "to the passphrase chosen at `radmesh init`"
        )


class UntrustedIssuer(CryptoError):
    """A certificate was signed by an organisation key that is not trusted."""
