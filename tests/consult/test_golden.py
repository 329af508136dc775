"""Golden bytes of the consult messages that travel between nodes: a change to one of
these wire formats shows up as a changed fixture in review."""

from __future__ import annotations

from pathlib import Path

import pytest

from consult.admission import GuestConsent, GuestRefusal
from consult.live import Invite, LiveFragment, PresenceEnvelope
from consult.requests import ConsultRequest, ConsultResponse, Event, Priority
from crypto.identity import Identity

GOLDEN = Path(__file__).parent / "golden"
ALICE = Identity(bytes(range(32)))  # Ed25519 signatures are deterministic
BOB = Identity(bytes(range(32, 64)))
CONSULT = "ab" * 16
NOW = 1_800_000_000

REQUEST = ConsultRequest(
    id=CONSULT,
    study_uid="2.25.1234",
    question="suspected subdural haematoma",
    priority=Priority.STAT,
    subspecialty="neuro",
    jurisdiction="IE",
    language="en",
    deadline=NOW + 3600,
    requester=ALICE.node_id,
    deidentified=True,
    created_at=NOW,
    priors=("2.25.99",),
)
RESPONSE = ConsultResponse(CONSULT, BOB.node_id, Event.ACCEPT, NOW + 60, "on call")


def test_consult_request_bytes() -> None:
    golden = (GOLDEN / "consult_request.bin").read_bytes()
    assert REQUEST.to_wire(ALICE) == golden
    assert ConsultRequest.from_wire(golden) == REQUEST


def test_consult_response_bytes() -> None:
    golden = (GOLDEN / "consult_response.bin").read_bytes()
    assert RESPONSE.to_wire(BOB) == golden
    assert ConsultResponse.from_wire(golden) == RESPONSE


@pytest.mark.parametrize(
    ("message", "name"),
    [
        (GuestConsent(CONSULT, BOB.public_key), "guest_consent"),
        (GuestRefusal(CONSULT, BOB.node_id), "guest_refusal"),
    ],
)
def test_guest_consent_and_refusal_bytes(message: GuestConsent | GuestRefusal, name: str) -> None:
    golden = (GOLDEN / f"{name}.bin").read_bytes()
    assert message.to_wire() == golden
    assert type(message).from_wire(golden) == message


LIVE = [
    (LiveFragment(CONSULT, 7, 0, 2, b"chunk"), "live_fragment"),
    (PresenceEnvelope(CONSULT, b"\x01\x02\x00\x00"), "presence_envelope"),
    (Invite(CONSULT, (bytes(32),), "CT head", "2.25.1", ALICE.public_key, bytes(64)), "invite"),
]


@pytest.mark.parametrize(("message", "name"), LIVE, ids=[name for _, name in LIVE])
def test_live_session_message_bytes(
    message: LiveFragment | PresenceEnvelope | Invite, name: str
) -> None:
    golden = (GOLDEN / f"{name}.bin").read_bytes()
    assert message.to_wire() == golden
    assert type(message).from_wire(golden) == message
