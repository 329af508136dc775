"""The registry's SQLite database: verified records and the signaling mailbox.

Every call is a short indexed statement (microseconds), so the server runs them
on the event loop instead of paying a thread hop per request.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from crypto.identity import NodeId
from registry.records import NodeRecord, require_newer

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    node_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    online INTEGER NOT NULL,
    subs TEXT NOT NULL,
    jur TEXT NOT NULL,
    lang TEXT NOT NULL,
    wire BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS records_expiry ON records(expires_at);
CREATE TABLE IF NOT EXISTS mailbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    recipient TEXT NOT NULL,
    sender TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS mailbox_recipient ON mailbox(recipient, id);
CREATE INDEX IF NOT EXISTS mailbox_expiry ON mailbox(expires_at);
"""


def _tags(values: tuple[str, ...]) -> str:
    # "|neuro|msk|": LIKE '%|neuro|%' matches whole items only.
    return "|" + "|".join(v.lower().replace("|", "") for v in values) + "|"


@dataclass(frozen=True)
class Stored:
    sender: NodeId
    data: bytes
    id: int = 0


class RegistryDB:
    def __init__(self, path: str | Path) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    # records -------------------------------------------------------------
    def get_wire(self, node_id: NodeId, now: int) -> bytes | None:
        row = self._db.execute(
            "SELECT wire FROM records WHERE node_id = ? AND expires_at > ?", (str(node_id), now)
        ).fetchone()
        return None if row is None else bytes(row[0])

    def put(self, record: NodeRecord, now: int) -> None:
        """Store a record already verified by the caller; older sequences are refused."""
        current = self.get_wire(record.node_id, now)
        if current is not None:
            require_newer(record, NodeRecord.from_wire(current))
        self._db.execute(
            "INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                str(record.node_id),
                record.sequence,
                record.expires_at,
                int(record.availability.value in ("online", "on_call")),
                _tags(record.subspecialties),
                _tags(record.jurisdictions),
                _tags(record.languages),
                record.to_wire(),
            ),
        )

    def search(
        self,
        now: int,
        *,
        subspecialty: str = "",
        jurisdiction: str = "",
        language: str = "",
        online: bool = False,
        after: str = "",
        limit: int = 50,
    ) -> list[bytes]:
        sql = "SELECT wire FROM records WHERE expires_at > ? AND node_id > ?"
        params: list[object] = [now, after]
        for column, value in (("subs", subspecialty), ("jur", jurisdiction), ("lang", language)):
            if value:
                sql += f" AND {column} LIKE ? ESCAPE '\\'"
                escaped = (
                    value.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                )
                params.append(f"%|{escaped}|%")
        if online:
            sql += " AND online = 1"
        sql += " ORDER BY node_id LIMIT ?"
        params.append(limit)
        return [bytes(row[0]) for row in self._db.execute(sql, params)]

    def count(self, now: int) -> int:
        row = self._db.execute(
            "SELECT COUNT(*) FROM records WHERE expires_at > ?", (now,)
        ).fetchone()
        return int(row[0])

    # mailbox -------------------------------------------------------------
    def mailbox_put(
        self, recipient: NodeId, sender: NodeId, data: bytes, *, now: int, ttl: int, cap: int
    ) -> bool:
        """Keep a message for later; False when the recipient's mailbox is full."""
        row = self._db.execute(
            "SELECT COUNT(*) FROM mailbox WHERE recipient = ? AND expires_at > ?",
            (str(recipient), now),
        ).fetchone()
        if int(row[0]) >= cap:
            return False
        self._db.execute(
            "INSERT INTO mailbox (recipient, sender, expires_at, data) VALUES (?, ?, ?, ?)",
            (str(recipient), str(sender), now + ttl, data),
        )
        return True

    def mailbox_peek(self, recipient: NodeId, now: int, limit: int = 1000) -> list[Stored]:
        """Messages waiting for ``recipient``, oldest first; deleted only once delivered."""
        rows = self._db.execute(
            "SELECT id, sender, data FROM mailbox WHERE recipient = ? AND expires_at > ? "
            "ORDER BY id LIMIT ?",
            (str(recipient), now, limit),
        ).fetchall()
        return [Stored(NodeId.parse(r[1]), bytes(r[2]), r[0]) for r in rows]

    def mailbox_delete(self, ids: list[int]) -> None:
        self._db.executemany("DELETE FROM mailbox WHERE id = ?", [(i,) for i in ids])

    def mailbox_count(self, recipient: NodeId, now: int) -> int:
        row = self._db.execute(
            "SELECT COUNT(*) FROM mailbox WHERE recipient = ? AND expires_at > ?",
            (str(recipient), now),
        ).fetchone()
        return int(row[0])

    def purge(self, now: int) -> int:
        a = self._db.execute("DELETE FROM records WHERE expires_at <= ?", (now,)).rowcount
        b = self._db.execute("DELETE FROM mailbox WHERE expires_at <= ?", (now,)).rowcount
        return int(a) + int(b)
