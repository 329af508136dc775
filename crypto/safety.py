"""Safety numbers: one short number two people compare aloud to verify each other's keys."""

from __future__ import annotations

import hashlib

from crypto.identity import NodeId

GROUPS = 6
DIGITS_PER_GROUP = 5


def safety_number(a: NodeId, b: NodeId) -> str:
    """30 digits in 6 groups, identical whichever side computes it.

    It changes when either key changes; a forger who controls one key would need
    about 2**100 work to match a given number.
    """
    # A node id is the SHA-256 of the key, so this changes whenever either key does.
    low, high = sorted((a.digest, b.digest))
    digest = hashlib.sha512(b"radmesh-safety-number-v1\x00" + low + high).digest()
    groups = []
    for index in range(GROUPS):
        chunk = int.from_bytes(digest[index * 5 : index * 5 + 5], "big")
        groups.append(f"{chunk % 10**DIGITS_PER_GROUP:0{DIGITS_PER_GROUP}d}")
    return " ".join(groups)
