"""Consult requests: the signed request, its state machine, routing and turnaround.

Everything here is pure: time is passed in (``now``, seconds since the epoch),
audit goes to a callback, and persistence lives in :mod:`consult.store`.

Why one module: The request message, its transition table and the sentences that explain
a refusal are one contract: a new state needs its words here too.
"""

from __future__ import annotations

import re
import statistics
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from consult.errors import IllegalTransition, LocalConsultError, MalformedMessage
from crypto.envelope import SignedEnvelope, open_signed
from crypto.identity import Identity, NodeId
from crypto.statetable import TransitionTable
from node.core.ids import is_dicom_uid

REQUEST_TYPE = "consult-request"
MAX_REQUEST_WIRE = 64 * 1024
MAX_QUESTION_CHARS = 8000
MAX_FIELD_CHARS = 200
MAX_PRIORS = 8  # earlier studies of the patient sent with one consult
# What ConsultRequest.new makes (uuid4().hex); every consult message from a peer is
# checked against it when parsed, since a consult id also names local state.
_CONSULT_ID = re.compile(r"[0-9a-f]{32}")


def check_consult_id(value: object, what: str = "consult message") -> str:
    """``value`` if it is a consult id (32 lowercase hex characters), else MalformedMessage."""
    if not isinstance(value, str) or _CONSULT_ID.fullmatch(value) is None:
        raise MalformedMessage(
            f"{what} carries a malformed consult id (not 32 lowercase hex characters); "
            "it was refused: the sending node may run an incompatible or faulty version"
        )
    return value


def check_uid(value: object, what: str) -> str:
    """``value`` if it is a DICOM UID (digits and dots, at most 64), else MalformedMessage."""
    if not is_dicom_uid(value):
        raise MalformedMessage(f"{what} is not a DICOM UID (digits and dots, at most 64)")
    return str(value)


class Priority(StrEnum):
    STAT = "stat"
    URGENT = "urgent"
    ROUTINE = "routine"


class State(StrEnum):
    REQUESTED = "requested"
    OFFERED = "offered"
    ACCEPTED = "accepted"
    DECLINED = "declined"
    TRANSFERRING = "transferring"
    IN_REVIEW = "in_review"
    REPORTED = "reported"
    ACKNOWLEDGED = "acknowledged"
    WITHDRAWN = "withdrawn"
    EXPIRED = "expired"


class Role(StrEnum):
    """Which side of a consult this node is on (stored as its value)."""

    REQUESTER = "requester"  # this node asked (the hospital)
    CONSULTANT = "consultant"  # this node was asked (the specialist)


class Event(StrEnum):
    OFFER = "offer"
    ACCEPT = "accept"
    DECLINE = "decline"
    START_TRANSFER = "start_transfer"
    TRANSFER_DONE = "transfer_done"
    BEGIN_REVIEW = "begin_review"  # the consultant already holds the study
    REPORT = "report"
    ACKNOWLEDGE = "acknowledge"
    WITHDRAW = "withdraw"
    EXPIRE = "expire"


