"""The state of one transfer, on either side, as a transition table.

Pause, resume and cancel are transitions; an illegal one raises
:class:`~peer_transport.transfer.errors.IllegalTransition`. The Home screen shows
this same :class:`State` (``node.app.transfers``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from crypto.statetable import TransitionTable
from peer_transport.transfer.errors import IllegalTransition


class State(StrEnum):
    OFFERED = "offered"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETE = "complete"
    CANCELLED = "cancelled"
    FAILED = "failed"


class Event(StrEnum):
    ACCEPT = "accept"
    DATA = "data"  # a chunk arrived or an instance was stored
    PAUSE = "pause"
    RESUME = "resume"
    CANCEL = "cancel"
    FAIL = "fail"
    FINISH = "finish"


TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.OFFERED, Event.ACCEPT): State.RUNNING,
    (State.OFFERED, Event.CANCEL): State.CANCELLED,
    (State.OFFERED, Event.FINISH): State.COMPLETE,  # the receiver had it all already
    (State.RUNNING, Event.DATA): State.RUNNING,
    (State.RUNNING, Event.PAUSE): State.PAUSED,
    (State.RUNNING, Event.CANCEL): State.CANCELLED,
    (State.RUNNING, Event.FAIL): State.FAILED,
    (State.RUNNING, Event.FINISH): State.COMPLETE,
    (State.PAUSED, Event.DATA): State.PAUSED,  # chunks already in flight still land
    (State.PAUSED, Event.RESUME): State.RUNNING,
    (State.PAUSED, Event.CANCEL): State.CANCELLED,
    (State.PAUSED, Event.FAIL): State.FAILED,
    (State.PAUSED, Event.FINISH): State.COMPLETE,
}

TABLE = TransitionTable(
    TRANSITIONS,
    lambda state, event: IllegalTransition(
        f"cannot {event.value} a transfer that is {state.value}"
    ),
)
ACTIVE = frozenset({State.RUNNING, State.PAUSED})  # chunks may still arrive and be stored
TERMINAL = TABLE.terminal(list(State))  # complete, cancelled, failed


@dataclass
class Machine:
    state: State = State.OFFERED

    def fire(self, event: Event) -> State:
        self.state = TABLE.fire(self.state, event)
        return self.state
