"""Suite-wide hygiene: loopback-only ICE, and no test may leave threads behind."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

THREAD_GRACE_SECONDS = 3.0


@pytest.fixture(autouse=True, scope="session")
def _ice_stays_on_loopback() -> None:
    """Every in-process aiortc connection gathers host candidates on 127.0.0.1 only, so no
    test ever sends ICE checks to another address (namespace tests run in subprocesses)."""
    from peer_transport.rtc import restrict_host_addresses

    restrict_host_addresses(["127.0.0.1"])


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves a non-daemon thread running (a server it forgot to stop)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + THREAD_GRACE_SECONDS
    while True:
        leaked = [
            t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon
        ]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked, f"test leaked threads: {[t.name for t in leaked]}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first: spread over the xdist workers from the start, they do not leave
    one worker running the longest test alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
