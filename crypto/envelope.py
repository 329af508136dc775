"""Signed and sealed envelopes.

A signed envelope carries ``type``, ``version``, the signer's public key, a
canonical payload and an Ed25519 signature over all of them with a domain
prefix, so a signature made for one message type never verifies as another.

A sealed envelope is a signed envelope that also names its recipient, a random
nonce, an issue time and an expiry, encrypted to the recipient with a libsodium
sealed box. Only the recipient can read it, only the sender can have made it,
and the nonce lets a :class:`ReplayGuard` refuse it a second time.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nacl.exceptions
import nacl.public

from crypto import canonical
from crypto.errors import (
    BadSignature,
    CryptoError,
    DecryptionFailed,
    EncodingError,
    Expired,
    NotYetValid,
    Replayed,
    WrongDomain,
)
from crypto.identity import PUBLIC_KEY_SIZE, Identity, NodeId, verify_signature, x25519_public

SIGNATURE_DOMAIN = b"radmesh/signed-envelope/v1"
SEALED_PREFIX = "sealed:"
NONCE_SIZE = 16
MAX_SEAL_TTL = 7 * 24 * 3600  # a mailbox keeps messages for at most a week
CLOCK_SKEW = 300  # seconds of clock difference tolerated between nodes


def _signing_input(type_: str, version: int, signer: bytes, payload: bytes) -> bytes:
    return SIGNATURE_DOMAIN + canonical.encode([type_, version, signer, payload])


@dataclass(frozen=True)
class SignedEnvelope:
    type: str
    version: int
    signer: bytes
    payload: bytes
    signature: bytes

    @classmethod
    def create(cls, identity: Identity, type_: str, body: Any, version: int = 1) -> SignedEnvelope:
        payload = canonical.encode(body)
        signer = identity.public_key
        signature = identity.sign(_signing_input(type_, version, signer, payload))
        return cls(type_, version, signer, payload, signature)

    def to_wire(self) -> bytes:
        return canonical.encode(
            {
                "t": self.type,
                "v": self.version,
                "k": self.signer,
                "p": self.payload,
                "s": self.signature,
            }
        )

    @classmethod
    def from_wire(cls, data: bytes, max_size: int = canonical.DEFAULT_MAX_SIZE) -> SignedEnvelope:
        raw = canonical.decode(data, max_size)
        if not isinstance(raw, dict) or set(raw) != {"t", "v", "k", "p", "s"}:
            raise EncodingError("not a signed envelope: wrong fields")
        type_, version, signer, payload, signature = (raw[k] for k in ("t", "v", "k", "p", "s"))
        if not (
            isinstance(type_, str)
            and isinstance(version, int)
            and isinstance(signer, bytes)
            and isinstance(payload, bytes)
            and isinstance(signature, bytes)
        ):
            raise EncodingError("not a signed envelope: wrong field types")
        if len(signer) != PUBLIC_KEY_SIZE:
            raise EncodingError("signed envelope: signer key must be 32 bytes")
        return cls(type_, version, signer, payload, signature)

    @property
    def signer_id(self) -> NodeId:
        return NodeId.from_public_key(self.signer)

    def verify(self, expected_type: str, expected_version: int = 1) -> Any:
        """Check type, version and signature; return the decoded payload."""
        if self.type != expected_type:
            raise WrongDomain(f"expected a {expected_type!r} message, got {self.type!r}")
        if self.version != expected_version:
            raise WrongDomain(
                f"{self.type!r} version {self.version} is not supported (need {expected_version})"
            )
        verify_signature(
            self.signer,
            _signing_input(self.type, self.version, self.signer, self.payload),
            self.signature,
        )
        return canonical.decode(self.payload)


def open_signed(
    data: bytes,
    expected_type: str,
    max_size: int,
    *,
    what: str,
    error: Callable[[str], Exception],
) -> tuple[SignedEnvelope, Any]:
    """(envelope, body) of a signed message of ``expected_type``: its size is checked
    before anything is decoded, then its fields and signature. Any failure is raised as
    ``error(text)`` naming ``what`` (the caller's package error: one error base each)."""
    if len(data) > max_size:
        raise error(f"{what} is {len(data)} bytes, limit is {max_size}")
    try:
        envelope = SignedEnvelope.from_wire(data, max_size)
        return envelope, envelope.verify(expected_type)
    except CryptoError as exc:
        raise error(f"{what} does not verify: {exc}") from exc


@dataclass(frozen=True)
class Sealed:
    """What :func:`open_sealed` returns once every check has passed."""

    sender: bytes
    type: str
    body: Any
    nonce: bytes
    issued_at: int
    expires_at: int

    @property
    def sender_id(self) -> NodeId:
        return NodeId.from_public_key(self.sender)


def seal(
    sender: Identity,
    recipient_public_key: bytes,
    type_: str,
    body: Any,
    *,
    now: int,
    ttl: int = 300,
) -> bytes:
    """Sign ``body`` as ``sender`` and encrypt it so only the recipient can open it."""
    if not 0 < ttl <= MAX_SEAL_TTL:
        raise ValueError(f"ttl must be between 1 and {MAX_SEAL_TTL} seconds")
    inner = SignedEnvelope.create(
        sender,
        SEALED_PREFIX + type_,
        {
            "to": recipient_public_key,
            "n": os.urandom(NONCE_SIZE),
            "iat": now,
            "exp": now + ttl,
            "b": body,
        },
    )
    box = nacl.public.SealedBox(nacl.public.PublicKey(x25519_public(recipient_public_key)))
    return bytes(box.encrypt(inner.to_wire()))


def open_sealed(
    recipient: Identity,
    data: bytes,
    expected_type: str,
    *,
    now: int,
    replay_guard: ReplayGuard | None,
    max_size: int = canonical.DEFAULT_MAX_SIZE,
) -> Sealed:
    """Decrypt, verify, and check recipient, time window and replay; raise on any failure."""
    if len(data) > max_size:
        raise EncodingError(f"sealed envelope is {len(data)} bytes, limit is {max_size}")
    try:
        plain = nacl.public.SealedBox(recipient.x25519_private()).decrypt(data)
    except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, ValueError) as exc:
        raise DecryptionFailed("sealed envelope does not decrypt for this node") from exc
    envelope = SignedEnvelope.from_wire(plain, max_size)
    body = envelope.verify(SEALED_PREFIX + expected_type)
    if not isinstance(body, dict) or set(body) != {"to", "n", "iat", "exp", "b"}:
        raise EncodingError("sealed envelope body has wrong fields")
    to, nonce, issued, expires = body["to"], body["n"], body["iat"], body["exp"]
    if to != recipient.public_key:
        # Signed for someone else and re-encrypted to us: a forwarding attack.
        raise BadSignature("sealed envelope was signed for a different recipient")
    if not (isinstance(nonce, bytes) and len(nonce) == NONCE_SIZE):
        raise EncodingError("sealed envelope nonce must be 16 bytes")
    if not (isinstance(issued, int) and isinstance(expires, int)):
        raise EncodingError("sealed envelope times must be integers")
    if expires - issued > MAX_SEAL_TTL:
        raise EncodingError("sealed envelope lifetime exceeds the maximum")
    if now > expires:
        raise Expired("sealed message expired before it arrived; ask the sender to resend")
    if issued > now + CLOCK_SKEW:
        raise NotYetValid("sealed message is dated in the future: check both clocks")
    if replay_guard is not None:
        replay_guard.check_and_remember(envelope.signer, nonce, expires, now)
    return Sealed(envelope.signer, expected_type, body["b"], nonce, issued, expires)