S, E = State, Event
TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.REQUESTED, E.OFFER): S.OFFERED,
    (S.REQUESTED, E.ACCEPT): S.ACCEPTED,  # sent straight to a chosen peer
    (S.REQUESTED, E.DECLINE): S.DECLINED,
    (S.REQUESTED, E.WITHDRAW): S.WITHDRAWN,
    (S.REQUESTED, E.EXPIRE): S.EXPIRED,
    (S.OFFERED, E.ACCEPT): S.ACCEPTED,
    (S.OFFERED, E.DECLINE): S.DECLINED,
    (S.OFFERED, E.WITHDRAW): S.WITHDRAWN,  # requester cancelled, or another consultant won
    (S.OFFERED, E.EXPIRE): S.EXPIRED,
    (S.DECLINED, E.OFFER): S.OFFERED,  # the requester routes it to someone else
    (S.DECLINED, E.WITHDRAW): S.WITHDRAWN,
    (S.DECLINED, E.EXPIRE): S.EXPIRED,
    (S.ACCEPTED, E.START_TRANSFER): S.TRANSFERRING,
    (S.ACCEPTED, E.BEGIN_REVIEW): S.IN_REVIEW,
    (S.ACCEPTED, E.WITHDRAW): S.WITHDRAWN,
    (S.TRANSFERRING, E.TRANSFER_DONE): S.IN_REVIEW,
    (S.TRANSFERRING, E.WITHDRAW): S.WITHDRAWN,
    (S.IN_REVIEW, E.REPORT): S.REPORTED,
    (S.IN_REVIEW, E.WITHDRAW): S.WITHDRAWN,
    (S.REPORTED, E.ACKNOWLEDGE): S.ACKNOWLEDGED,
}
# Once accepted, a passing deadline does not expire the case: a late report is
# still worth more than none, and turnaround stats show the lateness.
TERMINAL: frozenset[State] = TransitionTable(TRANSITIONS, Exception).terminal(list(State))
OPEN_STATES: frozenset[State] = frozenset(State) - TERMINAL


# What a refused event means to the person who asked for it: what the consult's state
# is, in their words, then what to do next. The next step names a key in the TUI and a
# command on the CLI (:func:`refusal` picks one), so neither speaks state-machine.
SITUATION: dict[State, str] = {
    S.REQUESTED: "This consult has not been offered to a consultant yet",
    S.OFFERED: "This consult is still waiting for a consultant's answer",
    S.ACCEPTED: "This consult is already accepted",
    S.DECLINED: "This consult was declined",
    S.TRANSFERRING: "The study of this consult is already being fetched",
    S.IN_REVIEW: "This consult is in review",
    S.REPORTED: "This consult is already reported",
    S.ACKNOWLEDGED: "The report of this consult is already acknowledged",
    S.WITHDRAWN: "This consult was withdrawn by the requester",
    S.EXPIRED: "This consult expired before a consultant accepted it",
}
# Next steps: (TUI wording, CLI wording); {id} is the consult id as the user gave it.
STEPS: dict[str, tuple[str, str]] = {
    "answer": (
        "press a to accept it or d to decline it",
        "run `radmesh consult accept {id}` or `radmesh consult decline {id}`",
    ),
    "accept": ("press a to accept it first", "run `radmesh consult accept {id}` first"),
    "fetch": ("press f to fetch the study", "run `radmesh consult fetch {id}` to fetch the study"),
    "wait_fetch": (
        "wait for it to arrive (see Transfers)",
        "wait for it to arrive, then try again",
    ),
    "report": (
        "open the study (enter) and write the report",
        "run `radmesh consult report {id}` to send the report",
    ),
    "ack": (
        "the requester acknowledges it next",
        "the requester acknowledges it next (`radmesh consult ack {id}`)",
    ),
    "reroute": (
        "send it to another consultant or withdraw it",
        "send it to another consultant or withdraw it (`radmesh consult withdraw {id}`)",
    ),
    "wait_answer": (
        "wait for a consultant to accept it",
        "wait for a consultant to accept it (`radmesh consult show {id}`)",
    ),
    "wait_report": ("wait for the consultant's report", "wait for the consultant's report"),
    "nothing": ("there is nothing left to do on it", "there is nothing left to do on it"),
    "new": (
        "send a new request if a second opinion is still needed",
        "send a new request if a second opinion is still needed (`radmesh consult request`)",
    ),
}
NEXT_STEP: dict[State, str] = {
    S.REQUESTED: "wait_answer",
    S.OFFERED: "wait_answer",
    S.ACCEPTED: "fetch",
    S.DECLINED: "reroute",
    S.TRANSFERRING: "wait_fetch",
    S.IN_REVIEW: "report",
    S.REPORTED: "ack",
    S.ACKNOWLEDGED: "nothing",
    S.WITHDRAWN: "nothing",
    S.EXPIRED: "new",
}
# Where the event itself changes what to say (the state alone does not).
REFUSALS: dict[tuple[State, Event], tuple[str, str]] = {
    (S.ACCEPTED, E.ACCEPT): (SITUATION[S.ACCEPTED], "fetch"),
    (S.ACCEPTED, E.DECLINE): (
        "This consult is already accepted, so it can no longer be declined",
        "fetch",
    ),
    (S.OFFERED, E.REPORT): ("This consult is not accepted yet", "answer"),
    (S.REQUESTED, E.REPORT): ("This consult is not accepted yet", "answer"),
    (S.OFFERED, E.START_TRANSFER): ("This consult is not accepted yet", "accept"),
    (S.REQUESTED, E.START_TRANSFER): ("This consult is not accepted yet", "accept"),
    (S.ACCEPTED, E.REPORT): ("The study of this consult is not fetched yet", "fetch"),
    (S.TRANSFERRING, E.REPORT): ("The study of this consult is still arriving", "wait_fetch"),
    (S.IN_REVIEW, E.ACKNOWLEDGE): ("This consult has no report yet", "wait_report"),
}


