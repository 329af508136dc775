"""The node store: DICOM instances encrypted at rest, indexed in SQLite.

Layout under the store directory::

    index.sqlite        WAL-mode index of study / series / instance
    write.lock          flock'ed by whichever process writes
    blobs/.tmp-PID-RND  a blob being written (deleted at open if PID is gone)
    blobs/ab/<name>     one encrypted blob per distinct content

A blob's name is a keyed hash of the SHA-256 of the original bytes, so the same
content is stored once, and someone holding the disk cannot confirm that a
known file is present by hashing it.

Blob format: a 32-byte header (magic, chunk size, plaintext size, random blob
id) and then one sealed chunk per ``CHUNK_SIZE`` bytes of plaintext. Each chunk
is an independent libsodium secretstream (its own 24-byte stream header, one
message, TAG_FINAL) whose associated data is the blob header plus the chunk
index, so chunks cannot be reordered, swapped between blobs or truncated
unnoticed, and any chunk can be decrypted alone (a reader that seeks decrypts
only the chunks it reads).

Writers are serialised across processes by an flock on ``write.lock`` (two
imports, or an import beside the running node). Writes are atomic: the blob
goes to a temp file, is fsynced and renamed into place, and only then is the
index row committed in one transaction. The index is the single source of
truth for what exists: a blob without a row (crash between rename and commit)
is invisible and removed by :meth:`Store.gc` (the running node runs it at start
and every few hours).

PHI: the patient's name, id, birth date, sex and the accession number are kept
for the worklist, encrypted with a key derived from the store key (SecretBox);
the patient key used to group studies is a keyed hash. The remaining index
columns (UIDs, dates, modality, descriptions, geometry) are in clear, so
treat the index as sensitive; the image data never is in clear on disk.

Why one module: The index and the encrypted blobs are one transaction boundary: a blob
is visible only once its row is committed, and that rule is kept in one place.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import secrets
import sqlite3
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, BinaryIO

import msgpack
import nacl.bindings as sodium
import nacl.exceptions
import nacl.secret

from node.core.db import connect, transaction
from node.core.errors import NodeError
from node.dicom.files import InstanceInfo, InvalidDicom, parse_instance
from node.dicom.sealed_io import SealedPieces
from node.dicom.wirecache import CacheWarmer, remove_stale_temps
from node.dicom.wirecodec import PixelCache

if TYPE_CHECKING:
    from crypto.identity import Identity
    from node.core.config import NodeHome

__all__ = [
    "AddResult",
    "InstanceConflict",
    "InstanceRow",
    "InvalidDicom",
    "SeriesRow",
    "Store",
    "StoreCorrupted",
    "StoreError",
    "StudyRow",
    "UnknownInstance",
    "UnknownStudy",
    "open_store",
]

CHUNK_SIZE = 1 << 20
MAGIC = b"RMB1"
BLOB_HEADER = struct.Struct(">4sIQ16s")
SS_HEADER = sodium.crypto_secretstream_xchacha20poly1305_HEADERBYTES
SS_ABYTES = sodium.crypto_secretstream_xchacha20poly1305_ABYTES
TAG_FINAL = sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL
KEY_BYTES = 32
STORE_KEY_PURPOSE = "radmesh-store-v1"
PEER_SOURCE = "peer:"  # the source of instances received from another node

SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    patient_key TEXT NOT NULL,
    patient BLOB NOT NULL,
    study_date TEXT NOT NULL,
    study_time TEXT NOT NULL,
    description TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS studies_patient ON studies(patient_key);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL REFERENCES studies(study_uid) ON DELETE CASCADE,
    modality TEXT NOT NULL,
    description TEXT NOT NULL,
    body_part TEXT NOT NULL,
    series_number INTEGER
);
CREATE INDEX IF NOT EXISTS series_study ON series(study_uid);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL REFERENCES series(series_uid) ON DELETE CASCADE,
    study_uid TEXT NOT NULL,
    sop_class TEXT NOT NULL,
    instance_number INTEGER,
    transfer_syntax TEXT NOT NULL,
    size INTEGER NOT NULL,
    content_hash TEXT NOT NULL,
    blob_id BLOB NOT NULL,
    rows_ INTEGER,
    columns_ INTEGER,
    frames INTEGER NOT NULL,
    image_position TEXT,
    image_orientation TEXT,
    pixel_spacing TEXT,
    slice_thickness REAL,
    frame_ranges BLOB,  -- unused, always NULL: kept so that older stores open unchanged
    encapsulated INTEGER NOT NULL,
    source TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_hash ON instances(content_hash);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid, series_uid);
"""

