"""The trust store: which peer keys this node trusts, and why.

States: unknown (never seen), pending (first contact, waiting in the inbox for
a person), verified (safety number confirmed, or explicitly allowed), trusted
by org (certificate from an organisation key this node trusts), revoked.
Revocation wins over everything and applies on the next check: answers are
cached only until the database changes (this process's writes, or another
process's, seen through SQLite's ``data_version``) or the second turns.

A running node :meth:`~TrustStore.subscribe` s to changes (its own, and, through
:meth:`~TrustStore.poll`, those `radmesh trust` makes from another process) and
closes the connections and live sessions of every peer no longer trusted.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from crypto.errors import CryptoError, Revoked
from crypto.identity import PUBLIC_KEY_SIZE, NodeId
from crypto.org import RevocationList, verify_certificate, verify_revocations
from node.core.db import connect
from registry.errors import TrustError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS trust (
    node_id TEXT PRIMARY KEY,
    public_key BLOB,
    state TEXT NOT NULL,
    method TEXT NOT NULL,
    certificate BLOB,
    summary TEXT NOT NULL DEFAULT '',
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS trusted_orgs (org_key BLOB PRIMARY KEY, added_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS revocations (
    org_key BLOB PRIMARY KEY, seq INTEGER NOT NULL, wire BLOB NOT NULL
);
"""
MAX_INBOX = 1000
MAX_CACHED = 4096  # trust answers kept between database changes (cleared when full)

log = logging.getLogger(__name__)
Listener = Callable[[], None]


class TrustState(enum.StrEnum):
    UNKNOWN = "unknown"
    PENDING = "pending"
    VERIFIED = "verified"
    TRUSTED_BY_ORG = "trusted-by-org"
    REVOKED = "revoked"


@dataclass(frozen=True)
class InboxEntry:
    node_id: NodeId
    public_key: bytes
    summary: str
    since: int