def refusal(state: State, event: Event, consult_id: str = "ID", *, tui: bool = False) -> str:
    """The sentence a person reads when ``event`` is refused in ``state``: what happened
    and what to do, with the next step as a TUI key (``tui``) or a CLI command."""
    situation, step = REFUSALS.get((state, event), (SITUATION[state], NEXT_STEP[state]))
    tui_text, cli_text = STEPS[step]
    return f"{situation}; {(tui_text if tui else cli_text).format(id=consult_id)}."


def _refuse(state: State, event: Event) -> IllegalTransition:
    return IllegalTransition(state.value, event.value, refusal(state, event))


TABLE = TransitionTable(TRANSITIONS, _refuse)
next_state = TABLE.fire

# The events a node fires by itself as the study moves (no party decides them): the
# only ones :func:`path_to` follows, so advancing a case never accepts, reports or
# withdraws anything on a person's behalf.
STUDY_EVENTS: frozenset[Event] = frozenset({E.START_TRANSFER, E.TRANSFER_DONE, E.BEGIN_REVIEW})


def path_to(state: State, target: State, via: frozenset[Event] = STUDY_EVENTS) -> list[Event]:
    """The shortest run of ``via`` events that takes ``state`` to ``target`` in the table
    (empty when already there, or when ``target`` cannot be reached that way)."""
    paths: dict[State, list[Event]] = {state: []}
    frontier = [state]
    while frontier and target not in paths:
        following = []
        for here in frontier:
            for event in sorted(via):  # the table's order would do; sorted is stable to read
                there = TRANSITIONS.get((here, event))
                if there is not None and there not in paths:
                    paths[there] = [*paths[here], event]
                    following.append(there)
        frontier = following
    return paths.get(target, [])


