"""Errors raised by :mod:`consult`.

Local errors mean this node asked for something that cannot be done (an
illegal transition, removing someone else's annotation); remote errors mean a
peer sent something malformed, oversized or forged. Messages are written for
the person who reads them: what happened, and what to do.
"""

from __future__ import annotations


class ConsultError(Exception):
    """Base of every error raised by the consult package."""


class LocalConsultError(ConsultError):
    """This node asked for something the consultation rules do not allow."""


class RemoteConsultError(ConsultError):
    """A peer sent a consult message that is malformed, too large, or badly signed."""


class IllegalTransition(LocalConsultError):
    """An event that the request state machine does not allow in the current state."""

    def __init__(self, state: str, event: str, sentence: str = "") -> None:
        super().__init__(
            sentence
            or (
                f"This consult is {state.replace('_', ' ')}, so it cannot be done now "
                f"({event.replace('_', ' ')}): check `radmesh consult show` for what happened"
            )
        )
        self.state = state
        self.event = event


class UnknownConsult(LocalConsultError):
    """No consult request with that id is in this node's database."""

    def __init__(self, consult_id: str) -> None:
        super().__init__(
            f"no consult request {consult_id!r} on this node: see `radmesh consult list`"
        )
        self.consult_id = consult_id


class NotAuthor(LocalConsultError):
    """Only an annotation's author may change or remove it."""


class InvalidMeasurement(LocalConsultError):
    """A measurement cannot be computed from the given geometry or image."""


class MalformedMessage(RemoteConsultError):
    """A consult message from a peer does not parse or exceeds its size cap."""


class BadReport(RemoteConsultError):
    """A report or review does not verify: altered, wrongly signed, or for another case."""


class Forgery(MalformedMessage):
    """A peer's live edit is not signed by its author, or alters another participant's work."""


class LimitExceeded(MalformedMessage):
    """A peer's live edit goes past a session limit (message, document, per-participant)."""
