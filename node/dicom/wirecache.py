"""A disk cache of verified JPEG-LS pixel codings, so a study starts sending sooner.

Coding the pixel values with JPEG-LS and decoding them again to check is what
costs when a study is prepared for the wire (about 9 ms per 512x512 CT slice
here), and it is the same work each time the study is shared, for the original
and for its de-identified copy alike: de-identification rewrites header
elements, never pixel values. :class:`WireCache` keeps each verified coding
under :func:`node.dicom.wirecodec.pixel_key` (SHA-256 of the pixel bytes and their
shape), and :class:`CacheWarmer` fills it in the background after an import.

Layout under the cache directory (0700)::

    .tmp-PID-RND     an entry being written (deleted at open if PID is gone)
    ab/<name>        one entry; name = keyed hash of the pixel key

An entry is MAGIC, a 24-byte nonce and the msgpack of (shift, precision, frames)
sealed with XChaCha20-Poly1305 under the cache key, with the pixel key as
associated data. The images stay encrypted at rest like the store's, and the
authentication tag is the entry's own digest: a damaged entry, or one moved
to another name, fails to open and counts as a miss (and is deleted), never as
pixels. Entries are written to a temp file and renamed into place. The cache is
bounded by a byte cap: the least recently used entries go first (a hit renews
an entry's mtime, which orders the entries again after a restart).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import msgpack
import nacl.bindings as sodium
import nacl.exceptions

from node.dicom import wirecodec
from node.dicom.wirecodec import CodedPixels

log = logging.getLogger(__name__)

_unseal = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt
MAGIC = b"RMW1"
NONCE = sodium.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
DEFAULT_CAP = 2 << 30  # 2 GiB of coded pixels: about 20,000 CT slices
WARM_QUEUE = 100_000  # instance UIDs waiting to be warmed; more are dropped
KEY_PURPOSE = "radmesh-wirecache-v1"


def remove_stale_temps(directory: Path) -> None:
    """Remove ``.tmp-<pid>-...`` files whose writer died mid-write (or is this process,
    starting over); a live process's temp files stay."""
    for temp in directory.glob(".tmp-*"):
        try:
            pid = int(temp.name.split("-")[1])
        except (IndexError, ValueError):
            pid = -1
        if pid <= 0 or pid == os.getpid() or not pid_alive(pid):
            temp.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs (a temp file's writer, say)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WireCache:
    """Verified pixel codings on disk, encrypted, bounded; thread-safe.

    Fits :class:`node.dicom.wirecodec.PixelCache`: pass it to ``wirecodec.encode``.
    """

    def __init__(self, directory: Path, key: bytes, cap: int = DEFAULT_CAP) -> None:
        if len(key) != sodium.crypto_aead_xchacha20poly1305_ietf_KEYBYTES:
            raise ValueError("the wire cache key must be 32 bytes")
        self.directory = Path(directory)
        self.cap = cap
        self._key = hashlib.blake2b(key, digest_size=32, person=b"radmesh-wc-seal").digest()
        self._name_key = hashlib.blake2b(key, digest_size=32, person=b"radmesh-wc-name").digest()
        self._lock = threading.Lock()
        self._sizes: OrderedDict[str, int] = OrderedDict()  # oldest first
        self._total = 0
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        self._load()

    @property
    def size(self) -> int:
        """Bytes the entries take on disk."""
        return self._total

    def _load(self) -> None:
        remove_stale_temps(self.directory)
        found = []
        for path in self.directory.glob("??/*"):
            with contextlib.suppress(FileNotFoundError):
                stat = path.stat()
                found.append((stat.st_mtime_ns, path.name, stat.st_size))
        for _mtime, name, size in sorted(found):
            self._sizes[name] = size
            self._total += size

    def _path(self, name: str) -> Path:
        return self.directory / name[:2] / name

    def _name(self, key: bytes) -> str:
        return hashlib.blake2b(key, key=self._name_key, digest_size=32).hexdigest()

    def get(self, key: bytes) -> CodedPixels | None:
        """The coding stored under ``key``; None when missing or damaged."""
        name = self._name(key)
        path = self._path(name)
        try:
            sealed = path.read_bytes()
        except FileNotFoundError:
            return None
        coded = self._open(key, sealed)
        if coded is None:
            log.warning("a wire cache entry was damaged on disk; it is deleted and coded again")
            self._forget(name)
            return None
        with self._lock:
            if name in self._sizes:
                self._sizes.move_to_end(name)
        with contextlib.suppress(OSError):
            os.utime(path)
        return coded

    def _open(self, key: bytes, sealed: bytes) -> CodedPixels | None:
        if sealed[: len(MAGIC)] != MAGIC:
            return None
        nonce = sealed[len(MAGIC) : len(MAGIC) + NONCE]
        try:
            plain = _unseal(sealed[len(MAGIC) + NONCE :], MAGIC + key, nonce, self._key)
            shift, precision, frames = msgpack.unpackb(plain, raw=False)
        except (nacl.exceptions.CryptoError, ValueError, TypeError, msgpack.UnpackException):
            return None
        if not (
            type(shift) is int
            and type(precision) is int
            and isinstance(frames, list)
            and all(isinstance(f, bytes) for f in frames)
        ):
            return None
        return CodedPixels(shift, precision, tuple(frames))

    def put(self, key: bytes, coded: CodedPixels) -> None:
        """Store ``coded`` (verified by the caller) under ``key``, evicting the oldest."""
        plain = msgpack.packb([coded.shift, coded.precision, list(coded.frames)])
        nonce = secrets.token_bytes(NONCE)
        box = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(
            plain, MAGIC + key, nonce, self._key
        )
        sealed = MAGIC + nonce + box
        if len(sealed) > self.cap:
            return
        name = self._name(key)
        path = self._path(name)
        temp = self.directory / f".tmp-{os.getpid()}-{secrets.token_hex(8)}"
        try:
            path.parent.mkdir(exist_ok=True)
            temp.write_bytes(sealed)
            os.replace(temp, path)  # a crash leaves the old entry or the new, never a mix
        except OSError as exc:
            temp.unlink(missing_ok=True)
            log.warning("could not write a wire cache entry (%s); sending still works", exc)
            return
        with self._lock:
            self._total += len(sealed) - self._sizes.pop(name, 0)
            self._sizes[name] = len(sealed)
            victims = []
            while self._total > self.cap and self._sizes:
                victim, size = self._sizes.popitem(last=False)
                self._total -= size
                victims.append(victim)
        for victim in victims:
            self._path(victim).unlink(missing_ok=True)

    def _forget(self, name: str) -> None:
        with self._lock:
            self._total -= self._sizes.pop(name, 0)
        self._path(name).unlink(missing_ok=True)


def open_cache(data_dir: Path, key: bytes, cap: int = DEFAULT_CAP) -> WireCache:
    """The node's wire cache, under ``data_dir / "wirecache"``."""
    return WireCache(Path(data_dir) / "wirecache", key, cap)


class CacheWarmer:
    """Codes newly imported instances into a cache in one low-priority thread.

    ``submit`` never blocks: it queues an instance UID (dropped when the queue
    is full) and returns. The thread reads the instance with ``read`` and codes
    it with the cache; errors are logged, never raised. ``close`` stops it after
    the instance it is on; what is still queued is dropped (it is coded when sent).
    """

    def __init__(
        self,
        cache: wirecodec.PixelCache,
        read: Callable[[str], bytes],
        queue_size: int = WARM_QUEUE,
    ) -> None:
        self.cache = cache
        self._read = read
        self._queue: queue.Queue[str | None] = queue.Queue(queue_size)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._start_lock = threading.Lock()

    def submit(self, sop_instance_uid: str) -> bool:
        with self._start_lock:
            if self._closed:
                return False
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="wirecache-warmer", daemon=True
                )
                self._thread.start()
        try:
            self._queue.put_nowait(sop_instance_uid)
        except queue.Full:
            log.debug("wire cache warming queue is full; an instance will be coded when sent")
            return False
        return True

    def _run(self) -> None:
        with contextlib.suppress(OSError):  # Linux: a thread has its own nice value
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while True:
            uid = self._queue.get()
            if uid is None or self._closed:
                return
            try:
                wirecodec.encode(self._read(uid), self.cache)
            except Exception as exc:  # warming is an optimisation: never take the node down
                log.warning("warming the wire cache failed for one instance: %s", exc)

    def close(self, timeout: float = 30.0) -> None:
        with self._start_lock:
            self._closed = True
            thread = self._thread
        if thread is None:
            return
        while True:  # make room for the sentinel: what is queued is dropped anyway
            try:
                self._queue.put_nowait(None)
                break
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._queue.get_nowait()
        thread.join(timeout)
