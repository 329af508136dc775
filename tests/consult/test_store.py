"""The consult database: requests and their history survive a restart."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from consult.errors import BadReport, IllegalTransition, LocalConsultError, UnknownConsult
from consult.report import Report
from consult.requests import Event, Priority, Role, State, Transition
from consult.store import CaseInfo, ConsultDB
from crypto.identity import Identity
from tests.consult.test_requests import NOW, make_request


def test_requests_and_history_survive_reopen(tmp_path: Path) -> None:
    request = make_request()
    with ConsultDB.in_data_dir(tmp_path) as db:
        db.add(request, role="consultant", now=NOW, wire=b"signed", peer="peer-id")
        db.apply(request.id, Event.ACCEPT, NOW + 5, "me")
        db.apply(request.id, Event.START_TRANSFER, NOW + 6)
    with ConsultDB.in_data_dir(tmp_path) as db:
        case = db.get(request.id)
        assert case.request == request
        assert case.state == State.TRANSFERRING
        assert [(t.event, t.at, t.actor) for t in case.history] == [
            (Event.ACCEPT, NOW + 5, "me"),
            (Event.START_TRANSFER, NOW + 6, ""),
        ]
        assert db.info(request.id) == CaseInfo(Role.CONSULTANT, "peer-id", b"signed")


def test_illegal_transition_is_not_persisted(tmp_path: Path) -> None:
    request = make_request()
    with ConsultDB.in_data_dir(tmp_path) as db:
        db.add(request, role="requester", now=NOW)
        with pytest.raises(IllegalTransition):
            db.apply(request.id, Event.REPORT, NOW + 1)
    with ConsultDB.in_data_dir(tmp_path) as db:
        case = db.get(request.id)
        assert case.state == State.REQUESTED
        assert case.history == []


def test_audit_hook_sees_every_persisted_transition(tmp_path: Path) -> None:
    seen: list[tuple[str, Transition]] = []
    request = make_request()
    with ConsultDB.in_data_dir(tmp_path, audit=lambda c, t: seen.append((c, t))) as db:
        db.add(request, role="requester", now=NOW)
        db.apply(request.id, Event.OFFER, NOW + 1)
        db.apply(request.id, Event.WITHDRAW, NOW + 2)
    assert [(c, t.target) for c, t in seen] == [
        (request.id, State.OFFERED),
        (request.id, State.WITHDRAWN),
    ]


def test_worklist_is_most_urgent_first_and_filters_by_state(tmp_path: Path) -> None:
    routine = make_request(Priority.ROUTINE, created=NOW)
    stat_late = make_request(Priority.STAT, created=NOW + 10, deadline=NOW + 99)
    stat_early = make_request(Priority.STAT, created=NOW + 5, deadline=NOW + 99)
    with ConsultDB.in_data_dir(tmp_path) as db:
        for request in (routine, stat_late, stat_early):
            db.add(request, role="consultant", now=NOW)
        db.apply(routine.id, Event.DECLINE, NOW + 20)
        assert [c.request.id for c in db.cases()] == [stat_early.id, stat_late.id, routine.id]
        assert [c.request.id for c in db.cases([State.DECLINED])] == [routine.id]


def test_expire_due_expires_only_open_requests_past_their_deadline(tmp_path: Path) -> None:
    due = make_request(deadline=NOW + 10)
    accepted = make_request(deadline=NOW + 10)
    later = make_request(deadline=NOW + 1000)
    with ConsultDB.in_data_dir(tmp_path) as db:
        for request in (due, accepted, later):
            db.add(request, role="requester", now=NOW)
        db.apply(accepted.id, Event.ACCEPT, NOW + 1)
        assert db.expire_due(NOW + 11) == [due.id]
        assert db.get(due.id).state == State.EXPIRED
        assert db.get(accepted.id).state == State.ACCEPTED
        assert db.get(later.id).state == State.REQUESTED


def test_resolve_prefix_unknown_ambiguous_and_duplicate(tmp_path: Path) -> None:
    request = make_request()
    with ConsultDB.in_data_dir(tmp_path) as db:
        db.add(request, role="requester", now=NOW)
        assert db.resolve(request.id[:6]) == request.id
        with pytest.raises(UnknownConsult):
            db.resolve("zz")
        with pytest.raises(UnknownConsult):
            db.resolve("")
        with pytest.raises(UnknownConsult):
            db.resolve("%")  # LIKE wildcards are literal
        with pytest.raises(LocalConsultError, match="already"):
            db.add(request, role="requester", now=NOW)
        with pytest.raises(LocalConsultError, match="role"):
            db.add(make_request(), role="bystander", now=NOW)
        db.add(dataclasses.replace(make_request(), id="abcd1"), role="requester", now=NOW)
        db.add(dataclasses.replace(make_request(), id="abcd2"), role="requester", now=NOW)
        with pytest.raises(LocalConsultError, match="several"):
            db.resolve("abcd")
        assert db.resolve("abcd2") == "abcd2"


def _in_review(db: ConsultDB, peer: str) -> str:
    request = make_request()
    db.add(request, role="requester", now=NOW, peer=peer)
    for event in (Event.OFFER, Event.ACCEPT, Event.START_TRANSFER, Event.TRANSFER_DONE):
        db.apply(request.id, event, NOW + 1)
    return request.id


def _signed_report(consult_id: str, signer: Identity) -> bytes:
    report = Report(
        consult_id, "2.25.1234", signer.node_id, "Dr^B", "text", "impression", (), (), NOW + 50
    )
    return report.sign(signer)


def test_report_is_verified_filed_and_survives_reopen(tmp_path: Path) -> None:
    consultant = Identity.generate()
    seen: list[State] = []
    with ConsultDB.in_data_dir(tmp_path, audit=lambda _c, t: seen.append(t.target)) as db:
        consult_id = _in_review(db, str(consultant.node_id))
        wire = _signed_report(consult_id, consultant)
        report = db.file_report(consult_id, wire, NOW + 60)
        assert report.impression == "impression"
    assert seen[-1] == State.REPORTED
    with ConsultDB.in_data_dir(tmp_path) as db:
        case = db.get(consult_id)
        assert case.state == State.REPORTED
        assert case.history[-1].actor == str(consultant.node_id)
        assert db.report_wire(consult_id) == wire


def test_report_from_another_consultant_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    consultant, other = Identity.generate(), Identity.generate()
    with ConsultDB.in_data_dir(tmp_path) as db:
        consult_id = _in_review(db, str(consultant.node_id))
        with pytest.raises(BadReport):
            db.file_report(consult_id, _signed_report(consult_id, other), NOW + 60)
        with pytest.raises(BadReport):
            db.file_report(consult_id, _signed_report("another-case", consultant), NOW + 60)
        assert db.get(consult_id).state == State.IN_REVIEW
        assert db.report_wire(consult_id) is None


def test_offers_first_accept_binds_later_accept_is_withdrawn_all_declines_decline(
    tmp_path: Path,
) -> None:
    ann, bob, eve = (Identity.generate().node_id for _ in range(3))
    won, declined = make_request(), make_request()
    with ConsultDB.in_data_dir(tmp_path) as db:
        for request in (won, declined):
            db.add(request, role="requester", now=NOW)
            db.offer(request.id, [ann, bob], NOW)
        with pytest.raises(LocalConsultError, match="not offered"):
            db.answer_offer(won.id, eve, Event.ACCEPT, NOW + 1)
        first = db.answer_offer(won.id, bob, Event.ACCEPT, NOW + 2)
        assert first is not None
        assert first.transition is not None
        assert first.withdraw == (ann,)
        late = db.answer_offer(won.id, ann, Event.ACCEPT, NOW + 3)
        assert late is not None
        assert (late.transition, late.withdraw) == (None, (ann,))
        assert db.info(won.id).peer_id == bob
        assert db.get(won.id).state is State.ACCEPTED

        one = db.answer_offer(declined.id, ann, Event.DECLINE, NOW + 1)
        assert one is not None
        assert one.transition is None
        assert db.get(declined.id).state is State.OFFERED
        db.answer_offer(declined.id, bob, Event.DECLINE, NOW + 2)
        assert db.get(declined.id).state is State.DECLINED
        assert db.answer_offer(make_request().id, ann, Event.ACCEPT, NOW) is None


def _at(db: ConsultDB, state: State, role: Role = Role.CONSULTANT) -> str:
    """A stored consult brought to ``state`` the way the table allows."""
    request = make_request()
    db.add(request, role=role, now=NOW)
    events = {
        State.OFFERED: [Event.OFFER],
        State.ACCEPTED: [Event.ACCEPT],
        State.TRANSFERRING: [Event.ACCEPT, Event.START_TRANSFER],
        State.IN_REVIEW: [Event.ACCEPT, Event.BEGIN_REVIEW],
    }[state]
    for event in events:
        db.apply(request.id, event, NOW)
    return request.id


@pytest.mark.parametrize(
    ("start", "target", "fired"),
    [
        (State.ACCEPTED, State.IN_REVIEW, [Event.BEGIN_REVIEW]),  # had the study: no transfer
        (State.TRANSFERRING, State.IN_REVIEW, [Event.TRANSFER_DONE]),
        (State.ACCEPTED, State.TRANSFERRING, [Event.START_TRANSFER]),
        (State.TRANSFERRING, State.TRANSFERRING, []),  # there already
        (State.IN_REVIEW, State.TRANSFERRING, []),  # cannot go back: the next step refuses
    ],
)
def test_advance_fires_the_tables_study_events_and_audits_each(
    tmp_path: Path, start: State, target: State, fired: list[Event]
) -> None:
    audited: list[Transition] = []
    with ConsultDB.in_data_dir(tmp_path, audit=lambda _cid, t: audited.append(t)) as db:
        consult_id = _at(db, start)
        before = len(audited)
        done = db.advance(consult_id, target, NOW + 9, "me")
        assert [t.event for t in done] == fired
        assert audited[before:] == done
        assert db.state_of(consult_id) is (target if fired else start)


def test_advance_never_takes_a_decision_for_a_party(tmp_path: Path) -> None:
    """An offered consult is not accepted on the way to review: advancing follows only
    the study's own events, so a report for a case nobody accepted stays refused."""
    with ConsultDB.in_data_dir(tmp_path) as db:
        consult_id = _at(db, State.OFFERED, Role.REQUESTER)
        assert db.advance(consult_id, State.IN_REVIEW, NOW + 1) == []
        assert db.state_of(consult_id) is State.OFFERED
        assert db.get(consult_id).history[-1].event is Event.OFFER