def _priors(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_PRIORS:
        raise MalformedMessage(f"consult request priors must be a list of at most {MAX_PRIORS}")
    return tuple(check_uid(uid, "consult request prior study UID") for uid in value)


def _text(raw: Mapping[str, Any], key: str, limit: int = MAX_FIELD_CHARS) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or len(value) > limit:
        raise MalformedMessage(f"consult request field {key!r} must be text of at most {limit}")
    return value


def _int(raw: Mapping[str, Any], key: str) -> int:
    value = raw.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise MalformedMessage(f"consult request field {key!r} must be a non-negative integer")
    return value


@dataclass(frozen=True)
class ConsultRequest:
    id: str
    study_uid: str  # pseudonymised unless deidentified is False
    question: str
    priority: Priority
    subspecialty: str
    jurisdiction: str  # where the patient is, so where the consultant needs a licence
    language: str
    deadline: int
    requester: NodeId
    deidentified: bool
    created_at: int
    # Earlier studies of the same patient sent with this one (their shared UIDs), fetched
    # after it; the requesting node serves no other study under this consult.
    priors: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.priors) > MAX_PRIORS:
            raise LocalConsultError(f"at most {MAX_PRIORS} prior studies go with one consult")
        if len(set(self.priors)) != len(self.priors) or self.study_uid in self.priors:
            raise LocalConsultError("a prior study is listed twice, or is the current study")
        if len(self.question) > MAX_QUESTION_CHARS:
            raise LocalConsultError(
                f"the clinical question is {len(self.question)} characters; "
                f"keep it under {MAX_QUESTION_CHARS}"
            )
        if self.deadline < self.created_at:
            raise LocalConsultError("the deadline is before the request was made")

    @classmethod
    def new(
        cls,
        *,
        requester: NodeId,
        study_uid: str,
        question: str,
        priority: Priority,
        subspecialty: str,
        jurisdiction: str,
        language: str,
        deadline: int,
        now: int,
        deidentified: bool = True,
        priors: tuple[str, ...] = (),
    ) -> ConsultRequest:
        if not is_dicom_uid(study_uid):
            raise LocalConsultError(
                f"study UID {study_uid[:64]!r} is not a well-formed DICOM UID (digits and "
                "dots, at most 64): the consultant's node would refuse the request; share "
                "the study de-identified, which gives it a new UID"
            )
        return cls(
            uuid.uuid4().hex,
            study_uid,
            question,
            priority,
            subspecialty.lower(),
            jurisdiction.upper(),
            language.lower(),
            deadline,
            requester,
            deidentified,
            now,
            priors,
        )

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "study": self.study_uid,
            "q": self.question,
            "prio": self.priority.value,
            "sub": self.subspecialty,
            "jur": self.jurisdiction,
            "lang": self.language,
            "deadline": self.deadline,
            "requester": self.requester.digest,
            "deid": self.deidentified,
            "created": self.created_at,
        }
        if self.priors:  # absent when none: a request without priors is signed as before
            body["priors"] = list(self.priors)
        return body

    @classmethod
    def from_body(cls, raw: Any) -> ConsultRequest:
        if not isinstance(raw, dict):
            raise MalformedMessage("a consult request must be a map")
        requester = raw.get("requester")
        if not isinstance(requester, bytes) or len(requester) != 32:
            raise MalformedMessage("consult request has no valid requester id")
        deid = raw.get("deid")
        if not isinstance(deid, bool):
            raise MalformedMessage("consult request field 'deid' must be true or false")
        try:
            priority = Priority(_text(raw, "prio"))
        except ValueError as exc:
            raise MalformedMessage("consult request priority must be stat/urgent/routine") from exc
        try:
            return cls(
                id=check_consult_id(raw.get("id"), "consult request"),
                study_uid=check_uid(raw.get("study"), "consult request study UID"),
                question=_text(raw, "q", MAX_QUESTION_CHARS),
                priority=priority,
                subspecialty=_text(raw, "sub"),
                jurisdiction=_text(raw, "jur"),
                language=_text(raw, "lang"),
                deadline=_int(raw, "deadline"),
                requester=NodeId(requester),
                deidentified=deid,
                created_at=_int(raw, "created"),
                priors=_priors(raw.get("priors", [])),
            )
        except LocalConsultError as exc:
            raise MalformedMessage(f"consult request is inconsistent: {exc}") from exc

    def to_wire(self, requester: Identity) -> bytes:
        """Signed by the requester; only the requester's own key may sign it."""
        if requester.node_id != self.requester:
            raise LocalConsultError("a consult request can only be signed by its requester")
        return SignedEnvelope.create(requester, REQUEST_TYPE, self.to_body()).to_wire()

    @classmethod
    def from_wire(cls, data: bytes) -> ConsultRequest:
        """Check size, signature and that the signer is the named requester."""
        envelope, body = open_signed(
            data, REQUEST_TYPE, MAX_REQUEST_WIRE, what="consult request", error=MalformedMessage
        )
        request = cls.from_body(body)
        if envelope.signer_id != request.requester:
            raise MalformedMessage("consult request is signed by a node other than its requester")
        return request


