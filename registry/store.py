"""The registry's SQLite database: verified records and the signaling mailbox.

Every call is a short indexed statement; the server runs them on one worker
thread (:class:`registry.storage.SqliteStore`) so a slow disk never stalls the
event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict, Unpack

from crypto.identity import NodeId
from node.core.db import connect
from registry.errors import RecordError
from registry.limits import MailboxUsage
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
    wire BLOB NOT NULL,
    avail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS records_expiry ON records(expires_at);
CREATE TABLE IF NOT EXISTS mailbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    recipient TEXT NOT NULL,
    sender TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    data BLOB NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    origin TEXT NOT NULL DEFAULT ''
);
"""

# Indexes on columns that older databases gain in _migrate come after it.
_INDEXES = """
CREATE INDEX IF NOT EXISTS mailbox_by_recipient ON mailbox(recipient, sender, id);
CREATE INDEX IF NOT EXISTS mailbox_sender ON mailbox(sender);
CREATE INDEX IF NOT EXISTS mailbox_origin ON mailbox(origin);
CREATE INDEX IF NOT EXISTS mailbox_expiry ON mailbox(expires_at);
CREATE INDEX IF NOT EXISTS records_avail ON records(avail);
"""


def _tags(values: tuple[str, ...]) -> str:
    # "|neuro|msk|": LIKE '%|neuro|%' matches whole items only.
    return "|" + "|".join(v.lower().replace("|", "") for v in values) + "|"


def record_row(record: NodeRecord) -> tuple[str, int, int, bool, str, str, str, bytes, str]:
    """A verified record as both stores keep it: (node_id, seq, expires_at, online, subs,
    jur, lang, wire, avail), the columns of their ``records`` tables in that order."""
    return (
        str(record.node_id),
        record.sequence,
        record.expires_at,
        record.availability.value in ("online", "on_call"),
        _tags(record.subspecialties),
        _tags(record.jurisdictions),
        _tags(record.languages),
        record.to_wire(),
        record.availability.value,
    )


class SearchFilters(TypedDict, total=False):
    """What a record search may ask (every filter given must match); ``after`` and
    ``limit`` page through the matches in node id order."""

    subspecialty: str
    jurisdiction: str
    language: str
    availability: tuple[str, ...]  # any of these values
    after: str  # the last node id of the previous page
    limit: int  # 50 when not given


def search_sql(now: int, filters: SearchFilters, *, postgres: bool) -> tuple[str, list[object]]:
    """The one search of current records: (SQL, parameters) in either store's dialect.

    Each filter is the whole item between its bars, with LIKE's wildcards and the
    backslash escaped (a search for "n_uro" is not a wildcard). The dialects differ in
    three places, all here: placeholders (``?``, or ``$n``); the LIKE escape (SQLite has
    none unless ESCAPE names it, PostgreSQL's default is the backslash); "any of" (SQLite
    ``IN (?, ?)``, PostgreSQL one array parameter)."""
    params: list[object] = []

    def param(value: object) -> str:
        params.append(value)
        return f"${len(params)}" if postgres else "?"

    where = f"expires_at > {param(now)} AND node_id > {param(filters.get('after', ''))}"
    escape = "" if postgres else " ESCAPE '\\'"
    tags = (
        ("subs", filters.get("subspecialty", "")),
        ("jur", filters.get("jurisdiction", "")),
        ("lang", filters.get("language", "")),
    )
    for column, value in tags:
        if value:
            value = value.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            where += f" AND {column} LIKE {param(f'%|{value}|%')}{escape}"
    availability = filters.get("availability", ())
    if availability and postgres:
        where += f" AND avail = ANY({param(list(availability))}::text[])"
    elif availability:
        where += f" AND avail IN ({', '.join(param(a) for a in availability)})"
    limit = param(filters.get("limit", 50))
    # Only placeholders and fixed column names go into the text; every value is a parameter.
    sql = f"SELECT wire FROM records WHERE {where} ORDER BY node_id LIMIT {limit}"  # noqa: S608
    return sql, params


@dataclass(frozen=True)
class Stored:
    sender: NodeId
    data: bytes
    id: int = 0


