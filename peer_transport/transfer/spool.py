"""Where transfer bytes wait on disk, both ends sealed: the receiver's resumable
:class:`Spool` and the sender's throwaway :class:`SenderSpool`.

What travels may be a full identified study, so nothing here is ever in clear. The
receiver's spool outlives the process (sealed with the node's key, so a restart
resumes); the sender's dies with it (its key only ever lives in memory).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import struct
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import nacl.bindings as sodium
import nacl.exceptions
import nacl.secret

from node.dicom import wirecodec
from peer_transport.transfer.errors import LocalTransferError

SPOOL_KEY_PURPOSE = "radmesh-spool-v1"  # the node's key for its receive spools
_NONCE = sodium.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
_TAG = sodium.crypto_aead_xchacha20poly1305_ietf_ABYTES
RECEIPT_SIZE = _NONCE + _TAG
# Spools opened without a key are sealed all the same, with a key that dies with the
# process (tests, one-off tools); a node passes its own (SPOOL_KEY_PURPOSE) so that a
# restarted node resumes what it had.
_PROCESS_KEY = secrets.token_bytes(32)


class Spool:
    """A directory holding one transfer's manifest, state file and part files, sealed.

    What a peer sent may be a full identified study, so nothing here is in clear: each
    chunk is sealed (XChaCha20-Poly1305, a fresh random nonce per write) in place, at
    the offset its plain bytes would have, and the nonce and tag go back to the caller
    as a *receipt* (the receiver journals it, as it journalled chunk digests before);
    the manifest and state files are sealed whole (SecretBox). Part files keep the
    size and offsets of the wire encoding, so crash-safety reasoning is unchanged:
    a chunk counts only if its receipt opens the bytes on disk.
    """

    def __init__(self, root: Path, key: bytes | None = None) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = key or _PROCESS_KEY
        self._chunk_key = hashlib.blake2b(key, digest_size=32, person=b"radmesh-spoolc").digest()
        file_key = hashlib.blake2b(key, digest_size=32, person=b"radmesh-spoolf").digest()
        self._box = nacl.secret.SecretBox(file_key)
        self._writers: dict[int, int] = {}  # part index -> fd open for writing

    def _part(self, index: int) -> Path:
        return self.root / f"{index}.part"

    def write_chunk(self, index: int, seq: int, offset: int, data: bytes) -> bytes:
        """Seal and write one chunk; returns its receipt (needed to read it back)."""
        nonce = secrets.token_bytes(_NONCE)
        sealed = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(
            data, struct.pack("<II", index, seq), nonce, self._chunk_key
        )
        fd = self._writers.get(index)
        if fd is None:  # kept open until the part is dropped: one open per part, not chunk
            fd = self._writers[index] = os.open(self._part(index), os.O_WRONLY | os.O_CREAT, 0o600)
        os.pwrite(fd, memoryview(sealed)[: len(data)], offset)
        return nonce + sealed[len(data) :]

    def read_chunk(
        self, index: int, seq: int, offset: int, length: int, receipt: bytes
    ) -> bytes | None:
        """The chunk written with ``receipt``, or None if the part does not hold it."""
        try:
            fd = os.open(self._part(index), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            return self._open_chunk(fd, index, seq, offset, length, receipt)
        finally:
            os.close(fd)

    def _open_chunk(
        self, fd: int, index: int, seq: int, offset: int, length: int, receipt: bytes
    ) -> bytes | None:
        sealed = os.pread(fd, length, offset)
        if len(sealed) != length or len(receipt) != RECEIPT_SIZE:
            return None
        try:
            plain: bytes = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
                sealed + receipt[_NONCE:],
                struct.pack("<II", index, seq),
                receipt[:_NONCE],
                self._chunk_key,
            )
        except nacl.exceptions.CryptoError:
            return None
        return plain

    def has_part(self, index: int) -> bool:
        return self._part(index).exists()

    def read_part(self, index: int, chunks: Sequence[tuple[int, int, bytes]]) -> bytes:
        """A whole part from its (offset, length, receipt) chunks, in order. Raises
        :class:`node.dicom.wirecodec.CorruptInstance` if any chunk was damaged on disk."""
        try:
            fd = os.open(self._part(index), os.O_RDONLY)
        except FileNotFoundError:
            fd = -1
        out = []
        try:
            for seq, (offset, length, receipt) in enumerate(chunks):
                plain = (
                    None if fd < 0 else self._open_chunk(fd, index, seq, offset, length, receipt)
                )
                if plain is None:
                    raise wirecodec.CorruptInstance(
                        f"chunk {seq} is missing or damaged in the spool"
                    )
                out.append(plain)
        finally:
            if fd >= 0:
                os.close(fd)
        return b"".join(out)

    def drop_part(self, index: int) -> None:
        fd = self._writers.pop(index, None)
        if fd is not None:
            os.close(fd)
        self._part(index).unlink(missing_ok=True)

    def close(self) -> None:
        """Close the part files kept open for writing (writing again reopens them)."""
        while self._writers:
            with contextlib.suppress(OSError):
                os.close(self._writers.popitem()[1])

    def __del__(self) -> None:
        self.close()

    def save(self, name: str, data: bytes) -> None:
        tmp = self.root / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self._box.encrypt(data))
        os.replace(tmp, self.root / name)  # atomic: a crash leaves the old or the new file

    def append(self, name: str, data: bytes) -> None:
        """Append to a file kept in clear (the journal: chunk numbers and receipts)."""
        fd = os.open(self.root / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            view = memoryview(data)
            while view:  # a journal record: one short write, in practice
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    def append_sealed(self, name: str, data: bytes) -> None:
        """Append one sealed record (length-prefixed SecretBox) to ``name``."""
        sealed = bytes(self._box.encrypt(data))
        self.append(name, struct.pack("<I", len(sealed)) + sealed)

    def load_sealed(self, name: str) -> list[bytes]:
        """The records :meth:`append_sealed` wrote, in order, up to the first one that is
        torn or does not open (a crash mid-append, or another key)."""
        raw = self.load_clear(name) or b""
        records, at = [], 0
        while at + 4 <= len(raw):
            (length,) = struct.unpack_from("<I", raw, at)
            sealed = raw[at + 4 : at + 4 + length]
            if len(sealed) != length:
                break
            try:
                records.append(bytes(self._box.decrypt(sealed)))
            except (nacl.exceptions.CryptoError, ValueError):
                break
            at += 4 + length
        return records

    def save_clear(self, name: str, data: bytes) -> None:
        tmp = self.root / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, self.root / name)

    def load_clear(self, name: str) -> bytes | None:
        path = self.root / name
        return path.read_bytes() if path.exists() else None

    def remove(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def load(self, name: str) -> bytes | None:
        """A sealed file's contents; None when missing or unreadable with this key."""
        path = self.root / name
        if not path.exists():
            return None
        try:
            return bytes(self._box.decrypt(path.read_bytes()))
        except (nacl.exceptions.CryptoError, ValueError):
            return None


