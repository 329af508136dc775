"""Stable pseudonyms per hospital-consultant pair (issue 16, item 3).

The same patient shared with the same consultant again gets the same
pseudonymous patient ID and the same date shift, so the consultant's node
groups a follow-up with the earlier case. Different consultants can never link
their copies: the key that makes the pseudonym and the shift is

    pair key = BLAKE2b(key = node-local linkage secret,
                       data = purpose || consultant's node id)

and the pseudonym is an HMAC of the real patient ID under it
(:meth:`node.dicom.deid.PseudonymMap.pseudo_patient`; the date shift the same way, a
whole number of days in [-1094, -365]). The node id is a hash of the
consultant's public key (:class:`crypto.identity.NodeId`), so this binds the
key. Study/series/SOP UIDs stay fresh per share (the map's own ``secret``).

The linkage secret is 32 random bytes made once per home, stored encrypted
(secretbox under a key derived from the node identity) in
``data/pseudonym-linkage.key``, mode 0600; it never leaves the home.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
from pathlib import Path

import nacl.exceptions
import nacl.secret

from node.dicom.deid import PseudonymMap, PseudonymMapError

log = logging.getLogger(__name__)

LINKAGE_KEY_PURPOSE = "radmesh-pseudonym-linkage-v1"
PAIR_PERSON = b"radmesh-pair-v1"  # BLAKE2b personalisation (at most 16 bytes)


def linkage_path(data_dir: Path) -> Path:
    return data_dir / "pseudonym-linkage.key"


def linkage_secret(data_dir: Path, box_key: bytes) -> bytes:
    """The home's linkage secret, created on first use (race-safe: the first writer wins).

    One this identity cannot open (the identity was replaced, or the file is damaged) is
    set aside and a new one made: sharing goes on, only follow-ups stop grouping with
    earlier cases (logged)."""
    path = linkage_path(data_dir)
    box = nacl.secret.SecretBox(box_key)
    for _ in range(2):
        if not path.exists():
            _create(path, box)
        try:
            secret = bytes(box.decrypt(path.read_bytes()))
            if len(secret) == 32:
                return secret
        except nacl.exceptions.CryptoError:
            pass
        aside = path.with_name(f"{path.name}.unreadable-{secrets.token_hex(4)}")
        log.warning(
            "the pseudonym linkage secret %s cannot be opened with this identity: kept it as "
            "%s and made a new one; follow-ups shared from now on do not group with earlier "
            "cases (restore the old file and identity from a backup to keep that)",
            path,
            aside.name,
        )
        with contextlib.suppress(FileNotFoundError):
            path.rename(aside)
    raise PseudonymMapError(f"cannot make a pseudonym linkage secret in {path.parent}")


def _create(path: Path, box: nacl.secret.SecretBox) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(bytes(box.encrypt(secrets.token_bytes(32))))
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(tmp, path)  # fails if another process made it first: theirs is kept
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def pair_key(secret: bytes, consultant: str) -> bytes:
    """The key of the pseudonyms this node gives ``consultant`` (a node id string)."""
    return hashlib.blake2b(
        consultant.encode(), key=secret, digest_size=32, person=PAIR_PERSON
    ).digest()


def bind_to_consultant(
    pseudonyms: PseudonymMap, data_dir: Path, box_key: bytes, consultant: str
) -> bool:
    """Key ``pseudonyms``' patients and dates to the pair (this node, ``consultant``) unless
    already keyed or already used (a map that pseudonymised a patient keeps its pseudonyms).

    Returns whether it changed the map (the caller persists it).
    """
    if pseudonyms.patient_key is not None or pseudonyms.patients or pseudonyms.date_offsets:
        return False
    pseudonyms.patient_key = pair_key(linkage_secret(data_dir, box_key), consultant)
    return True
