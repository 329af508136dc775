"""Safety numbers: one short number two people compare aloud to verify each other's keys."""

from __future__ import annotations

import hashlib

from crypto.identity import PUBLIC_KEY_SIZE

GROUPS = 6
DIGITS_PER_GROUP = 5


def safety_number(public_key_a: bytes, public_key_b: bytes) -> str:
    """30 digits in 6 groups, identical whichever side computes it.

    It changes when either key changes; a forger who controls one key would need
    about 2**100 work to match a given number.
    """
    if len(public_key_a) != PUBLIC_KEY_SIZE or len(public_key_b) != PUBLIC_KEY_SIZE:
        raise ValueError("safety numbers are computed from two 32-byte public keys")
    low, high = sorted((public_key_a, public_key_b))
    digest = hashlib.sha512(b"radmesh-safety-number-v1\x00" + low + high).digest()
    groups = []
    for index in range(GROUPS):
        chunk = int.from_bytes(digest[index * 5 : index * 5 + 5], "big")
        groups.append(f"{chunk % 10**DIGITS_PER_GROUP:0{DIGITS_PER_GROUP}d}")
    return " ".join(groups)
