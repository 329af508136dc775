"""Fixtures for node tests that need a registry on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from registry.server import RegistryServer


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[str]:
    server = RegistryServer(tmp_path / "registry.sqlite")
    url = await server.start("127.0.0.1", 0)
    yield url
    await server.stop()
