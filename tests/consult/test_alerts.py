"""The sans-IO side of report acknowledgement and critical results."""

from __future__ import annotations

from pathlib import Path

import pytest

from consult.alerts import (
    Acknowledgement,
    AckPolicy,
    EscalationSchedule,
    ReportAck,
    critical_stats,
)
from consult.errors import BadReport, LocalConsultError, MalformedMessage
from consult.report import Report, verify_report
from consult.requests import TRANSITIONS, Event, Priority, Role, State, next_state
from crypto import canonical
from crypto.envelope import SignedEnvelope
from crypto.identity import Identity

T0 = 1_700_000_000


def test_escalation_steps_fall_due_one_interval_apart_and_stop_at_the_bound() -> None:
    schedule = EscalationSchedule(interval_s=300, max_steps=3)
    assert schedule.due(T0, 0, T0) is None
    assert schedule.due(T0, 0, T0 + 299) is None
    assert schedule.due(T0, 0, T0 + 300) == 1
    assert schedule.due(T0, 1, T0 + 300) is None  # already taken
    assert schedule.due(T0, 1, T0 + 600) == 2
    assert schedule.next_at(T0, 2) == T0 + 900
    assert schedule.due(T0, 3, T0 + 10_000) is None  # bounded
    assert schedule.next_at(T0, 3) is None


def test_a_node_down_for_several_intervals_takes_one_step_to_the_current_level() -> None:
    schedule = EscalationSchedule(interval_s=300, max_steps=6)
    assert schedule.due(T0, 0, T0 + 1000) == 3  # one page at level 3, not three pages
    assert schedule.due(T0, 0, T0 + 100_000) == 6
    assert schedule.due(T0, 0, T0 - 50) is None  # a clock that went back


def test_escalation_schedule_refuses_a_zero_interval() -> None:
    with pytest.raises(LocalConsultError, match=r"\[alerts\]"):
        EscalationSchedule(interval_s=0)


def test_ack_deadline_is_shorter_for_stat_and_critical() -> None:
    policy = AckPolicy()  # 60 min routine, 30 urgent, 15 STAT, 15 critical
    assert policy.due_at(Priority.ROUTINE, False, T0) == T0 + 3600
    assert policy.due_at(Priority.ROUTINE, True, T0) == T0 + 900
    assert policy.due_at(Priority.STAT, False, T0) == T0 + 900
    assert not policy.overdue(Priority.ROUTINE, False, T0, T0 + 3599)
    assert policy.overdue(Priority.ROUTINE, False, T0, T0 + 3600)


def test_acknowledge_advances_only_a_reported_case_through_the_table() -> None:
    assert next_state(State.REPORTED, Event.ACKNOWLEDGE) is State.ACKNOWLEDGED
    assert [src for (src, ev) in TRANSITIONS if ev is Event.ACKNOWLEDGE] == [State.REPORTED]


def _report(author: Identity, critical: bool) -> Report:
    return Report("c" * 32, "2.25.1", author.node_id, "Dr N", "", "Acute SDH.", (), (), T0,
                  critical)  # fmt: skip


def test_critical_travels_in_the_signed_report() -> None:
    author = Identity.generate()
    wire = _report(author, True).sign(author)
    assert verify_report(wire, consult_id="c" * 32).critical is True


def test_a_report_that_is_not_critical_encodes_as_before_the_field_existed() -> None:
    author = Identity.generate()
    body = _report(author, False).to_body()
    assert "critical" not in body  # old wire bytes unchanged, old readers unaffected
    old = SignedEnvelope.create(author, "consult-report", body).to_wire()
    assert verify_report(old, consult_id="c" * 32).critical is False
    bad = _report(author, True).to_body() | {"critical": 1}
    with pytest.raises(BadReport, match="critical"):
        Report.from_body(canonical.decode(canonical.encode(bad)))


def test_acknowledgement_is_signed_by_its_requester_and_binds_the_report() -> None:
    hospital, other = Identity.generate(), Identity.generate()
    digest = Acknowledgement.digest(b"report bytes")
    ack = Acknowledgement("c" * 32, hospital.node_id, digest, "Dr Aoife Byrne", T0)
    assert Acknowledgement.from_wire(ack.to_wire(hospital)) == ack
    with pytest.raises(LocalConsultError):
        ack.to_wire(other)
    forged = SignedEnvelope.create(other, "consult-ack", ack.to_body()).to_wire()
    with pytest.raises(MalformedMessage, match="other than the requester"):
        Acknowledgement.from_wire(forged)
    with pytest.raises(MalformedMessage):
        Acknowledgement.from_wire(b"\0" * 9000)


def test_critical_stats_count_time_to_acknowledge() -> None:
    rows = [
        ReportAck("a", Role.REQUESTER, Priority.STAT, True, T0, T0 + 120, "Dr A"),
        ReportAck("b", Role.REQUESTER, Priority.STAT, True, T0, T0 + 600, "Dr B"),
        ReportAck("c", Role.REQUESTER, Priority.STAT, True, T0),
        ReportAck("d", Role.REQUESTER, Priority.ROUTINE, False, T0, T0 + 5),
    ]
    stats = critical_stats(rows)
    assert (stats.critical, stats.acknowledged, stats.unacknowledged) == (3, 2, 1)
    assert stats.median_s == 360
    assert stats.max_s == 600


GOLDEN = Path(__file__).parents[1] / "fixtures" / "consult"
HOSPITAL = Identity(bytes(range(32)))
CONSULTANT = Identity(bytes(range(32, 64)))


def _golden_report(critical: bool) -> Report:
    return Report("c" * 32, "2.25.1", CONSULTANT.node_id, "Dr N", "Findings.", "Acute SDH.",
                  (), (), T0, critical)  # fmt: skip


def test_golden_bytes_of_reports_and_acknowledgements() -> None:
    # report_routine.bin was signed by the code before `critical` existed: unchanged bytes.
    routine = (GOLDEN / "report_routine.bin").read_bytes()
    assert _golden_report(False).sign(CONSULTANT) == routine
    assert verify_report(routine, consult_id="c" * 32).critical is False
    critical = (GOLDEN / "report_critical.bin").read_bytes()
    assert _golden_report(True).sign(CONSULTANT) == critical
    ack = Acknowledgement("c" * 32, HOSPITAL.node_id, bytes(32), "Dr Aoife Byrne", T0)
    assert ack.to_wire(HOSPITAL) == (GOLDEN / "ack.bin").read_bytes()


def test_an_acknowledgement_naming_a_consult_id_prefix_is_refused() -> None:
    hospital = Identity.generate()
    ack = Acknowledgement("c", hospital.node_id, bytes(32), "Dr A", T0)  # a prefix of any c…
    with pytest.raises(MalformedMessage, match="malformed consult id"):
        Acknowledgement.from_wire(ack.to_wire(hospital))