@dataclass(frozen=True)
class Transition:
    at: int
    event: Event
    source: State
    target: State
    actor: str = ""  # node id text of who caused it, when known


AuditHook = Callable[[str, Transition], None]


def _no_audit(consult_id: str, transition: Transition) -> None:
    return None


@dataclass
class ConsultCase:
    """A request and where it is in its life; every transition is kept and audited."""

    request: ConsultRequest
    state: State = State.REQUESTED
    history: list[Transition] = field(default_factory=list)
    audit: AuditHook = _no_audit

    def apply(self, event: Event, now: int, actor: str = "") -> Transition:
        target = next_state(self.state, event)
        transition = Transition(now, event, self.state, target, actor)
        self.audit(self.request.id, transition)
        self.history.append(transition)
        self.state = target
        return transition

    def expire_if_due(self, now: int, actor: str = "") -> Transition | None:
        if now > self.request.deadline and (self.state, Event.EXPIRE) in TRANSITIONS:
            return self.apply(Event.EXPIRE, now, actor)
        return None

    def turnaround(self) -> int | None:
        """Seconds from request to report, once reported."""
        for transition in self.history:
            if transition.target == State.REPORTED:
                return transition.at - self.request.created_at
        return None

    def time_in(self, state: State, now: int) -> int:
        """Total seconds spent in ``state`` (up to ``now`` if still there)."""
        total, entered = 0, self.request.created_at if state == State.REQUESTED else None
        for transition in self.history:
            if transition.source == state and entered is not None:
                total += transition.at - entered
                entered = None
            if transition.target == state:
                entered = transition.at
        if entered is not None:
            total += now - entered
        return total


@dataclass(frozen=True)
class TurnaroundStats:
    priority: Priority
    reported: int
    median_s: float | None
    p90_s: float | None
    max_s: int | None
    late: int  # reported after the deadline


def turnaround_by_priority(cases: Iterable[ConsultCase]) -> dict[Priority, TurnaroundStats]:
    times: dict[Priority, list[int]] = {p: [] for p in Priority}
    late: dict[Priority, int] = dict.fromkeys(Priority, 0)
    for case in cases:
        seconds = case.turnaround()
        if seconds is None:
            continue
        times[case.request.priority].append(seconds)
        if case.request.created_at + seconds > case.request.deadline:
            late[case.request.priority] += 1
    result = {}
    for priority, values in times.items():
        values.sort()
        result[priority] = TurnaroundStats(
            priority,
            len(values),
            statistics.median(values) if values else None,
            values[min(len(values) - 1, int(0.9 * len(values)))] if values else None,
            values[-1] if values else None,
            late[priority],
        )
    return result


# --- routing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """What routing needs to know about a possible consultant (from a registry record)."""

    node_id: NodeId
    display_name: str
    subspecialties: tuple[str, ...]
    jurisdictions: tuple[str, ...]  # where the consultant holds a licence
    languages: tuple[str, ...]
    online: bool
    available: bool = True  # the consultant's own "taking cases" switch


def rank_consultants(request: ConsultRequest, candidates: Iterable[Candidate]) -> list[Candidate]:
    """Consultants who may take the case, best first: online, then same language, then name.

    A candidate qualifies with the wanted subspecialty and a licence for the
    jurisdiction the patient is in; the requester never consults itself.
    """
    wanted = request.subspecialty.lower()
    origin = request.jurisdiction.upper()
    eligible = [
        c
        for c in candidates
        if c.node_id != request.requester
        and c.available
        and wanted in {s.lower() for s in c.subspecialties}
        and origin in {j.upper() for j in c.jurisdictions}
    ]
    language = request.language.lower()
    return sorted(
        eligible,
        key=lambda c: (
            not c.online,
            language not in {lang.lower() for lang in c.languages},
            c.display_name.lower(),
            c.node_id.digest,
        ),
    )


