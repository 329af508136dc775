"""Node identities: Ed25519 keys and their readable ids.

A node id is the SHA-256 of the node's Ed25519 public key, in base32, with a
Luhn mod 32 check character after every 13 characters, printed in groups of 7
(the Syncthing device-id scheme). A person can read it aloud and a typo is
caught by the check characters.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.signing

from crypto.errors import BadSignature, InvalidNodeId

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_GROUP = 13  # characters per check-character group
_PRINT_GROUP = 7  # characters per printed group
PUBLIC_KEY_SIZE = 32
SEED_SIZE = 32
SIGNATURE_SIZE = 64


def _luhn32(chars: str) -> str:
    factor = 1
    total = 0
    for ch in chars:
        addend = factor * _ALPHABET.index(ch)
        factor = 1 if factor == 2 else 2
        total += addend // 32 + addend % 32
    return _ALPHABET[(32 - total % 32) % 32]


@dataclass(frozen=True, order=True)
class NodeId:
    """The SHA-256 digest of a node's public key, shown in its readable form."""

    digest: bytes

    def __post_init__(self) -> None:
        if len(self.digest) != 32:
            raise InvalidNodeId(f"a node id digest is 32 bytes, got {len(self.digest)}")

    @classmethod
    def from_public_key(cls, public_key: bytes) -> NodeId:
        if len(public_key) != PUBLIC_KEY_SIZE:
            raise InvalidNodeId(f"an Ed25519 public key is 32 bytes, got {len(public_key)}")
        return cls(hashlib.sha256(public_key).digest())

    @classmethod
    def parse(cls, text: str) -> NodeId:
        """Parse a node id in any case, with or without spaces and dashes."""
        cleaned = "".join(text.split()).replace("-", "").upper()
        # Characters that people confuse with base32 letters when reading aloud.
        cleaned = cleaned.translate(str.maketrans("018", "OIB"))
        if len(cleaned) != 56:
            raise InvalidNodeId(
                f"a node id has 56 letters and digits (8 groups of 7), got {len(cleaned)}: "
                "copy it again from `radmesh id` on the other node"
            )
        bad = sorted({c for c in cleaned if c not in _ALPHABET})
        if bad:
            raise InvalidNodeId(
                f"a node id uses only A-Z and 2-7; found {''.join(bad)!r}: check the id you typed"
            )
        body = ""
        for index in range(4):
            chunk = cleaned[index * 14 : index * 14 + _GROUP]
            check = cleaned[index * 14 + _GROUP]
            if _luhn32(chunk) != check:
                raise InvalidNodeId(
                    f"check character {index + 1} of the node id is wrong: a character in "
                    f"group {index * 2 + 1} or {index * 2 + 2} was mistyped"
                )
            body += chunk
        digest = base64.b32decode(body + "====")
        return cls(digest)

    def __str__(self) -> str:
        body = base64.b32encode(self.digest).decode().rstrip("=")
        with_checks = "".join(
            body[i : i + _GROUP] + _luhn32(body[i : i + _GROUP])
            for i in range(0, len(body), _GROUP)
        )
        return "-".join(
            with_checks[i : i + _PRINT_GROUP] for i in range(0, len(with_checks), _PRINT_GROUP)
        )

    def short(self) -> str:
        """The first group: enough to tell peers apart on screen, never for verification."""
        return str(self)[:_PRINT_GROUP]


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> None:
    """Raise :class:`BadSignature` unless ``signature`` is ``public_key``'s over ``message``."""
    if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        raise BadSignature("signature or key has the wrong length")
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError) as exc:
        raise BadSignature("signature does not verify: the data was altered") from exc


def x25519_public(public_key: bytes) -> bytes:
    """The X25519 key matching an Ed25519 public key, for sealing to a node."""
    try:
        return bytes(nacl.signing.VerifyKey(public_key).to_curve25519_public_key())
    except (nacl.exceptions.RuntimeError, nacl.exceptions.ValueError) as exc:
        raise BadSignature("not a valid Ed25519 public key") from exc


class Identity:
    """A node's (or an organisation's) long-term Ed25519 key pair."""

    __slots__ = ("_signing_key",)

    def __init__(self, seed: bytes) -> None:
        if len(seed) != SEED_SIZE:
            raise ValueError("an identity seed is 32 bytes")
        self._signing_key = nacl.signing.SigningKey(seed)

    @classmethod
    def generate(cls) -> Identity:
        return cls(bytes(nacl.signing.SigningKey.generate()))

    @property
    def seed(self) -> bytes:
        return bytes(self._signing_key)

    @property
    def public_key(self) -> bytes:
        return bytes(self._signing_key.verify_key)

    @property
    def node_id(self) -> NodeId:
        return NodeId.from_public_key(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self._signing_key.sign(message).signature

    def x25519_private(self) -> nacl.public.PrivateKey:
        return self._signing_key.to_curve25519_private_key()

    def derive_key(self, purpose: str) -> bytes:
        """A 32-byte secret for ``purpose`` (e.g. the store key), bound to this identity."""
        return hashlib.blake2b(
            purpose.encode(), key=self.seed, digest_size=32, person=b"radmesh-derive"
        ).digest()

    def __repr__(self) -> str:  # never print key material
        return f"Identity({self.node_id.short()}…)"