class RegistryDB:
    def __init__(self, path: str | Path) -> None:
        # NORMAL: a power cut may lose the last messages accepted, never corrupt the mailbox
        self._db = connect(path, synchronous="NORMAL", check_same_thread=False)
        self._db.executescript(_SCHEMA)
        self._migrate()
        self._db.executescript(_INDEXES)
        self._total = self._mailbox_bytes()
        self.last_id = 0  # the last message mailbox_put stored

    def _migrate(self) -> None:
        """Databases from before the byte quotas and the availability column."""
        mailbox = {row[1] for row in self._db.execute("PRAGMA table_info(mailbox)")}
        if "size" not in mailbox:
            self._db.execute("ALTER TABLE mailbox ADD COLUMN size INTEGER NOT NULL DEFAULT 0")
            self._db.execute("UPDATE mailbox SET size = length(data)")
        if "origin" not in mailbox:
            self._db.execute("ALTER TABLE mailbox ADD COLUMN origin TEXT NOT NULL DEFAULT ''")
        records = {row[1] for row in self._db.execute("PRAGMA table_info(records)")}
        if "avail" not in records:
            self._db.execute("ALTER TABLE records ADD COLUMN avail TEXT NOT NULL DEFAULT ''")
            for node_id, wire in self._db.execute("SELECT node_id, wire FROM records").fetchall():
                try:
                    avail = NodeRecord.from_wire(bytes(wire)).availability.value
                except RecordError:
                    avail = ""
                self._db.execute("UPDATE records SET avail = ? WHERE node_id = ?", (avail, node_id))

    def _mailbox_bytes(self) -> int:
        row = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM mailbox").fetchone()
        return int(row[0])

    def close(self) -> None:
        self._db.close()

    # records -------------------------------------------------------------
    def get_wire(self, node_id: NodeId, now: int) -> bytes | None:
        row = self._db.execute(
            "SELECT wire FROM records WHERE node_id = ? AND expires_at > ?", (str(node_id), now)
        ).fetchone()
        return None if row is None else bytes(row[0])

    def known_since(self, node_id: NodeId, since: int) -> bool:
        """True when this registry holds a record of ``node_id`` valid at some time after
        ``since`` (current, or expired no earlier than that)."""
        row = self._db.execute(
            "SELECT 1 FROM records WHERE node_id = ? AND expires_at > ?", (str(node_id), since)
        ).fetchone()
        return row is not None

    def record_count(self) -> int:
        """Rows kept, current or in their grace period (what the records quota counts)."""
        return int(self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0])

    def put(self, record: NodeRecord, now: int) -> None:
        """Store a record already verified by the caller; older sequences are refused.

        A record kept past its expiry (for the mailbox grace period) still holds the
        sequence: a replayed old record never replaces a newer one.
        """
        row = self._db.execute(
            "SELECT wire FROM records WHERE node_id = ?", (str(record.node_id),)
        ).fetchone()
        if row is not None:
            require_newer(record, NodeRecord.from_wire(bytes(row[0])))
        self._db.execute(
            "INSERT OR REPLACE INTO records "
            "(node_id, seq, expires_at, online, subs, jur, lang, wire, avail) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            record_row(record),
        )

    def search(self, now: int, **filters: Unpack[SearchFilters]) -> list[bytes]:
        """Current records matching every filter (:func:`search_sql`)."""
        sql, params = search_sql(now, filters, postgres=False)
        return [bytes(row[0]) for row in self._db.execute(sql, params)]

    def count(self, now: int) -> int:
        row = self._db.execute(
            "SELECT COUNT(*) FROM records WHERE expires_at > ?", (now,)
        ).fetchone()
        return int(row[0])

    # mailbox -------------------------------------------------------------
    def mailbox_usage(
        self, recipient: NodeId, sender: NodeId, now: int, origin: str = ""
    ) -> MailboxUsage:
        """Counts are of unexpired messages; the total counts everything not yet purged.
        ``origin`` is the sender's address key (:func:`registry.limits.address_key`)."""
        to, by = str(recipient), str(sender)
        r = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0), "
            "COALESCE(SUM(sender = ?), 0), COALESCE(SUM(CASE WHEN sender = ? THEN size END), 0) "
            "FROM mailbox WHERE recipient = ? AND expires_at > ?",
            (by, by, to, now),
        ).fetchone()
        s = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM mailbox "
            "WHERE sender = ? AND expires_at > ?",
            (by, now),
        ).fetchone()
        o = self._db.execute(
            "SELECT COALESCE(SUM(size), 0) FROM mailbox WHERE origin = ? AND expires_at > ?",
            (origin, now),
        ).fetchone()
        return MailboxUsage(
            int(r[0]),
            int(r[1]),
            int(r[2]),
            int(r[3]),
            int(s[0]),
            int(s[1]),
            self._total,
            int(o[0]) if origin else 0,
        )

    def mailbox_put(
        self,
        recipient: NodeId,
        sender: NodeId,
        data: bytes,
        *,
        now: int,
        ttl: int,
        cap: int | None = None,
        origin: str = "",
    ) -> bool:
        """Keep a message for later. The caller checks the quotas (:meth:`mailbox_usage`);
        ``cap`` alone is the old per-recipient count check (False when full)."""
        if cap is not None and self.mailbox_count(recipient, now) >= cap:
            return False
        cursor = self._db.execute(
            "INSERT INTO mailbox (recipient, sender, expires_at, data, size, origin) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (str(recipient), str(sender), now + ttl, data, len(data), origin),
        )
        self._total += len(data)
        self.last_id = int(cursor.lastrowid or 0)
        return True

    def mailbox_peek(
        self, recipient: NodeId, now: int, limit: int = 1000, after: int = 0
    ) -> list[Stored]:
        """Messages waiting for ``recipient``, oldest first; deleted only once delivered."""
        rows = self._db.execute(
            "SELECT id, sender, data FROM mailbox WHERE recipient = ? AND expires_at > ? "
            "AND id > ? ORDER BY id LIMIT ?",
            (str(recipient), now, after, limit),
        ).fetchall()
        return [Stored(NodeId.parse(r[1]), bytes(r[2]), r[0]) for r in rows]

    def mailbox_delete(self, ids: list[int]) -> None:
        self._db.executemany("DELETE FROM mailbox WHERE id = ?", [(i,) for i in ids])
        if ids:
            self._total = self._mailbox_bytes()

    def mailbox_count(self, recipient: NodeId, now: int) -> int:
        row = self._db.execute(
            "SELECT COUNT(*) FROM mailbox WHERE recipient = ? AND expires_at > ?",
            (str(recipient), now),
        ).fetchone()
        return int(row[0])

    @property
    def mailbox_total(self) -> int:
        return self._total

    def purge(self, now: int, record_grace: int = 0) -> int:
        """Drop expired mail, and records expired more than ``record_grace`` seconds ago
        (kept that long so their node still gets mail and their sequence still holds)."""
        a = self._db.execute(
            "DELETE FROM records WHERE expires_at <= ?", (now - record_grace,)
        ).rowcount
        b = self._db.execute("DELETE FROM mailbox WHERE expires_at <= ?", (now,)).rowcount
        self._total = self._mailbox_bytes()
        return int(a) + int(b)
