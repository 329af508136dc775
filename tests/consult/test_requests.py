"""Consult requests: the transition table, signing, routing, offers and turnaround."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from consult.errors import IllegalTransition, LocalConsultError, MalformedMessage
from consult.requests import (
    TERMINAL,
    TRANSITIONS,
    Candidate,
    ConsultCase,
    ConsultRequest,
    ConsultResponse,
    Event,
    OfferRound,
    Priority,
    State,
    Transition,
    next_state,
    rank_consultants,
    refusal,
    turnaround_by_priority,
)
from crypto.envelope import SignedEnvelope
from crypto.identity import Identity, NodeId

NOW = 1_800_000_000
REQUESTER = Identity(bytes(range(32)))


def make_request(
    priority: Priority = Priority.URGENT, created: int = NOW, deadline: int = NOW + 3600
) -> ConsultRequest:
    return ConsultRequest.new(
        requester=REQUESTER.node_id,
        study_uid="2.25.1234",
        question="Subdural haematoma? Midline shift?",
        priority=priority,
        subspecialty="Neuro",
        jurisdiction="fr",
        language="FR",
        deadline=deadline,
        now=created,
    )


@pytest.mark.parametrize(("state", "event"), list(itertools.product(State, Event)))
def test_every_state_event_pair_is_either_in_the_table_or_raises(
    state: State, event: Event
) -> None:
    if (state, event) in TRANSITIONS:
        assert next_state(state, event) == TRANSITIONS[(state, event)]
    else:
        with pytest.raises(IllegalTransition) as info:
            next_state(state, event)
        assert (info.value.state, info.value.event) == (state.value, event.value)
        assert str(info.value) == refusal(state, event)


def test_terminal_states_are_acknowledged_withdrawn_expired() -> None:
    assert frozenset({State.ACKNOWLEDGED, State.WITHDRAWN, State.EXPIRED}) == TERMINAL


def test_happy_path_is_audited_and_timestamped_in_order() -> None:
    audited: list[tuple[str, Transition]] = []
    case = ConsultCase(make_request(), audit=lambda cid, t: audited.append((cid, t)))
    steps = [
        (Event.OFFER, State.OFFERED),
        (Event.ACCEPT, State.ACCEPTED),
        (Event.START_TRANSFER, State.TRANSFERRING),
        (Event.TRANSFER_DONE, State.IN_REVIEW),
        (Event.REPORT, State.REPORTED),
        (Event.ACKNOWLEDGE, State.ACKNOWLEDGED),
    ]
    for minute, (event, expected) in enumerate(steps, start=1):
        case.apply(event, NOW + 60 * minute, actor="someone")
        assert case.state == expected
    assert [t.event for _, t in audited] == [e for e, _ in steps]
    assert [t.at for _, t in audited] == [NOW + 60 * m for m in range(1, 7)]
    assert {cid for cid, _ in audited} == {case.request.id}
    assert case.turnaround() == 5 * 60
    assert case.time_in(State.TRANSFERRING, NOW + 10_000) == 60


def test_illegal_event_leaves_state_and_history_untouched() -> None:
    audited: list[Transition] = []
    case = ConsultCase(make_request(), audit=lambda _cid, t: audited.append(t))
    with pytest.raises(IllegalTransition):
        case.apply(Event.REPORT, NOW)
    assert case.state == State.REQUESTED
    assert case.history == []
    assert audited == []


def test_deadline_expires_open_requests_but_not_accepted_ones() -> None:
    open_case = ConsultCase(make_request())
    assert open_case.expire_if_due(NOW + 3600) is None
    assert open_case.expire_if_due(NOW + 3601) is not None
    assert open_case.state == State.EXPIRED
    accepted = ConsultCase(make_request())
    accepted.apply(Event.ACCEPT, NOW + 10)
    assert accepted.expire_if_due(NOW + 99_999) is None
    assert accepted.state == State.ACCEPTED


def test_turnaround_by_priority_counts_late_reports() -> None:
    cases = []
    for priority, minutes in [
        (Priority.STAT, 20),
        (Priority.STAT, 40),
        (Priority.STAT, 90),
        (Priority.ROUTINE, 600),
    ]:
        case = ConsultCase(make_request(priority))
        case.apply(Event.ACCEPT, NOW + 60)
        case.apply(Event.BEGIN_REVIEW, NOW + 120)
        case.apply(Event.REPORT, NOW + minutes * 60)
        cases.append(case)
    cases.append(ConsultCase(make_request(Priority.URGENT)))  # never reported
    stats = turnaround_by_priority(cases)
    assert stats[Priority.STAT].reported == 3
    assert stats[Priority.STAT].median_s == 40 * 60
    assert stats[Priority.STAT].max_s == 90 * 60
    assert stats[Priority.STAT].late == 1  # deadline was one hour
    assert stats[Priority.ROUTINE].late == 1
    assert stats[Priority.URGENT].reported == 0
    assert stats[Priority.URGENT].median_s is None


def test_request_round_trips_signed_and_normalises_fields() -> None:
    request = make_request()
    assert request.subspecialty == "neuro"
    assert request.jurisdiction == "FR"
    assert ConsultRequest.from_wire(request.to_wire(REQUESTER)) == request


def test_request_signed_by_another_node_is_refused() -> None:
    request = make_request()
    with pytest.raises(LocalConsultError):
        request.to_wire(Identity.generate())
    forged = SignedEnvelope.create(Identity.generate(), "consult-request", request.to_body())
    with pytest.raises(MalformedMessage, match="other than its requester"):
        ConsultRequest.from_wire(forged.to_wire())


def test_tampered_request_is_refused() -> None:
    wire = bytearray(make_request().to_wire(REQUESTER))
    index = wire.index(b"Subdural")
    wire[index] ^= 0x20
    with pytest.raises(MalformedMessage, match="does not verify"):
        ConsultRequest.from_wire(bytes(wire))


def test_oversized_request_is_refused_before_parsing() -> None:
    with pytest.raises(MalformedMessage, match="limit"):
        ConsultRequest.from_wire(b"\x00" * (64 * 1024 + 1))


def test_request_with_bad_priority_is_malformed() -> None:
    body = make_request().to_body() | {"prio": "whenever"}
    wire = SignedEnvelope.create(REQUESTER, "consult-request", body).to_wire()
    with pytest.raises(MalformedMessage, match="priority"):
        ConsultRequest.from_wire(wire)


def test_response_round_trip_and_forgery() -> None:
    consultant = Identity.generate()
    response = ConsultResponse("0abc" * 8, consultant.node_id, Event.ACCEPT, NOW, "on it")
    assert ConsultResponse.from_wire(response.to_wire(consultant)) == response
    with pytest.raises(LocalConsultError):
        response.to_wire(Identity.generate())
    with pytest.raises(LocalConsultError):
        dataclasses.replace(response, event=Event.REPORT).to_wire(consultant)


def candidate(name: str, **overrides: object) -> Candidate:
    fields: dict[str, object] = {
        "node_id": Identity.generate().node_id,
        "display_name": name,
        "subspecialties": ("neuro",),
        "jurisdictions": ("FR", "BE"),
        "languages": ("fr", "en"),
        "online": True,
    }
    fields.update(overrides)
    return Candidate(**fields)  # type: ignore[arg-type]


def test_routing_keeps_licensed_subspecialists_online_first_then_language() -> None:
    request = make_request()
    offline = candidate("Alice", online=False)
    english = candidate("Bob", languages=("en",))
    best = candidate("Zoe")
    no_licence = candidate("Carol", jurisdictions=("DE",))
    wrong_field = candidate("Dan", subspecialties=("msk",))
    busy = candidate("Eve", available=False)
    itself = candidate("Self", node_id=REQUESTER.node_id)
    ranked = rank_consultants(
        request, [offline, english, best, no_licence, wrong_field, busy, itself]
    )
    assert ranked == [best, english, offline]


def test_offer_round_first_accept_wins_and_others_are_withdrawn() -> None:
    a, b, c, d = (candidate(n) for n in "abcd")
    offer = OfferRound.start("req", [a, b, c, d], fan_out=3)
    assert offer.offered == (a.node_id, b.node_id, c.node_id)
    offer.on_decline(c.node_id)
    won, withdraw = offer.on_accept(b.node_id)
    assert won
    assert withdraw == [a.node_id]
    late_won, late_withdraw = offer.on_accept(a.node_id)
    assert not late_won
    assert late_withdraw == [a.node_id]
    assert offer.on_accept(d.node_id) == (False, [])  # never offered
    assert offer.winner == b.node_id


def test_offer_round_all_declined_and_nobody_qualifies() -> None:
    a, b = candidate("a"), candidate("b")
    offer = OfferRound.start("req", [a, b], fan_out=5)
    offer.on_decline(a.node_id)
    assert not offer.all_declined
    offer.on_decline(b.node_id)
    assert offer.all_declined
    with pytest.raises(LocalConsultError, match="no consultant qualifies"):
        OfferRound.start("req", [], fan_out=2)


def test_request_requires_a_real_requester_id() -> None:
    body = make_request().to_body() | {"requester": b"short"}
    with pytest.raises(MalformedMessage):
        ConsultRequest.from_body(body)
    assert isinstance(make_request().requester, NodeId)
