"""The registry's storage on PostgreSQL, shared by several instances behind one URL.

Records, mailbox, rate-limit buckets and TURN accounting live in the database,
so limits hold across instances. A relayed message is written to the mailbox
before it is acknowledged and deleted once written to its recipient's socket;
the insert's ``NOTIFY radmesh_mail`` tells the instance that holds the
recipient's socket to deliver it (each instance also polls the mailbox of its
connected nodes, so a lost notification only delays a message). Delivery is at
least once: recipients already drop replayed envelopes.

Schema changes are ``registry/migrations/NNN_name.sql``, applied in order under an
advisory lock and recorded in ``schema_version``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import inspect
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, ParamSpec, TypeVar, Unpack

from crypto.errors import CryptoError
from crypto.identity import NodeId
from registry.errors import RegistryError, StaleRecord
from registry.limits import MailboxUsage
from registry.records import NodeRecord, require_newer
from registry.storage import KickListener, MailListener, MailOffer, node_key, parse_node
from registry.store import SearchFilters, Stored, record_row, search_sql

try:
    import asyncpg
except ImportError:  # pragma: no cover - the [postgres] extra is not installed
    asyncpg = None

log = logging.getLogger(__name__)

MAIL_CHANNEL = "radmesh_mail"
KICK_CHANNEL = "radmesh_kick"
MIGRATION_LOCK = 0x7261646D  # "radm": one instance migrates at a time
HEARTBEAT = 5.0  # seconds between an instance's heartbeats
INSTANCE_TIMEOUT = 20  # seconds without one and its sockets count as gone
NOTIFY_DATA = 5000  # messages up to this size travel inside their notification
TOTAL_REFRESH = 5.0  # seconds between sums of the whole mailbox (the global byte cap)
NOT_KNOWN = (
    "this registry keeps mail only for nodes with a current record here, and the recipient has none"
)


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every file in registry/migrations, in order."""
    found = []
    for entry in resources.files("registry").joinpath("migrations").iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:3].isdigit():
            found.append((int(name[:3]), name, entry.read_text(encoding="utf-8")))
    return sorted(found)


P = ParamSpec("P")
T = TypeVar("T")


