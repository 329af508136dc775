"""A study made ready to send (sender side): signed for first, encoded while it is sent.

The manifest carries no entries, only the study, the instance count and a bound on
their bytes, so it is signed from what is known before any file is read: the store's
records (:meth:`PreparedStudy.from_store`, a database read), or, for de-identified
files that exist only as they are rewritten, the count and sizes of the stored files
and the first file's study (:meth:`PreparedStudy.from_source`). Then
:meth:`PreparedStudy.encode` de-identifies (``from_source``: in order, one file at a
time) and encodes the instances in series order, ``ahead`` at a time in worker
threads, into a sealed :class:`~peer_transport.transfer.spool.SenderSpool`, and reports
each one as it is declared, entry and all; :meth:`PreparedStudy.hurry` moves an
instance to the front. :meth:`PreparedStudy.from_files` encodes everything in memory
first (small studies, tests).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any

from crypto.identity import Identity
from node.core.ids import is_dicom_uid
from node.dicom import wirecodec
from peer_transport.transfer.instance import describe_entry, encode_instance, prepare_instance
from peer_transport.transfer.manifest import (
    MAX_INSTANCE_SIZE,
    MAX_STUDY_SIZE,
    Manifest,
    ManifestEntry,
    WireDeclaration,
    build_manifest,
    sign_wires,
    stream_manifest,
    wire_digest,
)
from peer_transport.transfer.spool import SenderSpool

ENCODE_AHEAD = max(2, os.cpu_count() or 2)  # instances encoded in parallel by the sender
# What de-identification may add to a file (UIDs become 2.25.<39 digits>, the method is
# recorded); a compressed image whose top rows are blacked out leaves uncompressed.
DEID_SLACK = 64 << 10
DEID_COMPRESSED_GROWTH = 64

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
        # Entries known before their encoding (a de-identified share's files, rewritten
        # ahead of the encoder): listed to the receiver at once.
        self.announced: dict[int, WireDeclaration] = {}
        self._reader: _Reader | None = None
        if not wires:  # entries known before encoding (a store's records): listed at once
            for index, entry in enumerate(manifest.entries):
                self.announced[index] = WireDeclaration.announce(index, entry)
        for index, wire in enumerate(wires or ()):
            self._wires[index] = wire
            entry = manifest.entries[index]
            self.declared[index] = WireDeclaration(index, len(wire), wire_digest(wire), entry)

    def wire(self, index: int) -> bytes:
        """The wire encoding of declared instance ``index``."""
        if index in self._wires:
            return self._wires[index]
        if self._spool is None:
            raise KeyError(index)
        return self._spool.get(self._slots[index])

    def sign_wires(self, declarations: Sequence[WireDeclaration]) -> bytes:
        manifest = self.manifest
        return sign_wires(
            self._identity, manifest.transfer_id, manifest.study_instance_uid, declarations
        )

    def close(self) -> None:
        """Delete the on-disk encodings (if any)."""
        if self._spool is not None:
            self._spool.close()

    @property
    def total_size(self) -> int:
        """Bytes of the study's files: exact once every instance is declared, until then
        the bound the manifest signs."""
        if self.complete:
            return sum(d.entry.size for d in self.declared.values())
        return self.manifest.total_size

    @property
    def complete(self) -> bool:
        return len(self.declared) == self.manifest.count

    # the pipeline

    def hurry(self, index: int) -> None:
        """Encode ``index`` next (the receiver's viewer waits for it); ignored when out of
        range or already declared."""
        if 0 <= index < self.manifest.count and index not in self.declared:
            self._hurried = [index]  # one outstanding hurry: the latest wins

    def _next(self, busy: set[int]) -> int | None:
        while self._hurried:
            index = self._hurried.pop()
            if index not in self.declared and index not in busy:
                return index
        while self._cursor < self.manifest.count:
            index = self._cursor
            self._cursor += 1
            if index not in self.declared and index not in busy:
                return index
        return None

    async def encode(
        self,
        on_declared: Callable[[int], None] = lambda _i: None,
        on_announced: Callable[[int], None] = lambda _i: None,
    ) -> None:
        """Encode every undeclared instance, in manifest order (hurried ones first), at
        most ``ahead`` at a time; call ``on_declared(index)`` as each is spooled.

        A study read from rewritten files (:meth:`from_source`) reads them all ahead of
        the encoder, in a worker thread, and calls ``on_announced(index)`` as each
        entry is known. Raises BadInstance for a file that cannot be sent (or changed
        since it was offered). At most ``ahead`` encodings are in memory at once.
        """
        if self._encoder is None or self._spool is None:
            return
        encoder, spool = self._encoder, self._spool
        running: dict[asyncio.Future[tuple[bytes, WireDeclaration]], int] = {}
        reading: asyncio.Future[None] | None = None
        if self._reader is not None:
            loop = asyncio.get_running_loop()

            def announce(index: int, entry: ManifestEntry) -> None:
                self.announced[index] = WireDeclaration.announce(index, entry)
                on_announced(index)

            def read_all() -> None:
                assert self._reader is not None  # noqa: S101 -- checked above

                def on_read(index: int, entry: ManifestEntry) -> None:
                    loop.call_soon_threadsafe(announce, index, entry)

                self._reader.read_all(on_read)

            reading = asyncio.ensure_future(asyncio.to_thread(read_all))
        try:
            while True:
                # While the reader still rewrites files, it keeps a core: every slice is
                # listed (and can be hurried) sooner, the first one comes as soon.
                reading_now = reading is not None and not reading.done()
                limit = max(1, self._ahead - 1) if reading_now else self._ahead
                while len(running) < limit:
                    index = self._next(set(running.values()))
                    if index is None:
                        break
                    running[asyncio.ensure_future(asyncio.to_thread(encoder, index))] = index
                if not running:
                    return
                waits: set[asyncio.Future[Any]] = set(running)
                if reading is not None and not reading.done():
                    waits.add(reading)
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                if reading is not None and reading.done():
                    reading.result()  # a file that cannot be read or described
                for future in done:
                    if future is reading:
                        continue
                    index = running.pop(future)
                    wire, declaration = future.result()
                    self._slots[index] = spool.put(wire)
                    del wire
                    self.declared[index] = replace(declaration, index=index)
                    on_declared(index)
        finally:
            for future in running:
                future.cancel()
            if self._reader is not None:
                self._reader.stop()
            if reading is not None:
                reading.cancel()

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
        *,
        count: int,
        total: int,
        source: bytes,
        deidentified: bool = False,
        ahead: int = ENCODE_AHEAD,
        cache: wirecodec.PixelCache | None = None,
    ) -> PreparedStudy:
        """Sign for ``count`` files of at most ``total`` bytes in all, made from
        ``source`` (a digest of what they are rewritten from: the transfer id), once
        the first file is read (its study UID is signed); :meth:`encode` then reads the
        rest in order, one at a time, as it encodes.

        ``files`` is advanced in worker threads under a lock (reading and
        de-identifying block); each file is described, hashed and put in ``spool``
        as it is. A bad file, a second study, a UID seen before, more or fewer files
        than ``count`` or more bytes than ``total`` raise BadInstance (from
        :meth:`encode`, for all but the first file). ``cache``
        (``node.dicom.wirecache.WireCache``) saves the pixel coding done before.
        """
        reader = _Reader(files, spool, count, total)
        await asyncio.to_thread(reader.read_until, 0)
        study_uid = reader.study
        manifest = stream_manifest(study_uid, count, total, source, deidentified)

        def encoder(index: int) -> tuple[bytes, WireDeclaration]:
            slot, entry = reader.read_until(index)
            return encode_instance(spool.get(slot), entry, study_uid, cache)

        study = cls(manifest, identity, encoder=encoder, spool=spool, ahead=ahead)
        study._reader = reader
        return study

    @classmethod
    async def from_rewritten(
        cls,
        source: Any,
        study_uid: str,
        prepare: Callable[[Iterable[bytes]], Iterable[bytes]],
        identity: Identity,
        spool: SenderSpool,
        cache: wirecodec.PixelCache | None = None,
    ) -> PreparedStudy:
        """A stored study rewritten by ``prepare`` (de-identification for sharing) as it
        is encoded, in series order (:meth:`from_source`): bounded by the stored sizes,
        its transfer id the digest of what it is rewritten from, so a restarted sender
        with the same ``prepare`` offers the same transfer."""
        rows = series_rows(source, study_uid)
        files = prepare(source.read_instance(r.sop_instance_uid) for r in rows)
        return await cls.from_source(
            iter(files),
            identity,
            spool,
            count=len(rows),
            total=deidentified_bound(rows),
            source=source_digest(rows),
            deidentified=True,
            cache=cache,
        )

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


def source_digest(rows: Iterable[Any]) -> bytes:
    """A digest of the stored files a share is made from (their recorded hashes, in the
    order given): the same study gives the same transfer id after a restart."""
    digest = hashlib.blake2b(digest_size=32)
    for row in rows:
        digest.update(bytes.fromhex(row.content_hash))
    return digest.digest()


def deidentified_bound(rows: Iterable[Any]) -> int:
    """An upper bound on the bytes of the de-identified copies of stored files ``rows``
    (``size`` and ``transfer_syntax`` of each), for the manifest's ``total``."""
    total = 0
    for row in rows:
        growth = 1 if row.transfer_syntax in wirecodec.UNCOMPRESSED else DEID_COMPRESSED_GROWTH
        total += min(MAX_INSTANCE_SIZE, row.size * growth + DEID_SLACK)
    return min(total, MAX_STUDY_SIZE)


def series_rows(source: Any, study_uid: str) -> list[Any]:
    """The stored rows of a study in series order (series number, series UID, instance
    number): the order a de-identified share is read and sent in."""
    rows = list(source.instances(study_uid))
    lister = getattr(source, "series", None)
    numbers: dict[str, int] = {}
    if lister is not None:
        numbers = {s.series_uid: s.series_number or 0 for s in lister(study_uid)}
    return sorted(
        rows,
        key=lambda r: (numbers.get(r.series_uid, 0), r.series_uid, r.instance_number or 0),
    )


class _Reader:
    """The rewritten files, read in order under a lock, described and spooled as they
    come: each is held to the count and total signed for, one study, one UID each."""

    def __init__(self, files: Iterator[bytes], spool: SenderSpool, count: int, total: int) -> None:
        self._files = files
        self._spool = spool
        self._count = count
        self._total = total
        self._lock = threading.Lock()
        self._read: list[tuple[int, ManifestEntry]] = []
        self._uids: set[str] = set()
        self._bytes = 0
        self._error: Exception | None = None  # the first file that failed fails the rest
        self._stopped = False
        self.on_read: Callable[[int, ManifestEntry], None] = lambda _i, _e: None
        self.study = ""

    def read_until(self, index: int) -> tuple[int, ManifestEntry]:
        """(spool slot, entry) of file ``index``, reading the files before it first."""
        if index < len(self._read):  # read already: no wait for a file being rewritten
            return self._read[index]
        with self._lock:
            while len(self._read) <= index:
                self._read_one()
            return self._read[index]

    def read_all(self, on_read: Callable[[int, ManifestEntry], None]) -> None:
        """Read the rest, one file per turn of the lock; ``on_read(index, entry)`` for
        every file read from now on (by this or an encoder's thread)."""
        with self._lock:
            self.on_read = on_read
            for index, (_slot, entry) in enumerate(self._read):
                on_read(index, entry)
        while not self._stopped:
            with self._lock:
                if len(self._read) >= self._count:
                    return
                self._read_one()

    def stop(self) -> None:
        self._stopped = True

    def _read_one(self) -> None:
        if self._error is not None:
            raise self._error
        if self._stopped:
            raise wirecodec.BadInstance("the share was stopped")
        try:
            self._read_next()
        except Exception as exc:
            self._error = exc
            raise

    def _read_next(self) -> None:
        data = next(self._files, None)
        if data is None:
            raise wirecodec.BadInstance(
                f"the study gave {len(self._read)} files where {self._count} were offered"
            )
        entry, study = describe_entry(data)
        if self.study and study != self.study:
            raise wirecodec.BadInstance("the files belong to 2 studies; share one study at a time")
        if entry.sop_instance_uid in self._uids:
            raise wirecodec.BadInstance(
                f"instance {entry.sop_instance_uid} appears twice in the study"
            )
        self._bytes += entry.size
        if self._bytes > self._total:
            raise wirecodec.BadInstance(
                f"the files came to over the {self._total} bytes offered; share the study again"
            )
        self.study = study
        self._uids.add(entry.sop_instance_uid)
        self._read.append((self._spool.put(data), entry))
        self.on_read(len(self._read) - 1, entry)
        if len(self._read) == self._count and next(self._files, None) is not None:
            # (the extra step also lets a de-identifier finish: it saves its map then)
            raise wirecodec.BadInstance(f"the study gave more than the {self._count} files offered")
