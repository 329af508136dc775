"""The one transition-table helper the handshake, consult and transfer machines share."""

from __future__ import annotations

import pytest

from crypto.statetable import TransitionTable


class Refused(Exception):
    pass


TABLE = TransitionTable(
    {("idle", "go"): "busy", ("busy", "stop"): "idle", ("busy", "end"): "done"},
    lambda state, event: Refused(f"{state}/{event}"),
)


def test_fire_follows_the_table() -> None:
    assert TABLE.fire("idle", "go") == "busy"
    assert TABLE.fire("busy", "end") == "done"
    assert TABLE.allows("busy", "stop")
    assert not TABLE.allows("idle", "stop")


def test_a_missing_pair_raises_the_callers_error() -> None:
    with pytest.raises(Refused, match="done/go"):
        TABLE.fire("done", "go")


def test_terminal_states_are_those_no_event_leaves() -> None:
    assert TABLE.terminal(["idle", "busy", "done"]) == frozenset({"done"})