@dataclass
class OfferRound:
    """Offer one request to several consultants: the first to accept wins.

    Sans-IO: the caller sends the offers and the withdrawals this returns.
    """

    request_id: str
    offered: tuple[NodeId, ...]
    winner: NodeId | None = None
    declined: set[NodeId] = field(default_factory=set)

    @classmethod
    def start(cls, request_id: str, ranked: Sequence[Candidate], fan_out: int) -> OfferRound:
        if fan_out < 1:
            raise LocalConsultError("offer a consult to at least one consultant")
        chosen = tuple(c.node_id for c in ranked[:fan_out])
        if not chosen:
            raise LocalConsultError(
                "no consultant qualifies (subspecialty, licence for the origin, available): "
                "widen the subspecialty or send it to a chosen peer"
            )
        return cls(request_id, chosen)

    def on_accept(self, node: NodeId) -> tuple[bool, list[NodeId]]:
        """Return (this node won, nodes to tell the request was withdrawn)."""
        if node not in self.offered:
            return False, []
        if self.winner is not None:
            return False, [node] if node != self.winner else []
        self.winner = node
        return True, [n for n in self.offered if n != node and n not in self.declined]

    def on_decline(self, node: NodeId) -> None:
        if node in self.offered:
            self.declined.add(node)

    @property
    def all_declined(self) -> bool:
        return self.winner is None and self.declined >= set(self.offered)


RESPONSE_TYPE = "consult-response"
MAX_RESPONSE_WIRE = 8 * 1024
RESPONSE_EVENTS = frozenset({Event.ACCEPT, Event.DECLINE, Event.WITHDRAW, Event.ACKNOWLEDGE})


@dataclass(frozen=True)
class ConsultResponse:
    """A signed answer about a request: a consultant accepts or declines, the requester
    withdraws (cancelled, or someone else won) or acknowledges the report."""

    consult_id: str
    responder: NodeId
    event: Event
    at: int
    reason: str = ""

    def to_wire(self, responder: Identity) -> bytes:
        if responder.node_id != self.responder:
            raise LocalConsultError("a consult response can only be signed by its responder")
        if self.event not in RESPONSE_EVENTS:
            raise LocalConsultError(f"{self.event.value!r} is not something a peer answers")
        body: dict[str, Any] = {
            "id": self.consult_id,
            "by": self.responder.digest,
            "event": self.event.value,
            "at": self.at,
            "reason": self.reason,
        }
        return SignedEnvelope.create(responder, RESPONSE_TYPE, body).to_wire()

    @classmethod
    def from_wire(cls, data: bytes) -> ConsultResponse:
        envelope, raw = open_signed(
            data, RESPONSE_TYPE, MAX_RESPONSE_WIRE, what="consult response", error=MalformedMessage
        )
        if not isinstance(raw, dict):
            raise MalformedMessage("a consult response must be a map")
        by = raw.get("by")
        try:
            event = Event(_text(raw, "event"))
        except ValueError as exc:
            raise MalformedMessage("consult response has an unknown event") from exc
        if not isinstance(by, bytes) or len(by) != 32 or event not in RESPONSE_EVENTS:
            raise MalformedMessage("consult response has a bad responder or event")
        response = cls(
            check_consult_id(raw.get("id"), "consult response"),
            NodeId(by),
            event,
            _int(raw, "at"),
            _text(raw, "reason", 2000),
        )
        if envelope.signer_id != response.responder:
            raise MalformedMessage("consult response is signed by a node other than its responder")
        return response
