"""The transfer tracker: states, numbers without a protocol yet, finished ones kept a while."""

from __future__ import annotations

import pytest

from node.app.transfers import KEEP_SECONDS, Direction, TransferTracker
from peer_transport.transfer.machine import State


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_tracked_block_is_complete_when_it_ends_and_failed_when_it_raises() -> None:
    clock = Clock()
    tracker = TransferTracker(clock)
    with tracker.track("a" * 32, Direction.IN, "PEERAAA"):
        [running] = tracker.views()
        assert running.state is State.OFFERED
        assert (running.bytes_done, running.bytes_total) == (0, 0)
        assert running.label == "consult aaaaaaaa"
    with pytest.raises(ConnectionError), tracker.track("b" * 32, Direction.OUT, "PEERBBB"):
        raise ConnectionError("peer went away")
    done, failed = tracker.views()
    assert done.state is State.COMPLETE
    assert (failed.state, failed.error, failed.direction) == (
        State.FAILED,
        "peer went away",
        Direction.OUT,
    )


def test_finished_transfers_stay_listed_for_a_while_then_go() -> None:
    clock = Clock()
    tracker = TransferTracker(clock)
    with tracker.track("a" * 32, Direction.IN, "PEERAAA"):
        pass
    clock.now += KEEP_SECONDS - 1
    assert len(tracker.views()) == 1
    clock.now += 2
    assert tracker.views() == []


def test_request_first_does_nothing_without_a_running_transfer_of_that_instance() -> None:
    tracker = TransferTracker(Clock())
    spawned: list[object] = []
    assert tracker.request_first("2.25.1", spawned.append) is False
    assert spawned == []
    assert tracker.manifest_of("2.25.9") is None
