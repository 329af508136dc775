"""Importing files, folders and DICOMDIR into the store.

:func:`iter_candidates` expands the paths given to ``radmesh import`` (files, folders
recursively, DICOMDIR) and :func:`import_paths` feeds them to a store, one bad file never
stopping the rest: each is reported with its reason.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom

from node.dicom.files import InvalidDicom
from node.dicom.store import AddResult, InstanceConflict, Store


def _dicomdir_files(path: Path) -> list[Path]:
    try:
        ds = pydicom.dcmread(path)
        records = ds.DirectoryRecordSequence
    except Exception:
        return []
    found: list[Path] = []
    for record in records:
        ref = record.get("ReferencedFileID")
        if not ref:
            continue
        parts = [ref] if isinstance(ref, str) else list(ref)
        found.append(path.parent.joinpath(*[str(p) for p in parts]))
    return found


def iter_candidates(paths: Iterable[Path]) -> Iterator[Path]:
    """Every file to try: files as given, folders recursively, DICOMDIR references.

    A file reached twice (folder walk and DICOMDIR) is yielded once.
    """
    seen: set[Path] = set()

    def once(p: Path) -> Iterator[Path]:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            yield p

    for path in paths:
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    yield from once(Path(root) / name)
        elif path.name.upper() == "DICOMDIR":
            for ref in _dicomdir_files(path):
                yield from once(ref)
            yield from once(path)
        else:
            yield from once(path)


@dataclass
class ImportSummary:
    imported: list[AddResult] = field(default_factory=list)
    duplicates: list[AddResult] = field(default_factory=list)
    rejected: list[tuple[Path, str]] = field(default_factory=list)
    # Not imported: the store holds this SOP Instance UID with other bytes (the same
    # image in another encoding, or another instance reusing the UID); the first is kept.
    conflicts: list[tuple[Path, str]] = field(default_factory=list)
    # DICOMDIR files (their references are imported) and hidden files.
    skipped: list[Path] = field(default_factory=list)


def import_paths(
    store: Store,
    paths: Iterable[Path],
    *,
    source: str = "import",
    progress: Callable[[int, int, Path], None] | None = None,
) -> ImportSummary:
    """Import every candidate file; each failure is recorded with its reason."""
    summary = ImportSummary()
    candidates = list(iter_candidates(paths))
    for count, path in enumerate(candidates, start=1):
        if progress is not None:
            progress(count, len(candidates), path)
        if path.name.upper() == "DICOMDIR" or path.name.startswith("."):
            summary.skipped.append(path)
            continue
        try:
            result = store.add_file(path, source=source)
        except InvalidDicom as exc:
            summary.rejected.append((path, str(exc)))
            continue
        except InstanceConflict as exc:
            summary.conflicts.append((path, str(exc)))
            continue
        except OSError as exc:
            summary.rejected.append((path, f"unreadable file: {exc.strerror or exc}"))
            continue
        (summary.duplicates if result.duplicate else summary.imported).append(result)
    return summary


class Progress:
    """One line on stderr, redrawn in place on a terminal, silent otherwise."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())

    def __call__(self, count: int, total: int, path: Path) -> None:
        if not self.enabled:
            return
        width = 30
        filled = width * count // max(total, 1)
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(f"\r\x1b[K[{bar}] {count}/{total}  {path.name[-30:]}")
        self.stream.flush()

    def done(self) -> None:
        if self.enabled:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
