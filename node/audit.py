"""The node's audit log: hash-chained, append-only, with signed checkpoints.

Each record's hash covers the previous record's hash and the record itself
(sequence number, time, kind, actor, study, peer, details) in canonical
msgpack, so editing, removing or reordering any record breaks the chain.
Every ``checkpoint_every`` records, and on demand, the node signs
(sequence number, head hash) with its identity: someone able to rewrite the
database cannot recompute a valid chain up to a signed checkpoint without the
node key, and a tail cut below the last checkpoint is detected. Records after
the last checkpoint are only chained, not yet signed; :meth:`AuditLog.verify`
reports how many there are.

Records must not carry PHI: study UIDs and peer node ids identify what and who;
``details`` is for counts, sizes, reasons. Keys that name patient attributes
are refused.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from crypto import canonical
from crypto.errors import CryptoError
from crypto.identity import Identity, verify_signature
from node.errors import NodeError

if TYPE_CHECKING:
    from node.config import NodeHome

DOMAIN_RECORD = b"radmesh-audit-record-v1"
DOMAIN_CHECKPOINT = "radmesh-audit-checkpoint-v1"
GENESIS = bytes(32)
MAX_DETAILS_BYTES = 16 * 1024
DEFAULT_CHECKPOINT_EVERY = 64
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
"""


class AuditError(NodeError):
    """The audit log cannot be written or read."""


class AuditKind(StrEnum):
    IMPORT = "import"
    EXPORT = "export"
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


class AuditLog:
    """One node's audit log in a SQLite file. Thread-safe; safe across processes."""

    def __init__(self, db: sqlite3.Connection, identity: Identity, checkpoint_every: int) -> None:
        self._db = db
        self._identity = identity
        self._lock = threading.RLock()
        self.checkpoint_every = checkpoint_every

    @classmethod
    def open(
        cls,
        path: Path,
        identity: Identity,
        *,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    ) -> AuditLog:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA busy_timeout=10000")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(SCHEMA)
        return cls(db, identity, checkpoint_every)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
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
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                last = db.execute(
                    "SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1"
                ).fetchone()
                seq, prev = (1, GENESIS) if last is None else (last[0] + 1, last[1])
                digest = record_hash(prev, seq, time_ms, kind.value, who, study_uid, peer, encoded)
                db.execute(
                    "INSERT INTO records VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (seq, time_ms, kind.value, who, study_uid, peer, encoded, digest),
                )
                if self.checkpoint_every and seq % self.checkpoint_every == 0:
                    self._insert_checkpoint(seq, digest, time_ms)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return int(seq)

    def _insert_checkpoint(self, seq: int, head: bytes, time_ms: int) -> None:
        signature = self._identity.sign(
            _checkpoint_message(self._identity.public_key, seq, head, time_ms)
        )
        self._db.execute(
            "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?)",
            (seq, head, time_ms, signature),
        )

    def checkpoint(self, now: float) -> int:
        """Sign the current head now; returns the sequence number signed (0 if empty)."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                last = db.execute(
                    "SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1"
                ).fetchone()
                if last is None:
                    db.execute("COMMIT")
                    return 0
                self._insert_checkpoint(last[0], last[1], _ms(now))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return int(last[0])

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
        return VerifyReport(
            records=len(rows),
            checkpoints=len(checkpoints),
            last_signed_seq=last_signed,
            problems=tuple(problems),
        )


AUDIT_NAME = "audit.sqlite"


def open_audit(home: NodeHome, identity: Identity) -> AuditLog:
    """The node's audit log, ``home.data_dir / "audit.sqlite"``."""
    return AuditLog.open(home.data_dir / AUDIT_NAME, identity)
