"""What the transfer writes to the audit log, through a small typed sink.

:class:`AuditSink` is the one method the transfer needs of an audit log
(``node.core.audit.AuditLog`` fits); :class:`SentRecord` and :class:`ReceivedRecord`
are the two records it writes, one per transfer and end, with numbers only (no
patient data: the study is named by its UID, the peer by its node id).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from node.core.audit import AuditKind
from peer_transport.transfer.machine import State
from peer_transport.transfer.manifest import Manifest
from peer_transport.transfer.progress import Progress

AuditValue = int | str | bool


class AuditSink(Protocol):
    """Appends one audit record; ``node.core.audit.AuditLog`` fits."""

    def append(
        self,
        kind: AuditKind,
        *,
        now: float,
        study_uid: str | None = None,
        peer: str | None = None,
        details: Mapping[str, AuditValue] | None = None,
    ) -> int: ...


@dataclass(frozen=True)
class SentRecord:
    """A study this node served, and how it ended (``transfer``)."""

    manifest: Manifest
    outcome: State
    wire_bytes: int  # of the instances encoded (declared) before it ended

    def write(self, audit: AuditSink, *, peer: str, now: float) -> None:
        manifest = self.manifest
        audit.append(
            AuditKind.TRANSFER,
            now=now,
            study_uid=manifest.study_instance_uid,
            peer=peer,
            details={
                "instances": manifest.count,
                "bytes": manifest.total_size,
                "wire_bytes": self.wire_bytes,
                "outcome": self.outcome.value,
                "deidentified": manifest.deidentified,
            },
        )


@dataclass(frozen=True)
class ReceivedRecord:
    """A study this node fetched, how far and how it ended (``receive``)."""

    manifest: Manifest
    progress: Progress
    complete: bool
    resent_chunks: int  # chunks asked for again (timed out or damaged)
    not_stored: int  # instances whose UID this store holds with other bytes

    def write(self, audit: AuditSink, *, peer: str, now: float) -> None:
        manifest, done = self.manifest, self.progress
        audit.append(
            AuditKind.RECEIVE,
            now=now,
            study_uid=manifest.study_instance_uid,
            peer=peer,
            details={
                "instances": done.instances_done,
                "of": done.instances_total,
                "bytes": done.bytes_done,
                "outcome": "complete" if self.complete else "failed",
                "deidentified": manifest.deidentified,
                "resent_chunks": self.resent_chunks,
                "not_stored": self.not_stored,
            },
        )
