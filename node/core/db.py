"""Opening a SQLite database, and one write transaction: the same way for every database.

The node keeps several SQLite files (the store index, the audit log, consults,
replay guard, trust, peers, retention; the registry its mailbox). Each used to
open itself with its own PRAGMAs, and they disagreed: most waited on a locked
database only for Python's default 5 s, some not in WAL mode. :func:`connect`
opens every one of them alike:

- the file is created 0600 before SQLite opens it (its ``-wal`` and ``-shm``
  inherit that mode) and an existing one is set to 0600, as
  :mod:`node.core.private` wants of everything under a home;
- ``busy_timeout`` first, so that even switching to WAL waits for another
  process instead of failing with "database is locked";
- WAL journal, ``synchronous`` (FULL unless the caller trades durability of the
  last commits for speed), foreign keys enforced;
- autocommit mode (``isolation_level=None``): nothing is in a transaction unless
  :func:`transaction` (or an explicit BEGIN) opened one.

:func:`transaction` is ``BEGIN IMMEDIATE`` … ``COMMIT``, ``ROLLBACK`` on any
exception: the write lock is taken at BEGIN, so two writers queue there (within
the busy timeout) instead of one failing at its first write.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from node.core.private import FILE_MODE

BUSY_TIMEOUT_MS = 10_000

Synchronous = Literal["FULL", "NORMAL"]


def _private_file(path: Path) -> None:
    """``path`` exists and is 0600 (created so, before SQLite can create it looser)."""
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE))
    if stat.S_IMODE(path.stat().st_mode) != FILE_MODE:
        os.chmod(path, FILE_MODE)


def connect(
    path: str | Path,
    *,
    synchronous: Synchronous = "FULL",
    check_same_thread: bool = True,
    busy_timeout_ms: int = BUSY_TIMEOUT_MS,
) -> sqlite3.Connection:
    """Open (creating if needed, 0600) the database at ``path`` in WAL mode, autocommit."""
    path = Path(path)
    _private_file(path)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=check_same_thread)
    try:
        db.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.execute("PRAGMA foreign_keys=ON")
    except BaseException:
        db.close()
        raise
    return db


def connect_read_only(
    path: str | Path, *, busy_timeout_ms: int = BUSY_TIMEOUT_MS
) -> sqlite3.Connection:
    """Open an existing database for reading only (a check that must not create or
    change anything); raises :class:`sqlite3.OperationalError` if it cannot."""
    db = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
    try:
        db.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    except BaseException:
        db.close()
        raise
    return db


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction: ``BEGIN IMMEDIATE``, then ``COMMIT``, or ``ROLLBACK`` if the
    block raises. The block may COMMIT itself (when something must happen between the
    commit and letting go, as the audit log's high-water mark does); then nothing is left
    to commit here."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        if db.in_transaction:
            db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


__all__ = ["BUSY_TIMEOUT_MS", "connect", "connect_read_only", "transaction"]