_STUDY_QUERY_ALL = """
SELECT s.study_uid, s.patient, s.study_date, s.study_time, s.description, s.received_at,
    (SELECT group_concat(DISTINCT modality) FROM series WHERE study_uid = s.study_uid),
    (SELECT count(*) FROM series WHERE study_uid = s.study_uid),
    (SELECT count(*) FROM instances WHERE study_uid = s.study_uid),
    (SELECT coalesce(sum(size), 0) FROM instances WHERE study_uid = s.study_uid)
FROM studies s ORDER BY s.study_date DESC, s.study_time DESC, s.study_uid
"""
_STUDY_QUERY_ONE = _STUDY_QUERY_ALL.replace(
    "FROM studies s", "FROM studies s WHERE s.study_uid = ?"
)


class StoreError(NodeError):
    """The store cannot do what was asked."""


class UnknownInstance(StoreError):
    """No instance with that SOP Instance UID is stored."""


class UnknownStudy(StoreError):
    """No study with that Study Instance UID is stored."""


class StoreCorrupted(StoreError):
    """A blob fails authentication or does not match the index."""


class InstanceConflict(StoreError):
    """An instance with this SOP Instance UID is stored already, with other bytes.

    The store never replaces one with the other (an instance from a peer must not
    overwrite another study's): the stored one is kept, this one is not stored.
    """

    def __init__(self, info: InstanceInfo, why: str = "") -> None:
        super().__init__(
            f"{why}: instance {info.sop_instance_uid} of study {info.study_uid} was not stored"
            if why
            else f"same instance UID, other bytes: instance {info.sop_instance_uid} is "
            "already stored with different content; kept the first, this one was not stored"
        )
        self.sop_instance_uid = info.sop_instance_uid
        self.study_uid = info.study_uid  # of the instance refused


@dataclass(frozen=True)
class AddResult:
    sop_instance_uid: str
    series_uid: str
    study_uid: str
    content_hash: str  # hex SHA-256 of the original bytes
    size: int
    duplicate: bool


@dataclass(frozen=True)
class StudyRow:
    study_uid: str
    patient_id: str
    patient_name: str
    patient_birth_date: str
    patient_sex: str
    accession_number: str
    study_date: str
    study_time: str
    description: str
    modalities: tuple[str, ...]
    series_count: int
    instance_count: int
    size: int
    received_at: float


@dataclass(frozen=True)
class SeriesRow:
    series_uid: str
    study_uid: str
    modality: str
    description: str
    body_part: str
    series_number: int | None
    instance_count: int
    size: int


@dataclass(frozen=True)
class InstanceRow:
    sop_instance_uid: str
    series_uid: str
    study_uid: str
    sop_class_uid: str
    instance_number: int | None
    transfer_syntax: str
    size: int
    content_hash: str
    rows: int | None
    columns: int | None
    frames: int
    image_position: tuple[float, ...] | None
    image_orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, ...] | None
    slice_thickness: float | None
    source: str


# --- blob encryption ---------------------------------------------------------------------


def _chunk_ad(header: bytes, index: int) -> bytes:
    return header + struct.pack(">Q", index)


def _seal_chunk(key: bytes, header: bytes, index: int, plain: bytes) -> bytes:
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    stream_header = sodium.crypto_secretstream_xchacha20poly1305_init_push(state, key)
    sealed = sodium.crypto_secretstream_xchacha20poly1305_push(
        state, plain, _chunk_ad(header, index), TAG_FINAL
    )
    return bytes(stream_header) + bytes(sealed)