def test_advance_through_chosen_events_only(tmp_path: Path) -> None:
    """A report begins the review of a study the consultant holds, but does not finish a
    fetch still running (the report is then refused, as before)."""
    with ConsultDB.in_data_dir(tmp_path) as db:
        transferring = _at(db, State.TRANSFERRING)
        only = frozenset({Event.BEGIN_REVIEW})
        assert db.advance(transferring, State.IN_REVIEW, NOW + 1, via=only) == []
        accepted = _at(db, State.ACCEPTED)
        done = db.advance(accepted, State.IN_REVIEW, NOW + 1, via=only)
        assert [t.event for t in done] == [Event.BEGIN_REVIEW]


def test_info_names_the_role_and_the_other_party(tmp_path: Path) -> None:
    peer = Identity.generate().node_id
    with ConsultDB.in_data_dir(tmp_path) as db:
        request = make_request()
        db.add(request, role=Role.REQUESTER, now=NOW)
        assert db.info(request.id) == CaseInfo(Role.REQUESTER, "", None)
        assert db.info(request.id).peer_id is None
        other = make_request()
        db.add(other, role=Role.CONSULTANT, now=NOW, wire=b"w", peer=str(peer))
        assert db.info(other.id).peer_id == peer
        with pytest.raises(LocalConsultError, match="role must be one of"):
            db.add(make_request(), role="referrer", now=NOW)
