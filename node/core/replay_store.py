"""The replay guard on disk, so a restart does not forget which messages arrived.

Node messages (consult requests, responses, reports) live up to seven days in
a registry mailbox; a guard kept in memory forgets them at every restart, and
every short-lived CLI node is a restart. This one keeps (sender, nonce, expiry)
in ``replay.db`` in the node's data directory (0600).

Bounded: rows leave when their message expires, and the table holds at most
``capacity`` rows. When full, the soonest-expiring rows go first and the
guard raises its *floor* to their expiry: from then on a message expiring at
or before the floor is refused outright, since it may be one of those
forgotten (a flood of fresh messages cannot evict an old one to replay it).
"""

from __future__ import annotations

from pathlib import Path

from crypto.envelope import ReplayGuard
from crypto.errors import Replayed
from node.core.db import connect, transaction

FILE_NAME = "replay.db"
CAPACITY = 100_000
PRUNE_EVERY = 1000  # inserts between sweeps of expired rows

_SCHEMA = """
CREATE TABLE IF NOT EXISTS seen (
    sender BLOB NOT NULL,
    nonce BLOB NOT NULL,
    expires INTEGER NOT NULL,
    PRIMARY KEY (sender, nonce)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_expires ON seen (expires);
CREATE TABLE IF NOT EXISTS floor (id INTEGER PRIMARY KEY CHECK (id = 0), expires INTEGER);
"""


class PersistentReplayGuard(ReplayGuard):
    def __init__(self, path: str | Path, capacity: int = CAPACITY) -> None:
        super().__init__(capacity)
        self._db = connect(path, check_same_thread=False)
        self._db.executescript(_SCHEMA)
        self._inserts = 0
        self._count = self._recount()

    @classmethod
    def in_data_dir(cls, data_dir: Path, capacity: int = CAPACITY) -> PersistentReplayGuard:
        return cls(data_dir / FILE_NAME, capacity)

    def close(self) -> None:
        self._db.close()

    def __len__(self) -> int:
        return self._count

    def _recount(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM seen").fetchone()[0])

    @property
    def floor(self) -> int:
        row = self._db.execute("SELECT expires FROM floor WHERE id = 0").fetchone()
        return -1 if row is None else int(row[0])

    def check_and_remember(self, sender: bytes, nonce: bytes, expires: int, now: int) -> None:
        if expires <= self.floor:
            raise Replayed(
                "this message is older than what the replay guard still remembers; "
                "refused in case it is a replay (ask the sender to send it again)"
            )
        seen = self._db.execute(
            "SELECT 1 FROM seen WHERE sender = ? AND nonce = ?", (sender, nonce)
        ).fetchone()
        if seen is not None:
            raise Replayed("this message was already received once (replay refused)")
        self._inserts += 1
        if self._inserts % PRUNE_EVERY == 1 or self._count >= self._capacity:
            self._db.execute("DELETE FROM seen WHERE expires < ?", (now,))
            self._count = self._recount()
        if self._count >= self._capacity:
            self._evict(self._count - self._capacity + 1)
            self._count = self._recount()
        self._db.execute("INSERT INTO seen VALUES (?, ?, ?)", (sender, nonce, expires))
        self._count += 1

    def _evict(self, count: int) -> None:
        with transaction(self._db):  # the floor moves with the rows it stands for
            row = self._db.execute(
                "SELECT MAX(expires) FROM (SELECT expires FROM seen ORDER BY expires LIMIT ?)",
                (count,),
            ).fetchone()
            self._db.execute("DELETE FROM seen WHERE expires <= ?", (row[0],))
            self._db.execute(
                "INSERT OR REPLACE INTO floor VALUES (0, MAX(?, ?))", (row[0], self.floor)
            )

    def export(self) -> list[tuple[bytes, bytes, int]]:
        rows = self._db.execute("SELECT sender, nonce, expires FROM seen").fetchall()
        return [(bytes(s), bytes(n), int(e)) for s, n, e in rows]

    def load(self, items: list[tuple[bytes, bytes, int]], now: int) -> None:
        self._db.executemany(
            "INSERT OR IGNORE INTO seen VALUES (?, ?, ?)",
            [(s, n, e) for s, n, e in items if e >= now],
        )
        self._count = self._recount()
