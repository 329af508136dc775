"""The node's audit log: hash-chained, append-only, with signed checkpoints.

Each record's hash covers the previous record's hash and the record itself
(sequence number, time, kind, actor, study, peer, details) in canonical
msgpack, so editing, removing or reordering any record breaks the chain.
Every ``checkpoint_every`` records, and on demand, the node signs
(sequence number, head hash) with its identity: someone able to rewrite the
database cannot recompute a valid chain up to a signed checkpoint without the
node key, and a tail cut below the last checkpoint is detected. Records after
the last checkpoint are only chained, not yet signed; :meth:`AuditLog.verify`
reports how many there are. A running node signs a checkpoint at least every
minute while records arrive and when it stops (:mod:`node.app.runtime`); a log that
appended records signs its tail when it is closed.

A tail cut at a checkpoint, or the whole database deleted, leaves nothing in the
database to notice it, so the latest checkpoint is also kept outside it: the
**high-water mark**, a small file in the node home (``audit.hwm``: last signed
sequence number, head hash, time, signature; replaced atomically and only ever
raised). :meth:`AuditLog.verify` reports records missing below it, a head that
differs from it, and the file gone once the database says one was written; and
no checkpoint is signed over a log cut below it.

Records must not carry PHI: study UIDs and peer node ids identify what and who;
``details`` is for counts, sizes, reasons. Keys that name patient attributes
are refused.

Why one module: The chain, the checkpoints and their verification are one on-disk
format; a reader must see them together to judge a change to any of them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crypto import canonical
from crypto.errors import CryptoError
from crypto.identity import Identity, verify_signature
from node.core.db import connect, connect_read_only, transaction
from node.core.errors import NodeError
from node.core.private import write_private

if TYPE_CHECKING:
    from node.core.config import NodeHome

DOMAIN_RECORD = b"radmesh-audit-record-v1"
DOMAIN_CHECKPOINT = "radmesh-audit-checkpoint-v1"
GENESIS = bytes(32)
MAX_DETAILS_BYTES = 16 * 1024
DEFAULT_CHECKPOINT_EVERY = 64
HWM_FORMAT = "radmesh-audit-hwm/1"
MAX_HWM_BYTES = 1024
log = logging.getLogger(__name__)
PHI_KEYS = frozenset(
    {
        "patient",
        "patient_name",
        "patientname",
        "patient_id",
        "patientid",
        "birth_date",
        "patientbirthdate",
        "accession",
        "accession_number",
        "accessionnumber",
    }
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    time_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    actor TEXT NOT NULL,
    study_uid TEXT,
    peer TEXT,
    details BLOB NOT NULL,
    hash BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS records_study ON records(study_uid);
CREATE INDEX IF NOT EXISTS records_peer ON records(peer);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY,
    head BLOB NOT NULL,
    time_ms INTEGER NOT NULL,
    signature BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class AuditError(NodeError):
    """The audit log cannot be written or read."""


class AuditKind(StrEnum):
    IMPORT = "import"
    EXPORT = "export"
    TRUST = "trust"
    SHARE = "share"
    VIEW = "view"
    DELETE = "delete"
    TRANSFER = "transfer"
    RECEIVE = "receive"
    CONSULT = "consult"
    REPORT = "report"


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    time_ms: int
    kind: str
    actor: str
    study_uid: str | None
    peer: str | None
    details: dict[str, Any]
    hash: bytes


@dataclass(frozen=True)
class VerifyReport:
    records: int
    checkpoints: int
    last_signed_seq: int
    problems: tuple[str, ...] = field(default=())
    high_water: int | None = None  # the signed high-water mark's record, None if none yet
    last_checkpoint_ms: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def unsigned_tail(self) -> int:
        """Records after the last signed checkpoint (chained, not yet signed)."""
        return max(0, self.records - self.last_signed_seq)


def _ms(now: float) -> int:
    return round(now * 1000)


def record_hash(
    prev: bytes,
    seq: int,
    time_ms: int,
    kind: str,
    actor: str,
    study_uid: str | None,
    peer: str | None,
    details: bytes,
) -> bytes:
    body = canonical.encode([seq, time_ms, kind, actor, study_uid, peer, details])
    return hashlib.sha256(DOMAIN_RECORD + prev + body).digest()


def _checkpoint_message(public_key: bytes, seq: int, head: bytes, time_ms: int) -> bytes:
    return canonical.encode([DOMAIN_CHECKPOINT, public_key, seq, head, time_ms])


def _check_details(details: Mapping[str, Any] | None) -> bytes:
    if not details:
        return canonical.encode({})
    bad = [k for k in details if k.lower() in PHI_KEYS]
    if bad:
        raise AuditError(f"audit details must not hold patient data (key {bad[0]!r})")
    try:
        encoded = canonical.encode(dict(details))
    except CryptoError as exc:
        raise AuditError(f"audit details cannot be encoded: {exc}") from exc
    if len(encoded) > MAX_DETAILS_BYTES:
        raise AuditError(f"audit details are {len(encoded)} bytes; limit {MAX_DETAILS_BYTES}")
    return encoded


@dataclass(frozen=True)
class HighWaterMark:
    """The latest signed checkpoint, as kept outside the database."""

    seq: int
    head: bytes
    time_ms: int
    signature: bytes

    def to_bytes(self) -> bytes:
        return canonical.encode(
            {
                "format": HWM_FORMAT,
                "seq": self.seq,
                "head": self.head,
                "time_ms": self.time_ms,
                "sig": self.signature,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes, public_key: bytes) -> HighWaterMark:
        """Parse and verify; raises :class:`AuditError` for anything wrong."""
        mark = cls.parse_unverified(data)
        try:
            verify_signature(
                public_key,
                _checkpoint_message(public_key, mark.seq, mark.head, mark.time_ms),
                mark.signature,
            )
        except CryptoError as exc:
            raise AuditError(
                "the audit high-water mark's signature is not this node's: it was forged"
            ) from exc
        return mark

    @classmethod
    def parse_unverified(cls, data: bytes) -> HighWaterMark:
        """Parse only (for a check that has no key at hand, e.g. `radmesh doctor`)."""
        try:
            raw = canonical.decode(data, MAX_HWM_BYTES)
        except CryptoError as exc:
            raise AuditError(f"the audit high-water mark is damaged: {exc}") from exc
        if not isinstance(raw, dict) or raw.get("format") != HWM_FORMAT:
            raise AuditError("the audit high-water mark is not in a format this node wrote")
        seq, head, time_ms, sig = (
            raw.get("seq"),
            raw.get("head"),
            raw.get("time_ms"),
            raw.get("sig"),
        )
        if not (
            isinstance(seq, int)
            and isinstance(head, bytes)
            and isinstance(time_ms, int)
            and isinstance(sig, bytes)
        ):
            raise AuditError("the audit high-water mark is damaged: bad fields")
        return cls(seq, head, time_ms, sig)


class AuditLog:
    """One node's audit log in a SQLite file. Thread-safe; safe across processes."""

    def __init__(
        self,
        db: sqlite3.Connection,
        identity: Identity,
        checkpoint_every: int,
        hwm_path: Path | None = None,
    ) -> None:
        self._db = db
        self._identity = identity
        self._lock = threading.RLock()
        self.checkpoint_every = checkpoint_every
        self.hwm_path = hwm_path
        self._appended = False

    @classmethod
    def open(
        cls,
        path: Path,
        identity: Identity,
        *,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        hwm_path: Path | None = None,
    ) -> AuditLog:
        """``hwm_path``: where the signed high-water mark lives (outside the database)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        db = connect(path, check_same_thread=False)
        db.executescript(SCHEMA)
        return cls(db, identity, checkpoint_every, hwm_path)

    def close(self) -> None:
        """Close; a log that appended records signs its tail first (a one-shot command's
        record is signed when the command ends)."""
        with self._lock:
            if self._appended and self.unsigned():
                try:
                    self.checkpoint(time.time())
                except AuditError as exc:
                    log.error("audit log not signed on close: %s", exc)
            self._db.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def append(
        self,
        kind: AuditKind | str,
        *,
        now: float,
        study_uid: str | None = None,
        peer: str | None = None,
        details: Mapping[str, Any] | None = None,
        actor: str | None = None,
    ) -> int:
        """Append one record; returns its sequence number (1-based)."""
        try:
            kind = AuditKind(kind)
        except ValueError as exc:
            raise AuditError(f"unknown audit event kind {kind!r}") from exc
        encoded = _check_details(details)
        who = actor or str(self._identity.node_id)
        time_ms = _ms(now)
        with self._lock:
            with transaction(self._db) as db:
                last = db.execute(
                    "SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1"
                ).fetchone()
                seq, prev = (1, GENESIS) if last is None else (last[0] + 1, last[1])
                digest = record_hash(prev, seq, time_ms, kind.value, who, study_uid, peer, encoded)
                db.execute(
                    "INSERT INTO records VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (seq, time_ms, kind.value, who, study_uid, peer, encoded, digest),
                )
                mark = None
                if self.checkpoint_every and seq % self.checkpoint_every == 0:
                    if self._cut_below_high_water() is None:
                        mark = self._insert_checkpoint(seq, digest, time_ms)
                    else:
                        log.error("audit checkpoint %d not signed: the log was cut", seq)
                self._commit_raising_high_water(mark)
            self._appended = True
        return int(seq)

    def _insert_checkpoint(self, seq: int, head: bytes, time_ms: int) -> HighWaterMark:
        signature = self._identity.sign(
            _checkpoint_message(self._identity.public_key, seq, head, time_ms)
        )
        self._db.execute(
            "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?)",
            (seq, head, time_ms, signature),
        )
        if self.hwm_path is not None:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('hwm', '1')")
        return HighWaterMark(seq, head, time_ms, signature)

    def checkpoint(self, now: float) -> int:
        """Sign the current head now; returns the sequence number signed (0 if empty).

        Raises :class:`AuditError`, signing nothing, when the log was cut below its
        high-water mark: a signature must never bless a shortened log."""
        with self._lock, transaction(self._db) as db:
            cut = self._cut_below_high_water()
            if cut is not None:
                raise AuditError(f"no checkpoint signed: {cut}")
            last = db.execute("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
            if last is None:
                return 0
            mark = self._insert_checkpoint(last[0], last[1], _ms(now))
            self._commit_raising_high_water(mark)
        return int(last[0])

    def unsigned(self) -> int:
        """Records after the last checkpoint (what the next checkpoint would sign)."""
        with self._lock:
            row = self._db.execute(
                "SELECT (SELECT COALESCE(MAX(seq), 0) FROM records), "
                "(SELECT COALESCE(MAX(seq), 0) FROM checkpoints)"
            ).fetchone()
        return max(0, int(row[0]) - int(row[1]))

    # -- the high-water mark, outside the database --------------------------------------
    def _read_high_water(self) -> HighWaterMark | None:
        """The verified mark; None if there is none. Raises AuditError if it is bad."""
        if self.hwm_path is None:
            return None
        try:
            data = self.hwm_path.read_bytes()
        except FileNotFoundError:
            return None
        return HighWaterMark.from_bytes(data, self._identity.public_key)

    def _hwm_expected(self) -> bool:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'hwm'").fetchone()
        return row is not None

    def _cut_below_high_water(self) -> str | None:
        """What was cut from the log below its high-water mark, or None."""
        if self.hwm_path is None:
            return None
        try:
            with self._high_water_lock():  # not between another writer's COMMIT and its mark
                mark = self._read_high_water()
        except AuditError as exc:
            return str(exc)
        if mark is None:
            if self._hwm_expected():
                return f"the audit high-water mark {self.hwm_path} was deleted"
            return None
        row = self._db.execute("SELECT hash FROM records WHERE seq = ?", (mark.seq,)).fetchone()
        if row is None:
            count = self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0]
            return _cut_message(int(count), mark.seq)
        if bytes(row[0]) != mark.head:
            return f"record {mark.seq} differs from what the signed high-water mark recorded"
        return None

    @contextlib.contextmanager
    def _high_water_lock(self) -> Iterator[None]:
        """The high-water mark's file lock, across processes. Never held while waiting for
        the database: a holder only commits (its write lock already taken) and writes."""
        path = self.hwm_path
        if path is None:
            yield
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(lock_fd)  # releases the lock

    def _commit_raising_high_water(self, mark: HighWaterMark | None) -> None:
        """COMMIT, and raise the mark to ``mark`` (if higher) under its lock, taken before
        the COMMIT: another process that then reads the log (and the database's note that
        a mark exists) waits for the mark instead of taking it for deleted."""
        if mark is None or self.hwm_path is None:
            self._db.execute("COMMIT")
            return
        with self._high_water_lock():
            self._db.execute("COMMIT")
            with contextlib.suppress(AuditError):
                current = self._read_high_water()
                if current is not None and current.seq >= mark.seq:
                    return
            write_private(self.hwm_path, mark.to_bytes())

    def records(
        self,
        study_uid: str | None = None,
        peer: str | None = None,
        kind: str | None = None,
    ) -> list[AuditRecord]:
        query = "SELECT seq, time_ms, kind, actor, study_uid, peer, details, hash FROM records"
        clauses, params = [], []
        for column, value in (("study_uid", study_uid), ("peer", peer), ("kind", kind)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY seq", params).fetchall()
        out = []
        for seq, time_ms, kind_, actor, study, peer_, details, digest in rows:
            try:
                decoded = canonical.decode(details, MAX_DETAILS_BYTES)
            except CryptoError:
                decoded = {"unreadable": True}
            out.append(AuditRecord(seq, time_ms, kind_, actor, study, peer_, decoded, digest))
        return out

    def verify(self, public_key: bytes | None = None) -> VerifyReport:
        """Check the whole chain and every checkpoint; never raises for a damaged log."""
        key = public_key or self._identity.public_key
        problems: list[str] = []
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, time_ms, kind, actor, study_uid, peer, details, hash "
                "FROM records ORDER BY seq"
            ).fetchall()
            checkpoints = self._db.execute(
                "SELECT seq, head, time_ms, signature FROM checkpoints ORDER BY seq"
            ).fetchall()
        computed: dict[int, bytes] = {}
        prev = GENESIS
        for expected, (seq, time_ms, kind, actor, study, peer, details, stored) in enumerate(
            rows, start=1
        ):
            if seq != expected:
                problems.append(f"record {expected} is missing (next present is {seq})")
                break
            digest = record_hash(prev, seq, time_ms, kind, actor, study, peer, details)
            if digest != stored:
                problems.append(
                    f"record {seq} does not match the chain: it was edited, "
                    "or a record before it was removed or reordered"
                )
                break
            computed[seq] = digest
            prev = digest
        last_signed = 0
        for seq, head, time_ms, signature in checkpoints:
            try:
                verify_signature(key, _checkpoint_message(key, seq, head, time_ms), signature)
            except CryptoError:
                problems.append(f"checkpoint at record {seq} has an invalid signature")
                continue
            if seq > len(rows):
                problems.append(
                    f"records after {len(rows)} were removed: a signed checkpoint covers "
                    f"record {seq}"
                )
                continue
            if seq in computed and computed[seq] != head:
                problems.append(f"record {seq} differs from what checkpoint {seq} signed")
                continue
            if seq not in computed:
                continue  # already reported as a chain break before it
            last_signed = max(last_signed, seq)
        # Recomputed hashes can hide an edit from the chain check; a signed head cannot.
        high_water, hwm_problem = self._check_high_water(key, computed, len(rows))
        if hwm_problem is not None:
            problems.append(hwm_problem)
        return VerifyReport(
            records=len(rows),
            checkpoints=len(checkpoints),
            last_signed_seq=last_signed,
            problems=tuple(problems),
            high_water=high_water,
            last_checkpoint_ms=max((c[2] for c in checkpoints), default=None),
        )

    def _check_high_water(
        self, key: bytes, computed: dict[int, bytes], count: int
    ) -> tuple[int | None, str | None]:
        """(the mark's record, what is wrong with the log against it)."""
        if self.hwm_path is None:
            return None, None
        try:
            data = self.hwm_path.read_bytes()
        except FileNotFoundError:
            with self._lock:
                expected = self._hwm_expected()
            if expected:
                return None, (
                    f"the signed high-water mark {self.hwm_path} was deleted: records cut "
                    "from the tail cannot be ruled out"
                )
            return None, None
        try:
            mark = HighWaterMark.from_bytes(data, key)
        except AuditError as exc:
            return None, str(exc)
        if mark.seq > count:
            return mark.seq, _cut_message(count, mark.seq)
        if mark.seq in computed and computed[mark.seq] != mark.head:
            return (
                mark.seq,
                f"record {mark.seq} differs from what the signed high-water mark recorded",
            )
        return mark.seq, None


def _cut_message(present: int, signed: int) -> str:
    if present == 0:
        return (
            f"all {signed} record(s) were removed: the signed high-water mark says the log "
            f"reached record {signed}"
        )
    return (
        f"records {present + 1} to {signed} were cut from the tail: the signed high-water "
        f"mark says the log reached record {signed}, it now ends at {present}"
    )


AUDIT_NAME = "audit.sqlite"
HWM_NAME = "audit.hwm"


def open_audit(home: NodeHome, identity: Identity) -> AuditLog:
    """The node's audit log, ``home.data_dir / "audit.sqlite"``; its high-water mark is
    ``home.root / "audit.hwm"``, beside the data folder rather than in it."""
    return AuditLog.open(home.data_dir / AUDIT_NAME, identity, hwm_path=home.root / HWM_NAME)


@dataclass(frozen=True)
class AuditState:
    """What `radmesh doctor` reports, read without the node key (signatures are
    checked by `radmesh audit verify`)."""

    records: int
    unsigned: int
    last_checkpoint_ms: int | None
    high_water: int | None
    problem: str | None  # the log against its high-water mark


def audit_state(home: NodeHome) -> AuditState:
    """Read-only look at a home's audit log and high-water mark."""
    path, hwm_path = home.data_dir / AUDIT_NAME, home.root / HWM_NAME
    records = signed = 0
    last_ms: int | None = None
    expected = False
    head_at: dict[int, bytes] = {}
    mark: HighWaterMark | None = None
    problem: str | None = None
    try:
        mark = HighWaterMark.parse_unverified(hwm_path.read_bytes())
    except FileNotFoundError:
        pass
    except AuditError as exc:
        problem = str(exc)
    if path.exists():
        db = connect_read_only(path)
        try:
            records, signed, last_ms = db.execute(
                "SELECT (SELECT COALESCE(MAX(seq), 0) FROM records), "
                "(SELECT COALESCE(MAX(seq), 0) FROM checkpoints), "
                "(SELECT MAX(time_ms) FROM checkpoints)"
            ).fetchone()
            with contextlib.suppress(sqlite3.OperationalError):  # a log from before meta
                expected = db.execute("SELECT 1 FROM meta WHERE key = 'hwm'").fetchone() is not None
            if mark is not None:
                row = db.execute("SELECT hash FROM records WHERE seq = ?", (mark.seq,)).fetchone()
                if row is not None:
                    head_at[mark.seq] = bytes(row[0])
        finally:
            db.close()
    if problem is None and mark is not None:
        if mark.seq > records:
            problem = _cut_message(records, mark.seq)
        elif head_at.get(mark.seq) != mark.head:
            problem = f"record {mark.seq} differs from what the signed high-water mark recorded"
    elif problem is None and expected:
        problem = f"the signed high-water mark {hwm_path} was deleted"
    return AuditState(
        records=int(records),
        unsigned=max(0, int(records) - int(signed)),
        last_checkpoint_ms=last_ms,
        high_water=mark.seq if mark is not None else None,
        problem=problem,
    )
