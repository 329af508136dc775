"""Identifiers that arrive from peers, checked before use, and local names derived from them.

A peer's string is data, never a path: ids are checked against a fixed grammar when a
message is parsed, and every file or directory named after one takes its name from a
hash (:func:`local_name`), so even a check that is one day too lax cannot reach outside
its directory.
"""

from __future__ import annotations

import hashlib
import re

MAX_UID_CHARS = 64
# PS3.5 9.1: digits and dots. Leading zeros in a component (which PS3.5 forbids) are
# tolerated: real files have them, and they are harmless.
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")


def is_dicom_uid(text: object) -> bool:
    """True for a DICOM UID: ``^[0-9]+(\\.[0-9]+)*$``, at most 64 characters."""
    if not isinstance(text, str) or not 0 < len(text) <= MAX_UID_CHARS:
        return False
    return _UID.fullmatch(text) is not None


def local_name(text: str) -> str:
    """The name of a local file or directory that belongs to ``text`` (an id, a UID):
    32 hex characters of its SHA-256, whatever ``text`` holds."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def file_name(uid: str) -> str:
    """A UID as a file name people recognise, or its :func:`local_name` when it is not a
    well-formed UID (a name that reached the store from elsewhere)."""
    return uid if is_dicom_uid(uid) else local_name(uid)
