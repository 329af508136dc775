"""Suite-wide hygiene (loopback-only ICE, no test may leave threads behind), the registry
most node tests need, and the order the tests run in."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

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


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[str]:
    """A registry server on loopback with its own database; its URL. (Imported here, not at
    the top: every xdist worker imports this file before it collects anything.)"""
    from registry.server import RegistryServer

    server = RegistryServer(tmp_path / "registry.sqlite")
    url = await server.start("127.0.0.1", 0)
    yield url
    await server.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first: spread over the xdist workers from the start, they do not leave
    one worker running the longest test alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
