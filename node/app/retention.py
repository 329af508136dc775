"""Retention of studies this node holds as a consultant (issue 19, item 13).

A consultant abroad holds a de-identified study only as long as the case needs
it: ``[retention] days`` (default 30; 0 keeps forever) after the consult closes
(report acknowledged, or withdrawn, declined, expired) the running node purges
the study from its store, once per study, audited (consult id, study uid,
instances removed: no PHI). Pinned consults (``radmesh consult pin ID``) are
kept. Only studies received from a peer for a consult where this node is the
consultant are ever purged: a study also held for a request of this node, or
holding any instance that did not come from a peer, is left alone.

:func:`due_purges` is the decision, pure (rows + now + days -> what to purge).
Pins and purges done live in ``retention.sqlite3`` in the data dir, so a CLI
pin and the running node's purge never race on one file.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from consult.requests import Role, State
from node.core.db import connect

if TYPE_CHECKING:
    from consult.store import ConsultDB
    from node.core.audit import AuditLog
    from node.dicom.store import Store

log = logging.getLogger(__name__)

DB_NAME = "retention.sqlite3"
DAY = 86_400
RETENTION_INTERVAL = 3600.0  # seconds between purge ticks of the running node
CLOSED = frozenset({State.ACKNOWLEDGED, State.WITHDRAWN, State.DECLINED, State.EXPIRED})
NEVER_FETCHED = frozenset({State.REQUESTED, State.OFFERED, State.DECLINED})
RECEIVED_SOURCES = ("peer:", "report:")  # instances this node got from another node

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pins (consult_id TEXT PRIMARY KEY, at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS purged (
    consult_id TEXT PRIMARY KEY, study_uid TEXT NOT NULL, at INTEGER NOT NULL,
    instances INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class ConsultRow:
    """One consult as retention sees it."""

    consult_id: str
    study_uid: str
    role: Role
    state: State
    closed_at: int | None  # when it entered a closed state; None while open
    pinned: bool = False
    purged: bool = False


@dataclass(frozen=True)
class Purge:
    consult_id: str
    study_uid: str
    due_at: int


def _due_at(row: ConsultRow, days: int) -> int | None:
    if row.closed_at is None or row.state not in CLOSED:
        return None
    return row.closed_at + days * DAY


def due_purges(rows: Sequence[ConsultRow], now: int, days: int) -> list[Purge]:
    """The consultant studies to purge at ``now`` with a window of ``days`` (0: none).

    A study is purged only when every consult naming it is a consultant one, closed
    for ``days``, not pinned; a study also named by this node's own request is never
    purged (it is the hospital's original)."""
    if days <= 0:
        return []
    by_study: dict[str, list[ConsultRow]] = {}
    for row in rows:
        by_study.setdefault(row.study_uid, []).append(row)
    purges = []
    for study_uid, group in by_study.items():
        if any(r.role != Role.CONSULTANT or r.pinned for r in group):
            continue
        dues = [_due_at(r, days) for r in group]
        if any(d is None or d > now for d in dues):
            continue
        for row, due in zip(group, dues, strict=True):
            if not row.purged and due is not None:
                purges.append(Purge(row.consult_id, study_uid, due))
    return sorted(purges, key=lambda p: (p.due_at, p.consult_id))


@dataclass(frozen=True)
class Summary:
    held: int  # consultant studies not yet purged
    due: int  # of which due now
    next_purge: int | None  # when the next one falls due (None: none scheduled)
    pinned: int

    def line(self, days: int, now: int) -> str:
        if days <= 0:
            return f"{self.held} study(ies) held for consults, kept forever ([retention] days = 0)"
        text = f"{self.held} study(ies) held for consults, {self.due} due for purge"
        if self.next_purge is not None and self.next_purge > now:
            hours = (self.next_purge - now + 3599) // 3600
            text += f", next purge in {hours} h" if hours < 48 else f", next in {hours // 24} d"
        if self.pinned:
            text += f", {self.pinned} pinned"
        return text + f" (kept {days} d after close)"


def summarise(rows: Sequence[ConsultRow], now: int, days: int) -> Summary:
    held = [
        r
        for r in rows
        if r.role == Role.CONSULTANT and not r.purged and r.state not in NEVER_FETCHED
    ]
    due = due_purges(rows, now, days)
    later = [d for r in held if not r.pinned and (d := _due_at(r, days)) is not None and d > now]
    return Summary(
        len(held),
        len(due),
        min(later) if days > 0 and later else None,
        sum(1 for r in held if r.pinned),
    )


class RetentionDB:
    """Pins and purges done, in the node's data dir."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self._db = connect(data_dir / DB_NAME)
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def pin(self, consult_id: str, now: int) -> None:
        self._db.execute("INSERT OR IGNORE INTO pins VALUES (?, ?)", (consult_id, now))

    def unpin(self, consult_id: str) -> bool:
        return self._db.execute("DELETE FROM pins WHERE consult_id = ?", (consult_id,)).rowcount > 0

    def pinned(self) -> set[str]:
        return {str(r[0]) for r in self._db.execute("SELECT consult_id FROM pins")}

    def purged(self) -> set[str]:
        return {str(r[0]) for r in self._db.execute("SELECT consult_id FROM purged")}

    def describe(self, consult_id: str) -> str:
        """One line for `consult show`: pinned, purged (when, how many), or ''."""
        row = self._db.execute(
            "SELECT at, instances FROM purged WHERE consult_id = ?", (consult_id,)
        ).fetchone()
        if row is not None:
            at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(int(row[0])))
            return f"study purged {at} ({int(row[1])} instance(s))"
        if consult_id in self.pinned():
            return "pinned: its study is kept past the retention window"
        return ""

    def mark_purged(self, purge: Purge, instances: int, now: int) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO purged VALUES (?, ?, ?, ?)",
            (purge.consult_id, purge.study_uid, now, instances),
        )


def consult_rows(consults: ConsultDB, retention: RetentionDB) -> list[ConsultRow]:
    pinned, purged = retention.pinned(), retention.purged()
    rows = []
    for case in consults.cases():
        consult_id = case.request.id
        role = consults.info(consult_id).role
        closed_at = None
        if case.state in CLOSED:
            closed_at = next(
                (t.at for t in reversed(case.history) if t.target in CLOSED),
                case.request.created_at,
            )
        rows.append(
            ConsultRow(
                consult_id,
                case.request.study_uid,
                role,
                case.state,
                closed_at,
                consult_id in pinned,
                consult_id in purged,
            )
        )
    return rows


def _received_only(store: Store, study_uid: str) -> int | None:
    """How many instances the study has here, or None if any is not from a peer."""
    instances = store.instances(study_uid)
    if any(not i.source.startswith(RECEIVED_SOURCES) for i in instances):
        return None
    return len(instances)


def purge_due(
    consults: ConsultDB,
    retention: RetentionDB,
    store: Store,
    audit: AuditLog,
    now: int,
    days: int,
) -> list[tuple[Purge, int]]:
    """Purge what :func:`due_purges` says is due; one audit record per study removed."""
    from node.core.audit import AuditKind
    from node.dicom.store import UnknownStudy

    done = []
    for purge in due_purges(consult_rows(consults, retention), now, days):
        count = _received_only(store, purge.study_uid)
        if count is None:
            log.warning(
                "retention: study of consult %s also holds images not received from a peer; "
                "it is kept (delete it by hand if it should go)",
                purge.consult_id[:8],
            )
            continue
        if count:
            try:
                store.delete_study(purge.study_uid)
            except UnknownStudy:
                count = 0
            else:
                audit.append(
                    AuditKind.DELETE,
                    now=now,
                    study_uid=purge.study_uid,
                    details={
                        "retention": "purge",
                        "consult": purge.consult_id,
                        "instances": count,
                    },
                )
        retention.mark_purged(purge, count, now)
        done.append((purge, count))
    return done


def summary_for(consults: ConsultDB, data_dir: Path, now: int, days: int) -> Summary:
    retention = RetentionDB(data_dir)
    try:
        return summarise(consult_rows(consults, retention), now, days)
    finally:
        retention.close()


def ids(purges: Iterable[tuple[Purge, int]]) -> list[str]:
    return [p.consult_id for p, _ in purges]
