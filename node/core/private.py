"""Everything under a node home is private to its user: directories 0700, files 0600.

The home holds the clinical questions, the trust store, the peer directory and
the audit log; a 0755 directory or a 0644 SQLite file lets any local user read
them. So the process runs with umask 077 (:func:`restrict_umask`, called at CLI
entry and when a node starts: covers every file any library creates, SQLite's
``-wal`` / ``-shm`` included), the home and its data directory are created 0700
explicitly (:func:`private_dir`), and `radmesh doctor` reports what is looser
(:func:`loose_modes`) and repairs it with ``--fix`` (:func:`tighten`).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

PRIVATE_UMASK = 0o077
DIR_MODE = 0o700
FILE_MODE = 0o600


def restrict_umask() -> None:
    """New files and directories of this process: 0600 / 0700 whoever creates them."""
    os.umask(os.umask(PRIVATE_UMASK) | PRIVATE_UMASK)


def write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data``, 0600, atomically: written beside it as ``NAME.tmp``,
    synced, then renamed over it, so a crash leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) 0700; an existing ``path`` is set to 0700."""
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    if stat.S_IMODE(path.stat().st_mode) != DIR_MODE:
        os.chmod(path, DIR_MODE)
    return path


@dataclass(frozen=True)
class LooseMode:
    path: Path
    mode: int
    wanted: int

    def __str__(self) -> str:
        return f"{self.path} is {self.mode:04o} (should be {self.wanted:04o})"


def _wanted(st: os.stat_result) -> int:
    return DIR_MODE if stat.S_ISDIR(st.st_mode) else FILE_MODE


def loose_modes(root: Path) -> list[LooseMode]:
    """Everything under ``root`` (itself included) that others can reach or that is not
    0700 (directories) / 0600 (files, sockets); symlinks are not followed."""
    found: list[LooseMode] = []
    paths = [root]
    for base, dirs, files in os.walk(root, followlinks=False):
        paths.extend(Path(base, name) for name in (*dirs, *files))
    for path in paths:
        try:
            st = path.lstat()
        except FileNotFoundError:  # removed while we walked (a temp file, a WAL)
            continue
        if stat.S_ISLNK(st.st_mode):
            continue
        mode, wanted = stat.S_IMODE(st.st_mode), _wanted(st)
        if mode != wanted:
            found.append(LooseMode(path, mode, wanted))
    return found


def tighten(root: Path) -> list[LooseMode]:
    """Set everything :func:`loose_modes` finds to 0700 / 0600; returns what changed."""
    fixed = loose_modes(root)
    for loose in fixed:
        os.chmod(loose.path, loose.wanted)
    return fixed


__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "LooseMode",
    "loose_modes",
    "private_dir",
    "restrict_umask",
    "tighten",
]
