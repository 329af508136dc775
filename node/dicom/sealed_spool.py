"""A received DICOM instance on its way to the store, sealed on disk.

pynetdicom writes a received data set to a file as it arrives (so it need not
fit in memory); the store then reads it back. In between the file must not hold
the instance in clear: the store's promise is that image data never is in
clear on disk. So each ``write()`` becomes one record, sealed with
XChaCha20-Poly1305 under a key the listener holds in memory only::

    file   = record*
    record = u32 ciphertext length (big-endian) || ciphertext
    nonce  = file id (16 random bytes) || record index (u64 big-endian)
    AD     = MAGIC || file id || record index

A record cannot be altered, moved or taken from another spool file unnoticed;
the key dies with the process, so a file left by a crash is unreadable and only
removed. :class:`SpoolReader` gives the plain bytes back as a seekable stream,
one record decrypted at a time.
"""

from __future__ import annotations

import bisect
import io
import os
import secrets
import struct
import tempfile
from pathlib import Path
from typing import IO, Any

import nacl.bindings as sodium
import nacl.exceptions

from node.core.errors import NodeError
from node.dicom.sealed_io import SealedPieces

MAGIC = b"RMS1"
KEY_BYTES = sodium.crypto_aead_xchacha20poly1305_ietf_KEYBYTES
ABYTES = sodium.crypto_aead_xchacha20poly1305_ietf_ABYTES
LENGTH = struct.Struct(">I")
INDEX = struct.Struct(">Q")
FILE_ID_BYTES = 16
MAX_RECORD = 16 * 1024 * 1024  # pynetdicom writes one PDV (at most one PDU) per call


class SpoolCorrupted(NodeError):
    """A spooled instance fails authentication or is cut short."""


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


class SpoolWriter:
    """What pynetdicom writes a received data set to (it uses ``name``, ``write`` and
    ``file.flush``): a new 0600 file in ``directory``."""

    def __init__(self, directory: Path, prefix: str, key: bytes) -> None:
        fd, name = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".sealed")
        self.name = name
        self.file: IO[bytes] = os.fdopen(fd, "wb")
        self._key = key
        self._id = secrets.token_bytes(FILE_ID_BYTES)
        self.file.write(self._id)
        self._index = 0

    def write(self, data: Any) -> int:
        plain = bytes(data)
        if not plain:
            return 0
        nonce = self._id + INDEX.pack(self._index)
        sealed = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(
            plain, MAGIC + nonce, nonce, self._key
        )
        self.file.write(LENGTH.pack(len(sealed)) + sealed)
        self._index += 1
        return len(plain)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class SpoolReader(SealedPieces):
    """The plain bytes of a spool file, seekable; each record is authenticated as read."""

    def __init__(self, path: Path, key: bytes) -> None:
        super().__init__(Path(path).open("rb"))  # noqa: SIM115 - closed by close()
        self._key = key
        self._id = self._file.read(FILE_ID_BYTES)
        if len(self._id) != FILE_ID_BYTES:
            self._file.close()
            raise SpoolCorrupted("a spooled instance has no header")
        self._starts: list[int] = []  # plain offset of each record
        self._where: list[tuple[int, int]] = []  # (file offset, ciphertext length)
        end = os.fstat(self._file.fileno()).st_size
        size, offset = 0, FILE_ID_BYTES
        while offset < end:
            header = self._file.read(LENGTH.size)
            (length,) = LENGTH.unpack(header) if len(header) == LENGTH.size else (-1,)
            if not ABYTES <= length <= MAX_RECORD + ABYTES or offset + 4 + length > end:
                self._file.close()
                raise SpoolCorrupted("a spooled instance is cut short or damaged")
            self._starts.append(size)
            self._where.append((offset + LENGTH.size, length))
            size += length - ABYTES
            offset += LENGTH.size + length
            self._file.seek(offset)
        self.size = size
        self.name = "<received instance>"

    def _piece_at(self, position: int) -> tuple[int, int]:
        index = bisect.bisect_right(self._starts, position) - 1
        return index, position - self._starts[index]

    def _decrypt(self, index: int) -> bytes:
        offset, length = self._where[index]
        self._file.seek(offset)
        sealed = self._file.read(length)
        nonce = self._id + INDEX.pack(index)
        try:
            plain: bytes = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
                sealed, MAGIC + nonce, nonce, self._key
            )
        except nacl.exceptions.CryptoError as exc:
            raise SpoolCorrupted("a spooled instance fails authentication") from exc
        return plain


def open_spooled(path: Path, key: bytes) -> tuple[IO[bytes], int]:
    """A buffered, seekable stream of the plain instance, and its size."""
    reader = SpoolReader(path, key)
    return io.BufferedReader(reader, 1 << 20), reader.size


__all__ = ["SpoolCorrupted", "SpoolReader", "SpoolWriter", "new_key", "open_spooled"]