class SenderSpool:
    """Wire encodings of one outgoing study on disk, each sealed (XChaCha20-Poly1305).

    The key is made here and never leaves memory, so whatever a crash leaves
    behind in the 0700 directory is unreadable (the files may hold PHI when the
    study is not de-identified); :meth:`close` deletes it. Directories left by
    a process that no longer runs are removed when the next spool is made.

    Worker threads read and write it, and one may still run after a cancelled send
    closed it (a thread is not stopped by cancelling its task): after :meth:`close`,
    ``put`` and ``get`` raise instead of touching the file descriptor, whose number
    the next spool (the peer fetched again) is likely to be given.
    """

    def __init__(self, parent: Path | None = None) -> None:
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            _remove_orphans(parent)
        self.root = Path(tempfile.mkdtemp(prefix=f"send-{os.getpid()}-", dir=parent))
        self._key = secrets.token_bytes(sodium.crypto_aead_xchacha20poly1305_ietf_KEYBYTES)
        self._fd = os.open(self.root / "wires", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self._slots: list[tuple[int, int]] = []  # (offset, sealed length)
        self._end = 0
        self._lock = threading.Lock()  # the descriptor is not closed under a reader/writer
        self._closed = False

    @staticmethod
    def _nonce(slot: int) -> bytes:
        return struct.pack("<Q", slot).ljust(sodium.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES)

    def put(self, wire: bytes) -> int:
        """Append one wire encoding; returns its slot."""
        with self._lock:
            self._check_open()
            slot = len(self._slots)
            sealed = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(
                wire, None, self._nonce(slot), self._key
            )
            os.pwrite(self._fd, sealed, self._end)
            self._slots.append((self._end, len(sealed)))
            self._end += len(sealed)
            return slot

    def get(self, slot: int) -> bytes:
        with self._lock:
            self._check_open()
            offset, length = self._slots[slot]
            sealed = os.pread(self._fd, length, offset)
        try:
            wire: bytes = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
                sealed, None, self._nonce(slot), self._key
            )
        except nacl.exceptions.CryptoError as exc:
            raise LocalTransferError(
                f"the outgoing spool in {self.root} was damaged on disk; send the study again"
            ) from exc
        return wire

    def _check_open(self) -> None:
        if self._closed:
            raise LocalTransferError("the outgoing spool is closed: its transfer has ended")

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                with contextlib.suppress(OSError):
                    os.close(self._fd)
        shutil.rmtree(self.root, ignore_errors=True)


def _remove_orphans(parent: Path) -> None:
    for path in parent.glob("send-*-*"):
        pid = path.name.split("-")[1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            pass
