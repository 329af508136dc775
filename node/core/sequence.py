"""The one sequence number of this home's signed records, shared by every publisher.

A registry or peer keeps a node's record only if its sequence is higher than the
one it holds. The running node, `radmesh registry publish` and anything else
that signs a :class:`~registry.records.NodeRecord` or LAN pointer for this home
take their sequence here, so none of them can fall behind another: each number
is ``max(previous + 1, now)``, written to ``data/record.seq`` under an exclusive
lock (two processes may publish at once) and replaced atomically (a crash leaves
the old or the new number, never a torn one). It never goes backwards, even if
the clock does.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator

from node.core.config import NodeHome
from node.core.private import write_private

log = logging.getLogger(__name__)

SEQUENCE_NAME = "record.seq"


class RecordSequence:
    def __init__(self, home: NodeHome) -> None:
        self.path = home.data_dir / SEQUENCE_NAME
        self._lock_path = home.data_dir / (SEQUENCE_NAME + ".lock")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the lock

    def current(self) -> int:
        """The last number handed out (0 if none yet)."""
        try:
            text = self.path.read_text().strip()
        except FileNotFoundError:
            return 0
        try:
            return max(0, int(text))
        except ValueError:
            log.warning(
                "%s is damaged (%r); record sequences restart from the clock, and the node "
                "catches up if a registry holds a higher one",
                self.path,
                text[:40],
            )
            return 0

    def _write(self, value: int) -> None:
        write_private(self.path, f"{value}\n".encode())

    def next(self, now: int) -> int:
        """A new sequence, above every one handed out before and at least ``now``."""
        return self.advance_past(0, now)

    def advance_past(self, held: int, now: int) -> int:
        """A new sequence above ``held`` too (a registry holds a record signed with it)."""
        with self._locked():
            value = max(self.current() + 1, held + 1, now)
            self._write(value)
            return value