def _unavailable(method: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Database failures become a :class:`RegistryError` a person can act on (the server
    answers 503 over HTTP, or an error frame on a signaling socket)."""

    @functools.wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise RegistryError(
                f"the registry database is unavailable ({type(exc).__name__}); try again shortly"
            ) from exc

    return call


def _guarded(cls: type[PostgresStore]) -> type[PostgresStore]:
    for name, value in list(vars(cls).items()):
        public = not name.startswith("_") and name not in ("open", "close")
        if public and inspect.iscoroutinefunction(value):
            setattr(cls, name, _unavailable(value))
    return cls


@_guarded
class PostgresStore:
    """:class:`registry.storage.RegistryStore` on a PostgreSQL pool (asyncpg)."""

    shared = True

    def __init__(self, url: str, *, min_size: int = 2, max_size: int = 20) -> None:
        if asyncpg is None:
            raise RegistryError("PostgreSQL support needs asyncpg: pip install 'radmesh[postgres]'")
        self.url = url
        self.instance = f"{os.uname().nodename[:40]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._min, self._max = min_size, max_size
        self._pool: Any = None
        self._listener: Any = None
        self._mail: list[MailListener] = []
        self._kick: list[KickListener] = []
        self._heartbeat: asyncio.Task[None] | None = None
        self._total_bytes = 0
        self._to_delete: list[int] = []
        self._deleting: asyncio.Task[None] | None = None
        self._total_at = -TOTAL_REFRESH

    # lifecycle -------------------------------------------------------------
    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=self._min,
                max_size=self._max,
                command_timeout=30,
                reset=_reset,
            )
        except (OSError, asyncpg.PostgresError) as exc:
            raise RegistryError(
                f"cannot reach the registry database: {exc}; check the --db URL and that "
                "PostgreSQL is running"
            ) from exc
        await self._migrate()
        await self._pool.execute(
            "INSERT INTO instances (id) VALUES ($1) ON CONFLICT (id) DO UPDATE SET seen = now()",
            self.instance,
        )
        self._listener = await asyncpg.connect(self.url)
        await self._listener.add_listener(MAIL_CHANNEL, self._on_mail)
        await self._listener.add_listener(KICK_CHANNEL, self._on_kick)
        self._heartbeat = asyncio.create_task(self._beat())

    async def _migrate(self) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                "version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_version")}
            for version, name, sql in migrations():
                if version in done:
                    continue
                log.info("applying registry migration %s", name)
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_version (version, name) VALUES ($1, $2)", version, name
                )

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT)
            try:
                await self._pool.execute(
                    "INSERT INTO instances (id) VALUES ($1) "
                    "ON CONFLICT (id) DO UPDATE SET seen = now()",
                    self.instance,
                )
                if self._listener is not None and self._listener.is_closed():
                    await self._relisten()
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("registry database heartbeat failed: %s", exc)

    async def _relisten(self) -> None:
        """The LISTEN connection broke: a new one (the mailbox poll covers the gap)."""
        self._listener = await asyncpg.connect(self.url)
        await self._listener.add_listener(MAIL_CHANNEL, self._on_mail)
        await self._listener.add_listener(KICK_CHANNEL, self._on_kick)

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        if self._pool is not None:
            with contextlib.suppress(OSError, asyncpg.PostgresError):
                await self._pool.execute("DELETE FROM presence WHERE instance = $1", self.instance)
                await self._pool.execute(
                    "DELETE FROM address_sockets WHERE instance = $1", self.instance
                )
                await self._pool.execute("DELETE FROM instances WHERE id = $1", self.instance)
        if self._listener is not None:
            with contextlib.suppress(OSError, asyncpg.PostgresError):
                await self._listener.close()
        if self._pool is not None:
            await self._pool.close()

    # notifications ---------------------------------------------------------
    def _on_mail(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        # "recipient id" or "recipient id sender base64-data" (see mailbox_offer)
        parts = payload.split(" ")
        stored = None
        try:
            node_id, ident = parse_node(parts[0]), int(parts[1])
            if len(parts) == 4:
                data = base64.b64decode(parts[3], validate=True)
                stored = Stored(parse_node(parts[2]), data, ident)
        except (ValueError, IndexError, CryptoError):  # a bad payload is dropped
            return
        for listener in self._mail:
            listener(node_id, ident, stored)

    def _on_kick(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        node, _, instance = payload.partition(" ")
        if instance == self.instance:
            return
        try:
            node_id = NodeId.parse(node)
        except CryptoError:  # a bad payload is dropped
            return
        for listener in self._kick:
            listener(node_id, instance)

    def on_mail(self, listener: MailListener) -> None:
        self._mail.append(listener)

    def on_kick(self, listener: KickListener) -> None:
        self._kick.append(listener)

    # records ---------------------------------------------------------------
    async def get_wire(self, node_id: NodeId, now: int) -> bytes | None:
        wire = await self._pool.fetchval(
            "SELECT wire FROM records WHERE node_id = $1 AND expires_at > $2",
            node_key(node_id),
            now,
        )
        return None if wire is None else bytes(wire)

    async def known_since(self, node_id: NodeId, since: int) -> bool:
        found = await self._pool.fetchval(
            "SELECT 1 FROM records WHERE node_id = $1 AND expires_at > $2", node_key(node_id), since
        )
        return found is not None

    async def record_count(self) -> int:
        return int(await self._pool.fetchval("SELECT COUNT(*) FROM records"))

    async def put(self, record: NodeRecord, now: int) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            held = await conn.fetchval(
                "SELECT wire FROM records WHERE node_id = $1 FOR UPDATE", str(record.node_id)
            )
            if held is not None:
                require_newer(record, NodeRecord.from_wire(bytes(held)))
            status = await conn.execute(
                "INSERT INTO records (node_id, seq, expires_at, online, subs, jur, lang, wire, "
                "avail) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) "
                "ON CONFLICT (node_id) DO UPDATE SET seq = EXCLUDED.seq, "
                "expires_at = EXCLUDED.expires_at, online = EXCLUDED.online, "
                "subs = EXCLUDED.subs, jur = EXCLUDED.jur, lang = EXCLUDED.lang, "
                "wire = EXCLUDED.wire, avail = EXCLUDED.avail "
                # Two first records of one node at once: the higher sequence wins.
                "WHERE records.seq < EXCLUDED.seq",
                *record_row(record),
            )
            if _rows(status) == 0:
                raise StaleRecord(
                    f"record sequence {record.sequence} is not newer than the one another "
                    "registry instance stored just now: publish with a higher sequence number"
                )

    async def search(self, now: int, **filters: Unpack[SearchFilters]) -> list[bytes]:
        sql, params = search_sql(now, filters, postgres=True)
        rows = await self._pool.fetch(sql, *params)
        return [bytes(r["wire"]) for r in rows]

    async def count(self, now: int) -> int:
        return int(
            await self._pool.fetchval("SELECT COUNT(*) FROM records WHERE expires_at > $1", now)
        )

    # mailbox ---------------------------------------------------------------
    async def mailbox_offer(self, offer: MailOffer) -> tuple[int, str | None]:
        to = node_key(offer.recipient)
        async with self._pool.acquire() as conn:
            # Writers to one recipient queue on its lock, so its quota is checked and
            # filled in turn across instances (sender/address/total quotas may overshoot
            # by the messages in flight at once). BEGIN and the lock in one round trip.
            await conn.execute(f"BEGIN; SELECT pg_advisory_xact_lock({_lock_key(to)})")
            try:
                result = await self._offer_locked(conn, offer)
            except BaseException:
                with contextlib.suppress(Exception):
                    await conn.execute("ROLLBACK")
                raise
            await conn.execute("COMMIT" if result[1] is None else "ROLLBACK")
        if result[1] is None:
            self._total_bytes += len(offer.data)
        return result

    async def _offer_locked(self, conn: Any, offer: MailOffer) -> tuple[int, str | None]:
        to, by, now = node_key(offer.recipient), node_key(offer.sender), offer.now
        # One round trip for what the quotas count (after the lock: a fresh snapshot).
        u = await conn.fetchrow(
            "SELECT (SELECT 1 FROM records WHERE node_id = $2 AND expires_at > $4) AS known, "
            "r.n, r.b, r.pn, r.pb, s.n AS sn, s.b AS sb, "
            "(SELECT COALESCE(SUM(size), 0) FROM mailbox "
            " WHERE $3 <> '' AND origin = $3 AND expires_at > $5) AS ob "
            "FROM (SELECT COUNT(*) AS n, COALESCE(SUM(size), 0) AS b, "
            "  COUNT(*) FILTER (WHERE sender = $1) AS pn, "
            "  COALESCE(SUM(size) FILTER (WHERE sender = $1), 0) AS pb "
            "  FROM mailbox WHERE recipient = $2 AND expires_at > $5) AS r, "
            " (SELECT COUNT(*) AS n, COALESCE(SUM(size), 0) AS b FROM mailbox "
            "  WHERE sender = $1 AND expires_at > $5) AS s",
            by,
            to,
            offer.origin,
            offer.known_since if offer.known_since is not None else -(2**62),
            now,
        )
        if offer.known_since is not None and u["known"] is None:
            return 0, NOT_KNOWN
        total = await self._total(conn)
        usage = MailboxUsage(
            int(u["n"]),
            int(u["b"]),
            int(u["pn"]),
            int(u["pb"]),
            int(u["sn"]),
            int(u["sb"]),
            int(total),
            int(u["ob"]),
        )
        refused = offer.quota.refusal(usage, len(offer.data))
        if refused is not None:
            return 0, refused
        ident = await conn.fetchval(
            # The notification carries a small message itself (NOTIFY payloads stop at
            # 8000 bytes), so the instance holding the recipient need not read it back.
            "WITH m AS (INSERT INTO mailbox (recipient, sender, expires_at, data, size, "
            "origin) VALUES ($1, $2, $3, $4, $5, $6) RETURNING id) "
            "SELECT id FROM m, LATERAL pg_notify($7, $1 || ' ' || m.id || CASE "
            "WHEN $5 <= $8 THEN ' ' || $2 || ' ' || translate(encode($4, 'base64'), E'\\n', '') "
            "ELSE '' END)",
            to,
            by,
            now + offer.ttl,
            offer.data,
            len(offer.data),
            offer.origin,
            MAIL_CHANNEL,
            NOTIFY_DATA,
        )
        return int(ident), None

    async def _total(self, conn: Any) -> int:
        """The whole mailbox's bytes, summed at most every TOTAL_REFRESH seconds (a scan
        of the table): the global cap may overshoot by what all instances store meanwhile."""
        if time.monotonic() - self._total_at > TOTAL_REFRESH:
            self._total_bytes = int(
                await conn.fetchval("SELECT COALESCE(SUM(size), 0) FROM mailbox")
            )
            self._total_at = time.monotonic()
        return self._total_bytes

    async def mailbox_peek(
        self, recipient: NodeId, now: int, limit: int = 1000, after: int = 0
    ) -> list[Stored]:
        rows = await self._pool.fetch(
            "SELECT id, sender, data FROM mailbox WHERE recipient = $1 AND expires_at > $2 "
            "AND id > $3 ORDER BY id LIMIT $4",
            str(recipient),
            now,
            after,
            limit,
        )
        return [Stored(parse_node(r["sender"]), bytes(r["data"]), int(r["id"])) for r in rows]

    async def mailbox_waiting(self, recipients: list[str], now: int) -> list[tuple[str, int]]:
        """(recipient, id) of messages waiting for any of ``recipients`` (the poll)."""
        rows = await self._pool.fetch(
            "SELECT recipient, id FROM mailbox WHERE recipient = ANY($1::text[]) "
            "AND expires_at > $2 ORDER BY id LIMIT 10000",
            recipients,
            now,
        )
        return [(r["recipient"], int(r["id"])) for r in rows]

    async def mailbox_delete(self, ids: list[int]) -> None:
        """Deletes that arrive together go in one statement (one per delivered message
        otherwise); returns once ``ids`` are gone."""
        if not ids:
            return
        self._to_delete.extend(ids)
        if self._deleting is None or self._deleting.done():
            self._deleting = asyncio.get_running_loop().create_task(self._flush_deletes())
        await asyncio.shield(self._deleting)

    async def _flush_deletes(self) -> None:
        while self._to_delete:
            batch, self._to_delete = self._to_delete, []
            await self._pool.execute("DELETE FROM mailbox WHERE id = ANY($1::bigint[])", batch)

    async def mailbox_total(self) -> int:
        return int(await self._pool.fetchval("SELECT COALESCE(SUM(size), 0) FROM mailbox"))

    async def purge(self, now: int, record_grace: int = 0) -> int:
        async with self._pool.acquire() as conn:
            a = await conn.execute("DELETE FROM records WHERE expires_at <= $1", now - record_grace)
            b = await conn.execute("DELETE FROM mailbox WHERE expires_at <= $1", now)
            await conn.execute(
                "DELETE FROM presence p WHERE NOT EXISTS (SELECT 1 FROM instances i "
                "WHERE i.id = p.instance AND i.seen > now() - make_interval(secs => $1))",
                INSTANCE_TIMEOUT,
            )
            await conn.execute(
                "DELETE FROM address_sockets s WHERE NOT EXISTS (SELECT 1 FROM instances i "
                "WHERE i.id = s.instance AND i.seen > now() - make_interval(secs => $1))",
                INSTANCE_TIMEOUT,
            )
            await conn.execute(
                "DELETE FROM instances WHERE seen < now() - make_interval(secs => $1)",
                INSTANCE_TIMEOUT * 10,
            )
            # A bucket untouched for a day is full again whatever its rate.
            await conn.execute("DELETE FROM rate_buckets WHERE updated < $1", now - 86400)
        return _rows(a) + _rows(b)

    # counters --------------------------------------------------------------
    async def rate_allow(
        self, kind: str, key: str, rate: float, burst: float, now: float, cost: float = 1.0
    ) -> bool:
        # One statement: refill by the time elapsed, take ``cost`` if there is enough.
        # No row comes back when the bucket is short (nothing is written then).
        row = await self._pool.fetchrow(
            "WITH p AS (SELECT $3::float8 AS now, $4::float8 AS burst, $5::float8 AS rate, "
            "$6::float8 AS cost) "
            "INSERT INTO rate_buckets AS b (kind, key, tokens, updated) "
            "SELECT $1, $2, p.burst - p.cost, p.now FROM p "
            "ON CONFLICT (kind, key) DO UPDATE SET "
            "tokens = LEAST($4::float8, b.tokens + GREATEST(0, $3::float8 - b.updated) "
            "* $5::float8) - $6::float8, "
            "updated = GREATEST(b.updated, $3::float8) "
            "WHERE LEAST($4::float8, b.tokens + GREATEST(0, $3::float8 - b.updated) * $5::float8) "
            ">= $6::float8 "
            "RETURNING tokens",
            kind,
            key[:128],
            float(now),
            float(burst),
            float(rate),
            float(cost),
        )
        return row is not None

    async def socket_open(self, address: str, cap: int) -> bool:
        """Count one more open socket from ``address`` here, unless the sockets of all
        live instances together are already at ``cap`` (then nothing is counted).

        Openers of one address queue on its advisory lock, so two instances cannot
        both take the last place."""
        key = address[:128]
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _lock_key("sock " + key))
            held = await conn.fetchval(
                "SELECT COALESCE(SUM(s.n), 0) FROM address_sockets s JOIN instances i "
                "ON i.id = s.instance WHERE s.address = $1 "
                "AND (s.instance = $2 OR i.seen > now() - make_interval(secs => $3))",
                key,
                self.instance,
                INSTANCE_TIMEOUT,
            )
            if int(held) >= cap:
                return False
            await conn.execute(
                "INSERT INTO address_sockets AS s (instance, address, n) VALUES ($1, $2, 1) "
                "ON CONFLICT (instance, address) DO UPDATE SET n = s.n + 1",
                self.instance,
                key,
            )
        return True

    async def socket_closed(self, address: str) -> None:
        """One socket from ``address`` counted by :meth:`socket_open` closed here."""
        async with self._pool.acquire() as conn, conn.transaction():
            left = await conn.fetchval(
                "UPDATE address_sockets SET n = n - 1 WHERE instance = $1 AND address = $2 "
                "RETURNING n",
                self.instance,
                address[:128],
            )
            if left is not None and left <= 0:
                await conn.execute(
                    "DELETE FROM address_sockets WHERE instance = $1 AND address = $2 AND n <= 0",
                    self.instance,
                    address[:128],
                )

    async def turn_issued(self, node_id: NodeId, now: int) -> int:
        return int(
            await self._pool.fetchval(
                "INSERT INTO turn_issued AS t (node_id, issued, last_at) VALUES ($1, 1, $2) "
                "ON CONFLICT (node_id) DO UPDATE SET issued = t.issued + 1, last_at = $2 "
                "RETURNING issued",
                node_key(node_id),
                now,
            )
        )

    # instances -------------------------------------------------------------
    async def connected(self, node_id: NodeId) -> None:
        """This instance holds ``node_id``'s socket now; others drop theirs."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO presence (node_id, instance) VALUES ($1, $2) "
                "ON CONFLICT (node_id) DO UPDATE SET instance = $2, since = now()",
                node_key(node_id),
                self.instance,
            )
            await conn.execute(
                "SELECT pg_notify($1, $2)", KICK_CHANNEL, f"{node_id} {self.instance}"
            )

    async def disconnected(self, node_id: NodeId) -> None:
        await self._pool.execute(
            "DELETE FROM presence WHERE node_id = $1 AND instance = $2",
            node_key(node_id),
            self.instance,
        )

    async def online_elsewhere(self, node_id: NodeId) -> bool:
        found = await self._pool.fetchval(
            "SELECT 1 FROM presence p JOIN instances i ON i.id = p.instance "
            "WHERE p.node_id = $1 AND p.instance <> $2 "
            "AND i.seen > now() - make_interval(secs => $3)",
            node_key(node_id),
            self.instance,
            INSTANCE_TIMEOUT,
        )
        return found is not None


async def _reset(conn: Any) -> None:
    """A connection back in the pool: only an interrupted transaction needs undoing (this
    store sets no session state), so no reset round trip after every query."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


def _lock_key(recipient: str) -> int:
    """A recipient's advisory lock: a signed 64-bit number (safe to put in SQL text)."""
    digest = hashlib.blake2b(recipient.encode(), digest_size=8, person=b"radmesh-mail").digest()
    return int.from_bytes(digest, "big", signed=True)


def _rows(status: str) -> int:
    """asyncpg's command status ("DELETE 3") as a row count."""
    try:
        return int(status.rsplit(" ", 1)[-1])
    except ValueError:
        return 0
