"""The consult database: requests and their history survive a restart."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from consult.errors import IllegalTransition, LocalConsultError, UnknownConsult
from consult.requests import Event, Priority, State, Transition
from consult.store import ConsultDB
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
        assert db.info(request.id) == ("consultant", "peer-id", b"signed")


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
