"""Report acknowledgement and critical-result escalation, without I/O.

The referring node acknowledges a report with a signed :class:`Acknowledgement`
bound to the exact report bytes (a named person for a critical one). Until then:

- a report is *overdue* for acknowledgement once :class:`AckPolicy` says so
  (shorter for STAT and for critical results), and lists flag it;
- a critical report is re-sent by the consultant's node and escalated on the
  hospital's node on an :class:`EscalationSchedule`: step ``k`` is due ``k``
  intervals after the report, up to a bounded number of steps. A node that was
  down for several intervals takes one step to the current level, not one per
  missed interval (one page, not a burst).

Time is passed in (``now``, seconds since the epoch).
"""

from __future__ import annotations

import hashlib
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from consult.errors import LocalConsultError, MalformedMessage
from consult.requests import Priority, Role, check_consult_id
from crypto.envelope import SignedEnvelope, open_signed
from crypto.errors import CryptoError
from crypto.identity import Identity, NodeId

ACK_TYPE = "consult-ack"
MAX_ACK_WIRE = 8 * 1024
MAX_NAME_CHARS = 200


@dataclass(frozen=True)
class AckPolicy:
    """Seconds after a report arrives before its missing acknowledgement is flagged."""

    routine_s: int = 3600
    urgent_s: int = 1800
    stat_s: int = 900
    critical_s: int = 900

    def due_at(self, priority: Priority, critical: bool, reported_at: int) -> int:
        by_priority = {
            Priority.ROUTINE: self.routine_s,
            Priority.URGENT: self.urgent_s,
            Priority.STAT: self.stat_s,
        }[priority]
        return reported_at + (min(by_priority, self.critical_s) if critical else by_priority)

    def overdue(self, priority: Priority, critical: bool, reported_at: int, now: int) -> bool:
        return now >= self.due_at(priority, critical, reported_at)


@dataclass(frozen=True)
class EscalationSchedule:
    """Step ``k`` (1..``max_steps``) is due ``k * interval_s`` after ``start``."""

    interval_s: int = 300
    max_steps: int = 6

    def __post_init__(self) -> None:
        if self.interval_s < 1 or self.max_steps < 0:
            raise LocalConsultError(
                "the escalation interval must be at least 1 second and the step count "
                "not negative: check [alerts] in config.toml"
            )

    def due(self, start: int, done: int, now: int) -> int | None:
        """The step to take now (the highest one due), or None if none is due."""
        reached = min(self.max_steps, max(0, now - start) // self.interval_s)
        return reached if reached > done else None

    def next_at(self, start: int, done: int) -> int | None:
        """When the next step falls due, or None once every step was taken."""
        return None if done >= self.max_steps else start + (done + 1) * self.interval_s


@dataclass(frozen=True)
class Acknowledgement:
    """The referrer's signed receipt of one exact report, by a named person (may be empty
    for a report that is not critical)."""

    consult_id: str
    requester: NodeId
    report_sha256: bytes
    by: str
    at: int

    def __post_init__(self) -> None:
        if len(self.by) > MAX_NAME_CHARS:
            raise LocalConsultError(f"the name is limited to {MAX_NAME_CHARS} characters")

    @staticmethod
    def digest(report_wire: bytes) -> bytes:
        return hashlib.sha256(report_wire).digest()

    def to_body(self) -> dict[str, Any]:
        return {
            "consult": self.consult_id,
            "requester": self.requester.digest,
            "report": self.report_sha256,
            "by": self.by,
            "at": self.at,
        }

    def to_wire(self, requester: Identity) -> bytes:
        if requester.node_id != self.requester:
            raise LocalConsultError("an acknowledgement can only be signed by the requester")
        return SignedEnvelope.create(requester, ACK_TYPE, self.to_body()).to_wire()

    @classmethod
    def from_wire(cls, data: bytes) -> Acknowledgement:
        """Check size, signature and that the signer is the named requester."""
        envelope, raw = open_signed(
            data, ACK_TYPE, MAX_ACK_WIRE, what="acknowledgement", error=MalformedMessage
        )
        try:
            consult_id, requester, digest = raw["consult"], raw["requester"], raw["report"]
            by, at = raw["by"], raw["at"]
            consult_id = check_consult_id(consult_id, "acknowledgement")  # whole id, no prefix
            if not (
                isinstance(requester, bytes)
                and len(requester) == 32
                and isinstance(digest, bytes)
                and len(digest) == 32
                and isinstance(by, str)
                and isinstance(at, int)
                and not isinstance(at, bool)
            ):
                raise TypeError("field types")
            ack = cls(consult_id, NodeId(requester), digest, by, at)
        except (KeyError, TypeError, LocalConsultError, CryptoError) as exc:
            raise MalformedMessage(f"acknowledgement is malformed: {exc}") from exc
        if envelope.signer_id != ack.requester:
            raise MalformedMessage("acknowledgement is signed by a node other than the requester")
        return ack


@dataclass(frozen=True)
class ReportAck:
    """Where one report stands on a node: the consult store's row."""

    consult_id: str
    role: Role  # this node's side of the consult
    priority: Priority
    critical: bool
    reported_at: int
    acked_at: int | None = None
    acked_by: str = ""
    steps: int = 0  # re-sends (consultant) or escalations (requester) taken

    @property
    def time_to_ack(self) -> int | None:
        return None if self.acked_at is None else self.acked_at - self.reported_at


@dataclass(frozen=True)
class CriticalStats:
    critical: int
    acknowledged: int
    median_s: float | None
    max_s: int | None
    unacknowledged: int


def critical_stats(rows: Iterable[ReportAck]) -> CriticalStats:
    critical = [r for r in rows if r.critical]
    times = sorted(t for r in critical if (t := r.time_to_ack) is not None)
    return CriticalStats(
        len(critical),
        len(times),
        statistics.median(times) if times else None,
        times[-1] if times else None,
        len(critical) - len(times),
    )
