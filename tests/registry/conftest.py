"""Shared helpers for registry tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from crypto.identity import Identity
from registry.records import Availability, NodeRecord
from registry.server import RegistryServer

NOW = 1_800_000_000


def make_record(
    identity: Identity,
    *,
    seq: int = 1,
    now: int = NOW,
    ttl: int = 3600,
    subs: tuple[str, ...] = ("neuro",),
    jur: tuple[str, ...] = ("FR",),
    lang: tuple[str, ...] = ("fr", "en"),
    availability: Availability = Availability.ONLINE,
    endpoints: tuple[str, ...] = ("lan:http://127.0.0.1:7400",),
    name: str = "Dr Test",
) -> NodeRecord:
    return NodeRecord.create(
        identity,
        now=now,
        sequence=seq,
        ttl=ttl,
        display_name=name,
        institution="CHU Test",
        country="FR",
        subspecialties=subs,
        jurisdictions=jur,
        languages=lang,
        timezone="Europe/Paris",
        availability=availability,
        endpoints=endpoints,
    )


class Clock:
    """Injected time for the server: tests move it by hand."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def live_registry(tmp_path: Path, clock: Clock) -> AsyncIterator[RegistryServer]:
    """A real registry server on 127.0.0.1 with an injected clock."""
    server = RegistryServer(tmp_path / "registry.db", clock=clock)
    await server.start("127.0.0.1", 0)
    yield server
    await server.stop()
