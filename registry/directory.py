"""The peer directory: one view of peers from registries, mDNS and memory.

Sources (``Finder``s) are hints; every record is verified here again and must
belong to the id asked for. The directory remembers the last verified record
of every peer it has resolved (SQLite in the node's data dir), never goes back
to an older sequence (a registry replaying an old record changes nothing), and
answers from memory when every source is down.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from crypto.identity import NodeId
from node.core.db import connect
from registry.client import MultiRegistry, SearchQuery
from registry.errors import RecordError, RegistryError
from registry.mdns import LanDiscovery
from registry.records import NodeRecord, supersedes
from registry.trust import TrustState, TrustStore

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS peers (
    node_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    wire BLOB NOT NULL,
    source TEXT NOT NULL,
    last_seen INTEGER NOT NULL
);
"""


class Finder(Protocol):
    """Somewhere records can be found (registries, mDNS, a test's memory)."""

    name: str

    async def lookup(self, node_id: NodeId, now: int) -> NodeRecord | None: ...

    async def search(self, query: SearchQuery, now: int) -> list[NodeRecord]: ...


class RegistryFinder:
    name = "registry"

    def __init__(self, registries: MultiRegistry) -> None:
        self.registries = registries

    async def lookup(self, node_id: NodeId, now: int) -> NodeRecord | None:
        return await self.registries.lookup(node_id, now)

    async def search(self, query: SearchQuery, now: int) -> list[NodeRecord]:
        return await self.registries.search(query, now=now)


def matches(record: NodeRecord, query: SearchQuery) -> bool:
    def has(values: tuple[str, ...], wanted: str) -> bool:
        return not wanted or wanted.lower() in (v.lower() for v in values)

    return (
        has(record.subspecialties, query.subspecialty)
        and has(record.jurisdictions, query.jurisdiction)
        and has(record.languages, query.language)
        and (not query.availability() or record.availability.value in query.availability())
    )


class MdnsFinder:
    name = "mdns"

    def __init__(self, discovery: LanDiscovery) -> None:
        self.discovery = discovery

    async def lookup(self, node_id: NodeId, now: int) -> NodeRecord | None:
        return await self.discovery.lookup(node_id)

    async def search(self, query: SearchQuery, now: int) -> list[NodeRecord]:
        return [r for r in self.discovery.found.values() if matches(r, query)]


class MemoryFinder:
    """In-memory records, for tests and for records handed over out of band."""

    def __init__(self, records: Sequence[NodeRecord] = (), name: str = "memory") -> None:
        self.name = name
        self.records = {r.node_id: r for r in records}

    async def lookup(self, node_id: NodeId, now: int) -> NodeRecord | None:
        return self.records.get(node_id)

    async def search(self, query: SearchQuery, now: int) -> list[NodeRecord]:
        return [r for r in self.records.values() if matches(r, query)]


@dataclass(frozen=True)
class Peer:
    record: NodeRecord
    source: str  # which finder, or "remembered"
    fresh: bool  # False: the remembered record has expired, the address is a last guess
    trust: TrustState


class PeerDirectory:
    def __init__(self, path: str | Path, trust: TrustStore, finders: Sequence[Finder] = ()) -> None:
        self._db = connect(path, check_same_thread=False)
        self._db.executescript(_SCHEMA)
        self.trust = trust
        self.finders = list(finders)
        self.rejected = 0  # records refused: bad signature, wrong id, older than remembered

    def close(self) -> None:
        self._db.close()

    def remembered(self, node_id: NodeId) -> NodeRecord | None:
        row = self._db.execute(
            "SELECT wire FROM peers WHERE node_id = ?", (str(node_id),)
        ).fetchone()
        return None if row is None else _stored(bytes(row[0]))

    def remember(self, record: NodeRecord, source: str, now: int) -> bool:
        """Keep ``record`` if it verifies and is newer than the one held; True if kept."""
        try:
            record.verify(now)
            held = self.remembered(record.node_id)
            if not supersedes(record, held):
                if held is not None and record.sequence < held.sequence:
                    self.rejected += 1  # an older record replayed to us
                return False
        except RecordError as exc:
            self.rejected += 1
            log.debug("refusing record from %s: %s", source, exc)
            return False
        self._db.execute(
            "INSERT OR REPLACE INTO peers VALUES (?, ?, ?, ?, ?)",
            (str(record.node_id), record.sequence, record.to_wire(), source, now),
        )
        self._keep_certificate(record, now)
        return True

    def _keep_certificate(self, record: NodeRecord, now: int) -> None:
        """The trust store keeps the organisation certificate of the record shown, so every
        check of this key made without a record (connections, messages) agrees with it."""
        if record.org_certificate is not None:
            self.trust.keep_certificate(record.public_key, record.org_certificate, now)

    def _peer(self, record: NodeRecord, source: str, now: int) -> Peer:
        self._keep_certificate(record, now)
        return Peer(
            record,
            source,
            now < record.expires_at,
            self.trust.state(record.public_key, now, record.org_certificate),
        )

    async def resolve(self, node_id: NodeId, now: int) -> Peer | None:
        """The newest verified record from any source, falling back to memory."""
        for finder in self.finders:
            try:
                found = await finder.lookup(node_id, now)
            except RegistryError as exc:
                log.debug("%s lookup failed: %s", finder.name, exc)
                continue
            if found is None:
                continue
            if found.node_id != node_id:
                self.rejected += 1
                continue
            self.remember(found, finder.name, now)
        row = self._db.execute(
            "SELECT wire, source FROM peers WHERE node_id = ?", (str(node_id),)
        ).fetchone()
        record = None if row is None else _stored(bytes(row[0]))
        return None if record is None else self._peer(record, row[1], now)

    async def search(self, query: SearchQuery, now: int) -> list[Peer]:
        # Sources are asked for every availability: a node that went away or on call
        # must replace its remembered record, or it would still match as online here.
        wide = replace(query, online=False, on_call=False)
        for finder in self.finders:
            try:
                records = await finder.search(wide, now)
            except RegistryError as exc:
                log.debug("%s search failed: %s", finder.name, exc)
                continue
            for record in records:
                self.remember(record, finder.name, now)
        return [p for p in self.list(now) if p.fresh and matches(p.record, query)]

    def list(self, now: int) -> list[Peer]:
        rows = self._db.execute("SELECT wire, source FROM peers ORDER BY node_id").fetchall()
        records = ((_stored(bytes(w)), s) for w, s in rows)
        return [self._peer(r, s, now) for r, s in records if r is not None]


def _stored(wire: bytes) -> NodeRecord | None:
    """A remembered record, or None if it no longer passes today's checks (a record
    kept by an older version with, say, a LAN URL that now counts as unsafe)."""
    try:
        return NodeRecord.from_wire(wire)
    except RecordError as exc:
        log.info("ignoring a remembered record that no longer parses: %s", exc)
        return None