class ReplayGuard:
    """Remembers nonces until they expire; a nonce seen twice is a replay.

    Bounded: messages live at most :data:`MAX_SEAL_TTL`, and the guard holds at
    most ``capacity`` nonces, dropping the soonest-expiring ones first.
    """

    def __init__(self, capacity: int = 100_000) -> None:
        self._capacity = capacity
        self._seen: dict[tuple[bytes, bytes], int] = {}
        # Expiry of the latest message forgotten to make room: anything expiring at or
        # before it may be one of those, so it is refused (eviction never enables replay).
        self._floor = -1

    def __len__(self) -> int:
        return len(self._seen)

    def check_and_remember(self, sender: bytes, nonce: bytes, expires: int, now: int) -> None:
        key = (sender, nonce)
        if key in self._seen:
            raise Replayed("this message was already received once (replay refused)")
        if expires <= self._floor:
            raise Replayed(
                "this message is older than what the replay guard still remembers; "
                "refused in case it is a replay (ask the sender to send it again)"
            )
        if len(self._seen) >= self._capacity:
            self._seen = {k: e for k, e in self._seen.items() if e >= now}
            while len(self._seen) >= self._capacity:
                oldest = min(self._seen, key=self._seen.__getitem__)
                self._floor = max(self._floor, self._seen.pop(oldest))
        self._seen[key] = expires

    def export(self) -> list[tuple[bytes, bytes, int]]:
        """State for persisting across restarts."""
        return [(s, n, e) for (s, n), e in self._seen.items()]

    def load(self, items: list[tuple[bytes, bytes, int]], now: int) -> None:
        for sender, nonce, expires in items:
            if expires >= now:
                self._seen[(sender, nonce)] = expires


__all__ = [
    "BadSignature",
    "ReplayGuard",
    "Sealed",
    "SignedEnvelope",
    "open_sealed",
    "seal",
]
