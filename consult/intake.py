"""Taking in a signed consult message (request or response), from the network or a file."""

from __future__ import annotations

from dataclasses import dataclass

from consult.errors import LocalConsultError, MalformedMessage
from consult.requests import ConsultRequest, ConsultResponse, Event, Role, State
from consult.store import ConsultDB
from crypto.identity import NodeId


@dataclass(frozen=True)
class Intake:
    kind: str  # "request" or "response"
    consult_id: str
    summary: str
    # Consultants to send a signed WITHDRAW for this consult: the others, once one
    # accepted an offer; or a consultant whose accept came too late.
    withdraw: tuple[NodeId, ...] = ()


def check_responder(db: ConsultDB, consult_id: str, response: ConsultResponse) -> None:
    """Only a consultant the request was offered (or sent) to may answer it; only its
    requester may withdraw or acknowledge it."""
    info = db.info(consult_id)
    requester = db.get(consult_id).request.requester
    if info.role is Role.REQUESTER:
        allowed = (
            response.event in (Event.ACCEPT, Event.DECLINE) and info.peer_id == response.responder
        )
    else:
        allowed = response.event == Event.WITHDRAW and response.responder == requester
    if not allowed:
        raise LocalConsultError(
            f"{response.responder.short()} may not {response.event.value} consult "
            f"{consult_id[:8]} on this node: response ignored"
        )


def _take_response(db: ConsultDB, response: ConsultResponse, now: int) -> Intake:
    consult_id = db.resolve(response.consult_id)
    who = f"{response.responder.short()} {response.event.value}"
    answer = None
    if db.info(consult_id).role is Role.REQUESTER and response.event in (
        Event.ACCEPT,
        Event.DECLINE,
    ):
        answer = db.answer_offer(consult_id, response.responder, response.event, now)
    if answer is not None:
        state = db.get(consult_id).state.value
        if answer.transition is None and response.responder in answer.withdraw:
            summary = f"{who} too late: consult {consult_id[:8]} is {state}; told it is withdrawn"
        else:
            summary = f"{who}: consult {consult_id[:8]} is now {state}"
        return Intake("response", consult_id, summary, answer.withdraw)
    check_responder(db, consult_id, response)
    if response.event is Event.WITHDRAW and db.get(consult_id).state is State.WITHDRAWN:
        return Intake("response", consult_id, f"consult {consult_id[:8]} was already withdrawn")
    transition = db.apply(consult_id, response.event, now, str(response.responder))
    return Intake(
        "response",
        consult_id,
        f"{who}: consult {response.consult_id[:8]} is now {transition.target.value}",
    )


def take_in(db: ConsultDB, data: bytes, now: int, *, sender: NodeId | None = None) -> Intake:
    """Verify and record ``data``. ``sender``, when known (the network), must be its signer."""
    try:
        request = ConsultRequest.from_wire(data)
    except MalformedMessage:
        response = ConsultResponse.from_wire(data)
        if sender is not None and sender != response.responder:
            raise LocalConsultError("a consult response relayed by another node: ignored") from None
        return _take_response(db, response, now)
    if sender is not None and sender != request.requester:
        raise LocalConsultError("a consult request relayed by another node: ignored")
    db.add(request, role=Role.CONSULTANT, now=now, wire=data, peer=str(request.requester))
    return Intake(
        "request",
        request.id,
        f"Consult {request.id} from {request.requester.short()} received "
        f"({request.priority.value}, {request.subspecialty})",
    )