class TrustStore:
    def __init__(self, path: str | Path) -> None:
        self._db = connect(path, check_same_thread=False)
        self._db.executescript(_SCHEMA)
        self._listeners: list[Listener] = []
        self._generation = 0  # this connection's writes (data_version counts the others')
        self._seen_version = self._data_version()
        self._cache: dict[tuple[bytes, bytes | None, int], bool] = {}
        self._cache_stamp: tuple[int, int] = (-1, -1)

    def close(self) -> None:
        self._db.close()

    # change notification ------------------------------------------------------
    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener()`` after every change that may take trust away (or give it).

        Returns the function that unsubscribes it.
        """
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def poll(self) -> bool:
        """Notice changes another process (`radmesh trust ...`) wrote; True, and listeners
        told, if there were any since the last poll."""
        version = self._data_version()
        if version == self._seen_version:
            return False
        self._seen_version = version
        self._notify()
        return True

    def _data_version(self) -> int:
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def _wrote(self, notify: bool = True) -> None:
        self._generation += 1
        if notify:
            self._notify()

    def _notify(self) -> None:
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:
                log.exception("a trust change listener failed")

    # queries ------------------------------------------------------------
    def _row(self, node_id: NodeId) -> tuple[bytes | None, str, bytes | None] | None:
        row = self._db.execute(
            "SELECT public_key, state, certificate FROM trust WHERE node_id = ?", (str(node_id),)
        ).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def certificate(self, public_key: bytes) -> bytes | None:
        """The organisation certificate kept for this key (:meth:`keep_certificate`)."""
        row = self._row(NodeId.from_public_key(public_key))
        return None if row is None or row[2] is None else bytes(row[2])

    def trusted_orgs(self) -> frozenset[bytes]:
        return frozenset(bytes(r[0]) for r in self._db.execute("SELECT org_key FROM trusted_orgs"))

    def revocation_lists(self) -> dict[bytes, RevocationList]:
        result: dict[bytes, RevocationList] = {}
        for org_key, wire in self._db.execute("SELECT org_key, wire FROM revocations"):
            result[bytes(org_key)] = verify_revocations(bytes(wire), bytes(org_key))
        return result

    def state(self, public_key: bytes, now: int, certificate: bytes | None = None) -> TrustState:
        """The key's trust state now; ``certificate`` defaults to the one last seen."""
        node_id = NodeId.from_public_key(public_key)
        row = self._row(node_id)
        stored_state = TrustState(row[1]) if row else TrustState.UNKNOWN
        if stored_state is TrustState.REVOKED:
            return TrustState.REVOKED
        revocations = self.revocation_lists()
        if any(public_key in rl.revoked_node_keys for rl in revocations.values()):
            return TrustState.REVOKED
        if stored_state is TrustState.VERIFIED:
            return TrustState.VERIFIED
        cert = certificate if certificate is not None else (row[2] if row else None)
        if cert is not None:
            try:
                verify_certificate(
                    bytes(cert),
                    trusted_orgs=self.trusted_orgs(),
                    now=now,
                    revocations=revocations,
                    node_key=public_key,
                )
                return TrustState.TRUSTED_BY_ORG
            except Revoked:
                return TrustState.REVOKED
            except CryptoError:
                pass  # expired, untrusted issuer, malformed: the cert simply adds no trust
        return stored_state

    def is_trusted(self, public_key: bytes, now: int, certificate: bytes | None = None) -> bool:
        """May this key receive our data? Asked for every message a peer sends or gets, so
        the answer is cached until the database changes or ``now`` moves on."""
        stamp = (self._data_version(), self._generation)
        if stamp != self._cache_stamp or len(self._cache) >= MAX_CACHED:
            self._cache.clear()
            self._cache_stamp = stamp
        key = (public_key, certificate, now)
        answer = self._cache.get(key)
        if answer is None:
            answer = self._cache[key] = self.state(public_key, now, certificate) in (
                TrustState.VERIFIED,
                TrustState.TRUSTED_BY_ORG,
            )
        return answer

    def inbox(self) -> list[InboxEntry]:
        rows = self._db.execute(
            "SELECT node_id, public_key, summary, updated_at FROM trust WHERE state = ? "
            "ORDER BY updated_at",
            (TrustState.PENDING.value,),
        ).fetchall()
        return [InboxEntry(NodeId.parse(r[0]), bytes(r[1]), r[2], r[3]) for r in rows]

    def known(self) -> dict[NodeId, TrustState]:
        return {
            NodeId.parse(r[0]): TrustState(r[1])
            for r in self._db.execute("SELECT node_id, state FROM trust")
        }

    # changes ------------------------------------------------------------
    def _set(
        self,
        node_id: NodeId,
        public_key: bytes | None,
        state: TrustState,
        method: str,
        now: int,
        certificate: bytes | None = None,
        summary: str = "",
    ) -> None:
        if public_key is not None and NodeId.from_public_key(public_key) != node_id:
            raise TrustError("this key does not belong to that node id; refusing")
        row = self._row(node_id)
        if (
            row is not None
            and row[0] is not None
            and public_key is not None
            and row[0] != public_key
        ):
            raise TrustError(f"node {node_id.short()} presented a different key: refusing")
        key = public_key if public_key is not None else (row[0] if row else None)
        cert = certificate if certificate is not None else (row[2] if row else None)
        self._db.execute(
            "INSERT OR REPLACE INTO trust VALUES (?, ?, ?, ?, ?, ?, ?)",
            (str(node_id), key, state.value, method, cert, summary[:200], now),
        )
        self._wrote(notify=False)

    def first_contact(
        self, public_key: bytes, now: int, *, certificate: bytes | None = None, summary: str = ""
    ) -> TrustState:
        """Record a contact; an unknown key lands in the inbox (pending)."""
        if len(public_key) != PUBLIC_KEY_SIZE:
            raise TrustError("a node key is 32 bytes")
        current = self.state(public_key, now, certificate)
        if current is TrustState.UNKNOWN:
            pending = self._db.execute(
                "SELECT COUNT(*) FROM trust WHERE state = ?", (TrustState.PENDING.value,)
            ).fetchone()[0]
            if pending >= MAX_INBOX:
                raise TrustError("the contact inbox is full: review it with `radmesh peers`")
            self._set(
                NodeId.from_public_key(public_key),
                public_key,
                TrustState.PENDING,
                "first-contact",
                now,
                certificate,
                summary,
            )
            return TrustState.PENDING
        if certificate is not None and current is TrustState.TRUSTED_BY_ORG:
            row = self._row(NodeId.from_public_key(public_key))
            self._set(
                NodeId.from_public_key(public_key),
                public_key,
                TrustState(row[1]) if row else TrustState.UNKNOWN,
                "certificate",
                now,
                certificate,
            )
        return current

    def mark_verified(self, node_id: NodeId, now: int, *, method: str = "safety-number") -> None:
        """A person confirmed the safety number (or explicitly allowed the peer)."""
        row = self._row(node_id)
        if row is not None and row[1] == TrustState.REVOKED.value:
            raise TrustError(f"{node_id.short()} was revoked; revocation is final for this key")
        self._set(node_id, None, TrustState.VERIFIED, method, now)
        self._wrote()

    def revoke(self, node_id: NodeId, now: int) -> None:
        """Stop trusting ``node_id``; listeners (the running node) drop it at once."""
        self._set(node_id, None, TrustState.REVOKED, "revoked", now)
        self._wrote()

    def keep_certificate(self, public_key: bytes, certificate: bytes, now: int) -> bool:
        """Keep the organisation certificate a peer presents (its published record), so the
        checks made without one (connections, messages, live sessions) see it. Kept only if
        it makes the key trusted by an organisation this node trusts; True if kept."""
        if self.state(public_key, now, certificate) is not TrustState.TRUSTED_BY_ORG:
            return False
        node_id = NodeId.from_public_key(public_key)
        row = self._row(node_id)
        if row is not None and row[2] is not None and bytes(row[2]) == certificate:
            return True
        stored = TrustState(row[1]) if row else TrustState.UNKNOWN
        self._set(node_id, public_key, stored, "certificate", now, certificate)
        self._wrote()
        return True

    def add_org(self, org_key: bytes, now: int) -> None:
        if len(org_key) != PUBLIC_KEY_SIZE:
            raise TrustError("an organisation key is 32 bytes (64 hex characters)")
        self._db.execute("INSERT OR REPLACE INTO trusted_orgs VALUES (?, ?)", (org_key, now))
        self._wrote()

    def add_revocations(self, wire: bytes, org_key: bytes) -> RevocationList:
        """Apply an organisation's signed revocation list if newer than the one held."""
        try:
            listing = verify_revocations(wire, org_key)
        except CryptoError as exc:
            raise TrustError(f"revocation list does not verify: {exc}") from exc
        held = self.revocation_lists().get(org_key)
        if not listing.newer(held):
            raise TrustError("this revocation list is not newer than the one already applied")
        self._db.execute(
            "INSERT OR REPLACE INTO revocations VALUES (?, ?, ?)", (org_key, listing.sequence, wire)
        )
        self._wrote()
        return listing
