"""A seekable, read-only stream over plaintext kept on disk in separately sealed pieces.

Both the store's blobs (:class:`node.dicom.store.BlobReader`: fixed-size chunks) and
received instances in their spool file (:class:`node.dicom.sealed_spool.SpoolReader`:
one record per write) are read this way: a reader that seeks decrypts only the piece
under its position, and the last piece opened is kept for the next read.
"""

from __future__ import annotations

import io
from typing import IO, Any


class SealedPieces(io.RawIOBase):
    """Subclasses set ``size`` (plaintext bytes) and say which piece holds a position
    (:meth:`_piece_at`) and how to authenticate and decrypt one (:meth:`_decrypt`)."""

    size: int

    def __init__(self, file: IO[bytes]) -> None:
        super().__init__()
        self._file = file
        self._pos = 0
        self._cached: tuple[int, bytes] | None = None

    def _piece_at(self, position: int) -> tuple[int, int]:
        """(piece index, offset of ``position`` inside that piece)."""
        raise NotImplementedError

    def _decrypt(self, index: int) -> bytes:
        """The plaintext of piece ``index``; raises if it fails authentication."""
        raise NotImplementedError

    def _piece(self, index: int) -> bytes:
        if self._cached is None or self._cached[0] != index:
            self._cached = (index, self._decrypt(index))
        return self._cached[1]

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._pos >= self.size or not len(view):
            return 0
        index, start = self._piece_at(self._pos)
        piece = self._piece(index)[start : start + len(view)]
        view[: len(piece)] = piece
        self._pos += len(piece)
        return len(piece)

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


__all__ = ["SealedPieces"]
