"""A study made ready to send (sender side): signed for first, encoded while it is sent.

The manifest carries no wire sizes, so it is signed from what is known before any
pixel is coded: the store's recorded hashes and sizes (:meth:`PreparedStudy.from_store`,
a database read), or one pass that parses and hashes each file without encoding it
(:meth:`PreparedStudy.from_source`, for de-identified files that exist only as they are
rewritten). Then :meth:`PreparedStudy.encode` encodes the instances in manifest
(series) order, ``ahead`` at a time in worker threads, into a sealed
:class:`~peer_transport.transfer.spool.SenderSpool`, and reports each one as it is
declared; :meth:`PreparedStudy.hurry` moves an instance to the front.
:meth:`PreparedStudy.from_files` encodes everything in memory first (small studies,
tests).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from crypto.identity import Identity
from node.core.ids import is_dicom_uid
from node.dicom import wirecodec
from peer_transport.transfer.instance import describe_entry, encode_instance, prepare_instance
from peer_transport.transfer.manifest import (
    MAX_INSTANCE_SIZE,
    Manifest,
    ManifestEntry,
    WireDeclaration,
    build_manifest,
    sign_wires,
    wire_digest,
)
from peer_transport.transfer.spool import SenderSpool

ENCODE_AHEAD = max(2, os.cpu_count() or 2)  # instances encoded in parallel by the sender

# One instance's encoding, done in a worker thread: (wire bytes, its declaration).
Encoder = Callable[[int], tuple[bytes, WireDeclaration]]


class PreparedStudy:
    """A study described by a signed manifest, its wire encodings made on the way.

    ``declared`` holds the declaration of every instance encoded so far; ``wire(index)``
    gives the wire encoding of a declared instance.
    """

    def __init__(
        self,
        manifest: Manifest,
        identity: Identity,
        *,
        encoder: Encoder | None = None,
        spool: SenderSpool | None = None,
        wires: Sequence[bytes] | None = None,
        ahead: int = ENCODE_AHEAD,
    ) -> None:
        self.manifest = manifest
        self.signed = manifest.sign(identity)
        self._identity = identity
        self._encoder = encoder
        self._spool = spool
        self._ahead = max(1, ahead)
        self._slots: dict[int, int] = {}
        self._wires: dict[int, bytes] = {}
        self._hurried: list[int] = []
        self._cursor = 0
        self.declared: dict[int, WireDeclaration] = {}
        for index, wire in enumerate(wires or ()):
            self._wires[index] = wire
            self.declared[index] = WireDeclaration(index, len(wire), wire_digest(wire))

    def wire(self, index: int) -> bytes:
        """The wire encoding of declared instance ``index``."""
        if index in self._wires:
            return self._wires[index]
        if self._spool is None:
            raise KeyError(index)
        return self._spool.get(self._slots[index])

    def sign_wires(self, declarations: Sequence[WireDeclaration]) -> bytes:
        return sign_wires(self._identity, self.manifest.transfer_id, declarations)

    def close(self) -> None:
        """Delete the on-disk encodings (if any)."""
        if self._spool is not None:
            self._spool.close()

    @property
    def complete(self) -> bool:
        return len(self.declared) == len(self.manifest.entries)

    # the pipeline

    def hurry(self, index: int) -> None:
        """Encode ``index`` next (the receiver's viewer waits for it); ignored when out of
        range or already declared."""
        if 0 <= index < len(self.manifest.entries) and index not in self.declared:
            self._hurried = [index]  # one outstanding hurry: the latest wins

    def _next(self, busy: set[int]) -> int | None:
        while self._hurried:
            index = self._hurried.pop()
            if index not in self.declared and index not in busy:
                return index
        while self._cursor < len(self.manifest.entries):
            index = self._cursor
            self._cursor += 1
            if index not in self.declared and index not in busy:
                return index
        return None

    async def encode(self, on_declared: Callable[[int], None] = lambda _i: None) -> None:
        """Encode every undeclared instance, in manifest order (hurried ones first), at
        most ``ahead`` at a time; call ``on_declared(index)`` as each is spooled.

        Raises BadInstance for a file that cannot be sent (or changed since it was
        offered). At most ``ahead`` files and encodings are in memory at once.
        """
        if self._encoder is None or self._spool is None:
            return
        encoder, spool = self._encoder, self._spool
        running: dict[asyncio.Future[tuple[bytes, WireDeclaration]], int] = {}
        try:
            while True:
                while len(running) < self._ahead:
                    index = self._next(set(running.values()))
                    if index is None:
                        break
                    running[asyncio.ensure_future(asyncio.to_thread(encoder, index))] = index
                if not running:
                    return
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    index = running.pop(future)
                    wire, declaration = future.result()
                    self._slots[index] = spool.put(wire)
                    del wire
                    self.declared[index] = WireDeclaration(
                        index, declaration.wire_size, declaration.digest
                    )
                    on_declared(index)
        finally:
            for future in running:
                future.cancel()

    # constructors

    @classmethod
    async def from_files(
        cls, files: Sequence[bytes], identity: Identity, deidentified: bool = False
    ) -> PreparedStudy:
        """Describe and encode every file in memory (small studies, tests): every
        instance is declared from the start."""
        prepared = await asyncio.gather(*(asyncio.to_thread(prepare_instance, f) for f in files))
        manifest = build_manifest(
            [p[0] for p in prepared], _one_study(p[1] for p in prepared), deidentified
        )
        wire_of = {p[0].sop_instance_uid: p[2] for p in prepared}
        return cls(
            manifest, identity, wires=[wire_of[e.sop_instance_uid] for e in manifest.entries]
        )

    @classmethod
    async def from_source(
        cls,
        files: Iterator[bytes],
        identity: Identity,
        spool: SenderSpool,
        deidentified: bool = False,
        ahead: int = ENCODE_AHEAD,
        cache: wirecodec.PixelCache | None = None,
    ) -> PreparedStudy:
        """Read, describe and hash one file at a time (no encoding) into ``spool`` as it
        is, sign, and return; :meth:`encode` then encodes from the spool.

        ``files`` is advanced in a worker thread (reading and de-identifying may
        block); one file is in memory at a time. Bad files raise BadInstance.
        ``cache`` (``node.dicom.wirecache.WireCache``) saves the pixel coding done before.
        """

        def describe_all() -> tuple[list[tuple[ManifestEntry, str]], dict[str, int]]:
            described: list[tuple[ManifestEntry, str]] = []
            raw_slot: dict[str, int] = {}
            for data in files:
                entry, study = describe_entry(data)
                if entry.sop_instance_uid in raw_slot:
                    raise wirecodec.BadInstance(
                        f"instance {entry.sop_instance_uid} appears twice in the study"
                    )
                raw_slot[entry.sop_instance_uid] = spool.put(data)
                described.append((entry, study))
            return described, raw_slot

        described, raw_slot = await asyncio.to_thread(describe_all)
        study_uid = _one_study(study for _e, study in described)
        manifest = build_manifest([e for e, _s in described], study_uid, deidentified)
        entries = manifest.entries

        def encoder(index: int) -> tuple[bytes, WireDeclaration]:
            data = spool.get(raw_slot[entries[index].sop_instance_uid])
            return encode_instance(data, entries[index], study_uid, cache)

        return cls(manifest, identity, encoder=encoder, spool=spool, ahead=ahead)

    @classmethod
    def from_store(
        cls,
        source: Any,
        study_uid: str,
        identity: Identity,
        spool: SenderSpool,
        ahead: int = ENCODE_AHEAD,
        cache: wirecodec.PixelCache | None = None,
    ) -> PreparedStudy:
        """A stored study as it is, signed from the store's records (hash, size, UIDs,
        numbers: a database read, no file is opened); :meth:`encode` reads and encodes.

        ``source`` is a ``node.dicom.store.Store`` (or anything with its ``instances``,
        ``read_instance`` and, optionally, ``series`` for series numbers).
        """
        rows = source.instances(study_uid)
        series_rows = getattr(source, "series", None)
        numbers: dict[str, int] = {}
        if series_rows is not None:
            numbers = {s.series_uid: s.series_number or 0 for s in series_rows(study_uid)}
        described = []
        for row in rows:
            if not all(map(is_dicom_uid, (row.study_uid, row.series_uid, row.sop_instance_uid))):
                raise wirecodec.BadInstance(
                    f"instance {row.sop_instance_uid[:64]!r} has a malformed study, series or "
                    "instance UID; a receiver refuses it"
                )
            if row.size > MAX_INSTANCE_SIZE:
                raise wirecodec.BadInstance(
                    f"instance {row.sop_instance_uid} is {row.size} bytes; a receiver takes "
                    f"at most {MAX_INSTANCE_SIZE}"
                )
            described.append(
                ManifestEntry(
                    row.sop_instance_uid,
                    row.series_uid,
                    numbers.get(row.series_uid, 0),
                    row.instance_number or 0,
                    row.transfer_syntax,
                    row.size,
                    bytes.fromhex(row.content_hash),
                )
            )
        manifest = build_manifest(described, _one_study(r.study_uid for r in rows))
        entries = manifest.entries

        def encoder(index: int) -> tuple[bytes, WireDeclaration]:
            data = source.read_instance(entries[index].sop_instance_uid)
            return encode_instance(data, entries[index], study_uid, cache)

        return cls(manifest, identity, encoder=encoder, spool=spool, ahead=ahead)


def _one_study(studies: Iterable[str]) -> str:
    found = set(studies)
    if len(found) != 1:
        raise wirecodec.BadInstance(
            f"the files belong to {len(found)} studies; share one study at a time"
        )
    return found.pop()
