"""The key file format: an identity seed, encrypted with a passphrase or, by opt-out, plain.

Pure: builds and parses bytes; :mod:`node.core.keystore` writes the file.
Encrypted form: Argon2id (libsodium ``crypto_pwhash``) derives a key from the
passphrase, XSalsa20-Poly1305 (``secretbox``) encrypts the seed. The KDF cost
is stored in the file so it can be raised later without breaking old files.
"""

from __future__ import annotations

from dataclasses import dataclass

import nacl.exceptions
import nacl.pwhash
import nacl.secret
import nacl.utils

from crypto import canonical
from crypto.errors import EncodingError, WrongPassphrase
from crypto.identity import SEED_SIZE

FORMAT = "radmesh-key/1"
MAX_KEYFILE_SIZE = 4096


@dataclass(frozen=True)
class KdfCost:
    """Argon2id cost. The default is libsodium's MODERATE (3 passes, 256 MiB, about a
    second): the key guards every study on the node for years, and is unlocked once per
    start, so INTERACTIVE (2 passes, 64 MiB) is too cheap for an offline guess."""

    opslimit: int = nacl.pwhash.argon2id.OPSLIMIT_MODERATE
    memlimit: int = nacl.pwhash.argon2id.MEMLIMIT_MODERATE

    def weaker_than(self, other: KdfCost) -> bool:
        return self.opslimit < other.opslimit or self.memlimit < other.memlimit


DEFAULT_COST = KdfCost()


# Cheapest settings libsodium accepts; for tests only.


def _derive(passphrase: str, salt: bytes, cost: KdfCost) -> bytes:
    return nacl.pwhash.argon2id.kdf(
        nacl.secret.SecretBox.KEY_SIZE,
        passphrase.encode(),
        salt,
        opslimit=cost.opslimit,
        memlimit=cost.memlimit,
    )


def encrypt_seed(seed: bytes, passphrase: str, cost: KdfCost | None = None) -> bytes:
    if len(seed) != SEED_SIZE:
        raise ValueError("seed must be 32 bytes")
    if not passphrase:
        raise ValueError("an empty passphrase protects nothing; use the plain format instead")
    cost = cost or KdfCost()
    salt = nacl.utils.random(nacl.pwhash.argon2id.SALTBYTES)
    box = nacl.secret.SecretBox(_derive(passphrase, salt, cost))
    return canonical.encode(
        {
            "format": FORMAT,
            "kdf": "argon2id",
            "ops": cost.opslimit,
            "mem": cost.memlimit,
            "salt": salt,
            "box": bytes(box.encrypt(seed)),
        }
    )


def plain_seed(seed: bytes) -> bytes:
    if len(seed) != SEED_SIZE:
        raise ValueError("seed must be 32 bytes")
    return canonical.encode({"format": FORMAT, "kdf": "none", "seed": seed})


def is_encrypted(data: bytes) -> bool:
    raw = canonical.decode(data, MAX_KEYFILE_SIZE)
    return isinstance(raw, dict) and raw.get("kdf") == "argon2id"


def cost_of(data: bytes) -> KdfCost | None:
    """The KDF cost an encrypted key file was written with; None for a plain one."""
    raw = canonical.decode(data, MAX_KEYFILE_SIZE)
    if not isinstance(raw, dict) or raw.get("kdf") != "argon2id":
        return None
    ops, mem = raw.get("ops"), raw.get("mem")
    if not (isinstance(ops, int) and isinstance(mem, int)):
        raise EncodingError("key file is damaged: bad header")
    return KdfCost(ops, mem)


def decrypt_seed(data: bytes, passphrase: str | None) -> bytes:
    """Return the seed; raise :class:`WrongPassphrase` or :class:`EncodingError`."""
    raw = canonical.decode(data, MAX_KEYFILE_SIZE)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise EncodingError("not a radmesh key file (unknown format)")
    if raw.get("kdf") == "none":
        seed = raw.get("seed")
        if not isinstance(seed, bytes) or len(seed) != SEED_SIZE:
            raise EncodingError("key file is damaged: bad seed")
        return seed
    if raw.get("kdf") != "argon2id":
        raise EncodingError(f"key file uses an unknown KDF {raw.get('kdf')!r}")
    if passphrase is None:
        raise WrongPassphrase()
    ops, mem, salt, boxed = raw.get("ops"), raw.get("mem"), raw.get("salt"), raw.get("box")
    if not (
        isinstance(ops, int)
        and isinstance(mem, int)
        and isinstance(salt, bytes)
        and isinstance(boxed, bytes)
    ):
        raise EncodingError("key file is damaged: bad header")
    if not (
        nacl.pwhash.argon2id.OPSLIMIT_MIN <= ops <= nacl.pwhash.argon2id.OPSLIMIT_MAX
        and nacl.pwhash.argon2id.MEMLIMIT_MIN <= mem <= 1 << 31
    ):
        raise EncodingError("key file is damaged: KDF cost out of range")
    try:
        seed = nacl.secret.SecretBox(_derive(passphrase, salt, KdfCost(ops, mem))).decrypt(boxed)
    except nacl.exceptions.CryptoError as exc:
        raise WrongPassphrase() from exc
    if len(seed) != SEED_SIZE:
        raise EncodingError("key file is damaged: bad seed length")
    return bytes(seed)
