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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests first, spread over the xdist workers from the start, so that no worker is
    left running the longest tests one after another at the end.

    ``--dist worksteal`` hands each worker one contiguous block of the collection first
    (block sizes as :func:`_block_sizes`), then moves queued tests from the busiest worker's
    tail to idle ones. So the slow tests are dealt out round-robin to the heads of the
    blocks, longest expected first (a test's ``timeout`` marker is its author's bound);
    tests sharing a module- or session-scoped fixture are dealt as one, so its setup runs
    once. Without workers the slow tests simply come first."""
    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    fast = [item for item in items if item.get_closest_marker("slow") is None]
    groups: dict[str, list[pytest.Item]] = {}
    for item in slow:
        groups.setdefault(_shared_setup(item), []).append(item)
    dealt: list[list[pytest.Item]] = [[] for _ in range(workers)]
    ordered = sorted(groups.values(), key=lambda group: -max(map(_timeout, group)))
    for index, group in enumerate(ordered):
        dealt[index % workers].extend(group)
    items[:] = []
    for block, size in zip(dealt, _block_sizes(len(slow) + len(fast), workers), strict=True):
        take = max(0, size - len(block))
        items.extend([*block, *fast[:take]])
        del fast[:take]
    items.extend(fast)


def _block_sizes(count: int, workers: int) -> list[int]:
    """How xdist's work-stealing scheduler first splits ``count`` tests over idle workers."""
    sizes = []
    for index in range(workers):
        sizes.append(count // (workers - index))
        count -= sizes[-1]
    return sizes


def _shared_setup(item: pytest.Item) -> str:
    """What ``item`` must run beside: the first module-, package- or session-scoped fixture
    of this suite it uses, directly or through another (autouse ones are everywhere), else
    nothing (its own id)."""
    info = getattr(item, "_fixtureinfo", None)  # pytest's own: an order is all that rides on it
    manager = getattr(item.session, "_fixturemanager", None)
    if info is None or manager is None:
        return item.nodeid
    autouse = set(manager._getautousenames(item))
    for name in info.names_closure:
        for fixture in info.name2fixturedefs.get(name, ()):
            ours = bool(fixture.baseid)  # a plugin's (pytest-asyncio's loop) has none
            if ours and fixture.scope in ("module", "package", "session") and name not in autouse:
                return f"{fixture.baseid}::{name}"
    return item.nodeid


def _timeout(item: pytest.Item) -> float:
    marker = item.get_closest_marker("timeout")
    return float(marker.args[0]) if marker is not None and marker.args else 0.0
