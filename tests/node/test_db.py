"""Every SQLite database opens through node.core.db: WAL, a busy timeout, private modes,
and a second writer waits for the first instead of failing with "database is locked"."""

from __future__ import annotations

import sqlite3
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from consult.store import ConsultDB
from crypto.identity import Identity
from node.app import retention
from node.app.retention import RetentionDB
from node.core.audit import AuditLog
from node.core.db import BUSY_TIMEOUT_MS, connect, transaction
from node.core.replay_store import PersistentReplayGuard
from node.dicom.store import Store
from registry.directory import PeerDirectory
from registry.store import RegistryDB
from registry.trust import TrustStore

# Each opener returns (the object, its connection, the database file).
Opened = tuple[Any, sqlite3.Connection, Path]


def _store(tmp: Path) -> Opened:
    store = Store.open(tmp / "store", bytes(32))
    return store, store._db, tmp / "store" / "index.sqlite"


def _audit(tmp: Path) -> Opened:
    audit = AuditLog.open(tmp / "audit.sqlite", Identity.generate())
    return audit, audit._db, tmp / "audit.sqlite"


def _consults(tmp: Path) -> Opened:
    db = ConsultDB(tmp / "consults.sqlite")
    return db, db._db, tmp / "consults.sqlite"


def _replay(tmp: Path) -> Opened:
    guard = PersistentReplayGuard(tmp / "replay.db")
    return guard, guard._db, tmp / "replay.db"


def _retention(tmp: Path) -> Opened:
    db = RetentionDB(tmp)
    return db, db._db, tmp / retention.DB_NAME


def _trust(tmp: Path) -> Opened:
    trust = TrustStore(tmp / "trust.db")
    return trust, trust._db, tmp / "trust.db"


def _peers(tmp: Path) -> Opened:
    directory = PeerDirectory(tmp / "peers.db", TrustStore(tmp / "trust.db"))
    return directory, directory._db, tmp / "peers.db"


def _registry(tmp: Path) -> Opened:
    db = RegistryDB(tmp / "registry.db")
    return db, db._db, tmp / "registry.db"


OPENERS: dict[str, Callable[[Path], Opened]] = {
    "store index": _store,
    "audit log": _audit,
    "consults": _consults,
    "replay guard": _replay,
    "retention": _retention,
    "trust": _trust,
    "peer directory": _peers,
    "registry": _registry,
}


@pytest.fixture(params=sorted(OPENERS))
def opened(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opened]:
    thing, db, path = OPENERS[request.param](tmp_path)
    yield thing, db, path
    db.close()


def test_every_database_waits_for_a_lock_is_wal_and_private(opened: Opened) -> None:
    _, db, path = opened
    assert db.execute("PRAGMA busy_timeout").fetchone()[0] == BUSY_TIMEOUT_MS
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def _held_until(path: Path, started: threading.Event) -> tuple[threading.Thread, list[str]]:
    """Another writer holds the database's write lock until ``started`` is set."""
    locked, done = threading.Event(), []

    def hold() -> None:
        with closing(connect(path)) as other, transaction(other):
            other.execute("CREATE TABLE IF NOT EXISTS held (x)")
            locked.set()
            done.append("waited" if started.wait(30) else "timed out")

    thread = threading.Thread(target=hold)
    thread.start()
    assert locked.wait(30)
    return thread, done


def test_a_second_writer_waits_instead_of_failing(opened: Opened) -> None:
    _, db, path = opened
    started = threading.Event()

    def trace(statement: str) -> None:
        if statement == "BEGIN IMMEDIATE":
            started.set()  # let the holder commit: this BEGIN can only succeed by waiting

    thread, done = _held_until(path, started)
    db.set_trace_callback(trace)
    try:
        with transaction(db):
            db.execute("CREATE TABLE IF NOT EXISTS probe (x)")
            db.execute("INSERT INTO probe VALUES (1)")
    finally:
        db.set_trace_callback(None)
        thread.join(30)
    assert done == ["waited"]
    assert db.execute("SELECT count(*) FROM held").fetchone()[0] == 0  # the holder's commit
    assert db.execute("SELECT x FROM probe").fetchall() == [(1,)]


def test_a_failed_transaction_rolls_back(tmp_path: Path) -> None:
    with closing(connect(tmp_path / "t.db")) as db:
        db.execute("CREATE TABLE t (x)")

        def insert_then_fail() -> None:
            with transaction(db):
                db.execute("INSERT INTO t VALUES (1)")
                raise ValueError("boom")

        with pytest.raises(ValueError, match="boom"):
            insert_then_fail()
        assert not db.in_transaction
        assert db.execute("SELECT count(*) FROM t").fetchone()[0] == 0


def test_a_loose_database_file_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / "loose.db"
    path.touch(mode=0o644)
    path.chmod(0o644)
    connect(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