def _chunk_count(size: int, chunk_size: int) -> int:
    return max(1, -(-size // chunk_size))


class BlobReader(SealedPieces):
    """A seekable, decrypting view of one blob; decrypts one chunk at a time."""

    def __init__(self, path: Path, key: bytes, blob_id: bytes | None = None) -> None:
        try:
            file: IO[bytes] = path.open("rb")
        except FileNotFoundError as exc:
            raise StoreCorrupted(
                "an indexed blob is missing from disk; the store was damaged "
                "(restore it from backup or import the study again)"
            ) from exc
        super().__init__(file)
        header = self._file.read(BLOB_HEADER.size)
        try:
            magic, chunk_size, size, found_id = BLOB_HEADER.unpack(header)
        except struct.error as exc:
            self._file.close()
            raise StoreCorrupted("a blob is truncated (no header)") from exc
        if magic != MAGIC or chunk_size == 0 or (blob_id is not None and found_id != blob_id):
            self._file.close()
            raise StoreCorrupted("a blob does not match its index entry")
        self._key = key
        self._header = header
        self._chunk_size = chunk_size
        self.size = size
        self.name = "<radmesh store instance>"  # pydicom records a stream's name

    def _piece_at(self, position: int) -> tuple[int, int]:
        index, offset = divmod(position, self._chunk_size)
        return int(index), int(offset)

    def _decrypt(self, index: int) -> bytes:
        plain_len = min(self._chunk_size, self.size - index * self._chunk_size)
        self._file.seek(BLOB_HEADER.size + index * (self._chunk_size + SS_HEADER + SS_ABYTES))
        sealed = self._file.read(SS_HEADER + plain_len + SS_ABYTES)
        if len(sealed) != SS_HEADER + plain_len + SS_ABYTES:
            raise StoreCorrupted("a blob is truncated")
        state = sodium.crypto_secretstream_xchacha20poly1305_state()
        try:
            sodium.crypto_secretstream_xchacha20poly1305_init_pull(
                state, sealed[:SS_HEADER], self._key
            )
            plain, tag = sodium.crypto_secretstream_xchacha20poly1305_pull(
                state, sealed[SS_HEADER:], _chunk_ad(self._header, index)
            )
        except (nacl.exceptions.CryptoError, RuntimeError, ValueError) as exc:
            raise StoreCorrupted(
                "a blob fails authentication: it was altered on disk or the store key is wrong"
            ) from exc
        if tag != TAG_FINAL:
            raise StoreCorrupted("a blob chunk has the wrong tag")
        return bytes(plain)


# --- the store -----------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json(values: Sequence[float] | None) -> str | None:
    return None if values is None else json.dumps(list(values))


def _unjson(text: str | None) -> tuple[float, ...] | None:
    return None if text is None else tuple(float(v) for v in json.loads(text))


class Store:
    """DICOM instances, encrypted at rest, with a SQLite index. Thread-safe."""

    def __init__(self, root: Path, key: bytes, db: sqlite3.Connection) -> None:
        self.root = root
        self.blob_dir = root / "blobs"
        self._db = db
        self._lock = threading.RLock()
        # flock'ed around every write (see _writing); closed with the store
        self._write_lock = os.open(root / "write.lock", os.O_RDWR | os.O_CREAT, 0o600)
        self._blob_key = hashlib.blake2b(key, digest_size=32, person=b"radmesh-blobkey").digest()
        self._name_key = hashlib.blake2b(key, digest_size=32, person=b"radmesh-blobname").digest()
        phi_key = hashlib.blake2b(key, digest_size=32, person=b"radmesh-phi").digest()
        self._phi_box = nacl.secret.SecretBox(phi_key)
        # Verified pixel codings for sending (node.dicom.wirecache); send_study reads it here.
        self.wire_cache: PixelCache | None = None
        self._warmer: CacheWarmer | None = None

    @classmethod
    def open(cls, data_dir: Path, key: bytes) -> Store:
        """Open (creating if needed) the store in directory ``data_dir``."""
        if len(key) != KEY_BYTES:
            raise StoreError("the store key must be 32 bytes")
        root = Path(data_dir)
        blob_dir = root / "blobs"
        blob_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o700)
        db = connect(root / "index.sqlite", check_same_thread=False)
        db.executescript(SCHEMA)
        store = cls(root, key, db)
        remove_stale_temps(store.blob_dir)  # writers that died mid-write
        return store

    def use_wire_cache(self, cache: PixelCache, *, warm: bool = True) -> None:
        """Send with ``cache``; with ``warm``, code each instance added with ``warm=True``
        (the default: imports) into it in the background. A study transfer's receiver
        adds with ``warm=False``: it is busy, and a peer's study is rarely sent on."""
        self.wire_cache = cache
        if warm and self._warmer is None:
            self._warmer = CacheWarmer(cache, self.read_instance)

    def close(self) -> None:
        if self._warmer is not None:
            self._warmer.close()
        with self._lock:
            self._db.close()
            if self._write_lock >= 0:
                os.close(self._write_lock)
                self._write_lock = -1

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- paths and housekeeping

    def _blob_path(self, content_hash: str) -> Path:
        name = hashlib.blake2b(
            bytes.fromhex(content_hash), key=self._name_key, digest_size=32
        ).hexdigest()
        return self.blob_dir / name[:2] / name

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """This thread, and no other process, changes blobs and the index meanwhile.

        Without it two processes on one store (`radmesh import` twice, or beside the
        running node) interleave blob renames and index commits: one renames its blob
        over the other's, the other's row then names a blob id the file no longer has
        ("a blob does not match its index entry"), and gc could remove a blob renamed
        in place whose row is not yet committed."""
        with self._lock:
            fcntl.flock(self._write_lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._write_lock, fcntl.LOCK_UN)

    def gc(self, limit: int | None = None) -> int:
        """Remove blobs no index row refers to (left by a crash), at most ``limit``;
        returns how many."""
        with self._writing():
            wanted = {
                self._blob_path(h).name
                for (h,) in self._db.execute("SELECT DISTINCT content_hash FROM instances")
            }
            removed = 0
            for blob in self.blob_dir.glob("??/*"):
                if limit is not None and removed >= limit:
                    break
                if blob.name not in wanted:
                    blob.unlink(missing_ok=True)
                    removed += 1
            return removed

    # -- adding

    def add_bytes(self, data: bytes, *, source: str, warm: bool = True) -> AddResult:
        """Store one DICOM instance given as bytes. Raises :class:`InvalidDicom`.

        ``source`` is recorded with the instance (where it came from, for audit and
        retention); ``warm`` asks for it to be coded into the wire cache in the
        background (:meth:`use_wire_cache`)."""
        info = parse_instance(io.BytesIO(data), len(data))
        return self._add(io.BytesIO(data), len(data), info, source, warm)

    def add_file(self, path: Path, *, source: str, warm: bool = True) -> AddResult:
        """Store one DICOM file, streaming it through hashing and encryption."""
        with Path(path).open("rb") as fp:
            size = os.fstat(fp.fileno()).st_size
            info = parse_instance(fp, size)
            fp.seek(0)
            return self._add(fp, size, info, source, warm)

    def add_stream(self, fp: IO[bytes], size: int, *, source: str, warm: bool = True) -> AddResult:
        """Store one DICOM instance from a seekable stream of ``size`` bytes (a received
        instance read back from its sealed spool file), streaming as :meth:`add_file`."""
        info = parse_instance(fp, size)
        fp.seek(0)
        return self._add(fp, size, info, source, warm)

    def _write_temp(self, fp: IO[bytes], size: int) -> tuple[Path, str, bytes]:
        blob_id = secrets.token_bytes(16)
        header = BLOB_HEADER.pack(MAGIC, CHUNK_SIZE, size, blob_id)
        temp = self.blob_dir / f".tmp-{os.getpid()}-{secrets.token_hex(8)}"
        digest = hashlib.sha256()
        try:
            with temp.open("wb") as out:
                out.write(header)
                for index in range(_chunk_count(size, CHUNK_SIZE)):
                    plain = fp.read(min(CHUNK_SIZE, size - index * CHUNK_SIZE))
                    if len(plain) != min(CHUNK_SIZE, size - index * CHUNK_SIZE):
                        raise StoreError("the file changed size while it was being imported")
                    digest.update(plain)
                    out.write(_seal_chunk(self._blob_key, header, index, plain))
                    self._after_chunk_written(index)
                if fp.read(1):
                    raise StoreError("the file grew while it was being imported; import again")
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return temp, digest.hexdigest(), blob_id

    # Crash-test seams: a test replaces these to kill the process at that point.
    def _after_chunk_written(self, index: int) -> None:
        return None

    def _before_index_commit(self) -> None:
        return None

    def _add(
        self, fp: IO[bytes], size: int, info: InstanceInfo, source: str, warm: bool
    ) -> AddResult:
        temp, content_hash, blob_id = self._write_temp(fp, size)
        try:
            added = self._commit(temp, content_hash, blob_id, size, info, source)
        finally:
            temp.unlink(missing_ok=True)
        if warm and self._warmer is not None and not added.duplicate:
            self._warmer.submit(added.sop_instance_uid)
        return added

    def _commit(
        self,
        temp: Path,
        content_hash: str,
        blob_id: bytes,
        size: int,
        info: InstanceInfo,
        source: str,
    ) -> AddResult:
        def result(duplicate: bool) -> AddResult:
            return AddResult(
                info.sop_instance_uid,
                info.series_uid,
                info.study_uid,
                content_hash,
                size,
                duplicate,
            )

        with self._writing():
            row = self._db.execute(
                "SELECT content_hash FROM instances WHERE sop_uid = ?", (info.sop_instance_uid,)
            ).fetchone()
            if row is not None and row[0] == content_hash:
                return result(duplicate=True)
            if row is not None:
                raise InstanceConflict(info)
            same_content = self._db.execute(
                "SELECT blob_id FROM instances WHERE content_hash = ? LIMIT 1", (content_hash,)
            ).fetchone()
            final = self._blob_path(content_hash)
            created = False
            if same_content is not None and final.exists():
                blob_id = same_content[0]
            else:
                final.parent.mkdir(exist_ok=True)
                os.replace(temp, final)
                _fsync_dir(final.parent)
                created = True
            try:
                self._before_index_commit()
                self._insert(content_hash, blob_id, size, info, source)
            except BaseException:
                if created:
                    final.unlink(missing_ok=True)
                raise
            return result(duplicate=False)

    def _patient_blob(self, info: InstanceInfo) -> tuple[str, bytes]:
        patient = msgpack.packb(
            [
                info.patient_id,
                info.patient_name,
                info.patient_birth_date,
                info.patient_sex,
                info.accession_number,
            ]
        )
        key = hashlib.blake2b(
            f"{info.patient_id}\x00{info.patient_name}".encode(),
            key=self._name_key,
            digest_size=16,
        ).hexdigest()
        return key, bytes(self._phi_box.encrypt(patient))

    def _insert(
        self, content_hash: str, blob_id: bytes, size: int, info: InstanceInfo, source: str
    ) -> None:
        now = time.time()
        patient_key, patient = self._patient_blob(info)
        with transaction(self._db) as db:
            # Checked again inside the transaction: another process may have added it.
            old = db.execute(
                "SELECT content_hash FROM instances WHERE sop_uid = ?", (info.sop_instance_uid,)
            ).fetchone()
            if old is not None and old[0] != content_hash:
                raise InstanceConflict(info)
            owner = db.execute(
                "SELECT study_uid FROM series WHERE series_uid = ?", (info.series_uid,)
            ).fetchone()
            if owner is not None and owner[0] != info.study_uid:
                raise InstanceConflict(
                    info, f"series {info.series_uid} is stored under another study"
                )
            if source.startswith(PEER_SOURCE):
                # A peer's instance joins a study already here only for the same patient:
                # it must not slip images into another patient's study.
                study = db.execute(
                    "SELECT patient_key FROM studies WHERE study_uid = ?", (info.study_uid,)
                ).fetchone()
                if study is not None and study[0] != patient_key:
                    raise InstanceConflict(
                        info, f"study {info.study_uid} is stored here for another patient"
                    )
            db.execute(
                "INSERT OR IGNORE INTO studies VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    info.study_uid,
                    patient_key,
                    patient,
                    info.study_date,
                    info.study_time,
                    info.study_description,
                    now,
                ),
            )
            db.execute(
                "INSERT OR IGNORE INTO series VALUES (?, ?, ?, ?, ?, ?)",
                (
                    info.series_uid,
                    info.study_uid,
                    info.modality,
                    info.series_description,
                    info.body_part,
                    info.series_number,
                ),
            )
            db.execute(
                "INSERT OR REPLACE INTO instances VALUES "
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    info.sop_instance_uid,
                    info.series_uid,
                    info.study_uid,
                    info.sop_class_uid,
                    info.instance_number,
                    info.transfer_syntax,
                    size,
                    content_hash,
                    blob_id,
                    info.rows,
                    info.columns,
                    info.frames,
                    _json(info.image_position),
                    _json(info.image_orientation),
                    _json(info.pixel_spacing),
                    info.slice_thickness,
                    None,  # frame_ranges
                    int(info.encapsulated),
                    source,
                    now,
                ),
            )

    def _drop_blob_if_unused(self, content_hash: str) -> None:
        used = self._db.execute(
            "SELECT 1 FROM instances WHERE content_hash = ? LIMIT 1", (content_hash,)
        ).fetchone()
        if used is None:
            self._blob_path(content_hash).unlink(missing_ok=True)

    # -- reading

    def has_instance(self, sop_instance_uid: str) -> bool:
        with self._lock:
            return (
                self._db.execute(
                    "SELECT 1 FROM instances WHERE sop_uid = ?", (sop_instance_uid,)
                ).fetchone()
                is not None
            )

    def has_hash(self, content_hash: str) -> bool:
        with self._lock:
            return (
                self._db.execute(
                    "SELECT 1 FROM instances WHERE content_hash = ? LIMIT 1", (content_hash,)
                ).fetchone()
                is not None
            )

    def _locate(self, sop_instance_uid: str) -> tuple[str, bytes, int]:
        with self._lock:
            row = self._db.execute(
                "SELECT content_hash, blob_id, size FROM instances WHERE sop_uid = ?",
                (sop_instance_uid,),
            ).fetchone()
        if row is None:
            raise UnknownInstance(f"no instance {sop_instance_uid} in this node's store")
        return row[0], row[1], row[2]

    def open_instance(self, sop_instance_uid: str) -> BinaryIO:
        """A seekable stream of the original bytes; each chunk is authenticated as read."""
        content_hash, blob_id, size = self._locate(sop_instance_uid)
        reader = BlobReader(self._blob_path(content_hash), self._blob_key, blob_id)
        if reader.size != size:
            reader.close()
            raise StoreCorrupted(f"instance {sop_instance_uid}: blob size differs from index")
        return io.BufferedReader(reader, CHUNK_SIZE)

    def read_instance(self, sop_instance_uid: str) -> bytes:
        """The original bytes, byte-exact, checked against the content hash."""
        content_hash = self._locate(sop_instance_uid)[0]
        with self.open_instance(sop_instance_uid) as stream:
            data = stream.read()
        if hashlib.sha256(data).hexdigest() != content_hash:
            raise StoreCorrupted(f"instance {sop_instance_uid} does not match its content hash")
        return data

    # -- listing

    def _decrypt_patient(self, blob: bytes) -> list[str]:
        try:
            values: list[str] = msgpack.unpackb(self._phi_box.decrypt(blob))
        except nacl.exceptions.CryptoError as exc:
            raise StoreCorrupted("patient details fail authentication (wrong key?)") from exc
        return values

    def _study_rows(self, study_uid: str | None) -> list[StudyRow]:
        with self._lock:
            rows = self._db.execute(
                _STUDY_QUERY_ONE if study_uid is not None else _STUDY_QUERY_ALL,
                () if study_uid is None else (study_uid,),
            ).fetchall()
        out = []
        for uid, patient, date, time_, desc, received, mods, n_series, n_inst, size in rows:
            pid, name, birth, sex, accession = self._decrypt_patient(patient)
            modalities = tuple(sorted(m for m in (mods or "").split(",") if m))
            out.append(
                StudyRow(
                    uid,
                    pid,
                    name,
                    birth,
                    sex,
                    accession,
                    date,
                    time_,
                    desc,
                    modalities,
                    n_series,
                    n_inst,
                    size,
                    received,
                )
            )
        return out

    def studies(self) -> list[StudyRow]:
        return self._study_rows(None)

    def study(self, study_uid: str) -> StudyRow:
        rows = self._study_rows(study_uid)
        if not rows:
            raise UnknownStudy(f"no study {study_uid} in this node's store (see `radmesh studies`)")
        return rows[0]

    def series(self, study_uid: str) -> list[SeriesRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT r.series_uid, r.study_uid, r.modality, r.description, r.body_part, "
                "r.series_number, count(i.sop_uid), coalesce(sum(i.size), 0) "
                "FROM series r LEFT JOIN instances i ON i.series_uid = r.series_uid "
                "WHERE r.study_uid = ? GROUP BY r.series_uid "
                "ORDER BY r.series_number IS NULL, r.series_number, r.series_uid",
                (study_uid,),
            ).fetchall()
        return [SeriesRow(*row) for row in rows]

    def instances(self, study_uid: str, series_uid: str | None = None) -> list[InstanceRow]:
        query = (
            "SELECT sop_uid, series_uid, study_uid, sop_class, instance_number, transfer_syntax, "
            "size, content_hash, rows_, columns_, frames, image_position, image_orientation, "
            "pixel_spacing, slice_thickness, source FROM instances WHERE study_uid = ?"
        )
        params: tuple[str, ...] = (study_uid,)
        if series_uid is not None:
            query += " AND series_uid = ?"
            params += (series_uid,)
        query += " ORDER BY series_uid, instance_number IS NULL, instance_number, sop_uid"
        with self._lock:
            rows = self._db.execute(query, params).fetchall()
        return [
            InstanceRow(
                sop_instance_uid=row[0],
                series_uid=row[1],
                study_uid=row[2],
                sop_class_uid=row[3],
                instance_number=row[4],
                transfer_syntax=row[5],
                size=row[6],
                content_hash=row[7],
                rows=row[8],
                columns=row[9],
                frames=row[10],
                image_position=_unjson(row[11]),
                image_orientation=_unjson(row[12]),
                pixel_spacing=_unjson(row[13]),
                slice_thickness=row[14],
                source=row[15],
            )
            for row in rows
        ]

    # -- deleting

    def delete_study(self, study_uid: str) -> None:
        """Remove a study from the index (one transaction), then its unshared blobs."""
        with self._writing():
            with transaction(self._db) as db:
                hashes = [
                    h
                    for (h,) in db.execute(
                        "SELECT DISTINCT content_hash FROM instances WHERE study_uid = ?",
                        (study_uid,),
                    )
                ]
                found = db.execute("DELETE FROM studies WHERE study_uid = ?", (study_uid,))
                if found.rowcount == 0:
                    raise UnknownStudy(f"no study {study_uid} in this node's store")
                db.execute("DELETE FROM instances WHERE study_uid = ?", (study_uid,))
            for content_hash in hashes:
                self._drop_blob_if_unused(content_hash)

    def iter_instance_uids(self, study_uid: str) -> Iterator[str]:
        for row in self.instances(study_uid):
            yield row.sop_instance_uid


def open_store(home: NodeHome, identity: Identity) -> Store:
    """The node's store, under ``home.data_dir / "store"``, keyed by the node identity."""
    return Store.open(home.data_dir / "store", identity.derive_key(STORE_KEY_PURPOSE))
