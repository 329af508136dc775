"""A real Orthanc PACS for tests (:mod:`node.pacs`), skipped with the package name when absent."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node import pacs
from node.pacs import Orthanc

__all__ = ["Orthanc", "orthanc_server", "require_orthanc"]


def require_orthanc() -> str:
    binary = shutil.which("Orthanc")
    if binary is None:
        pytest.skip("Orthanc not found: install the Debian package orthanc")
    return binary


@contextlib.contextmanager
def orthanc_server(directory: Path, **options: Any) -> Iterator[Orthanc]:
    require_orthanc()
    with pacs.orthanc_server(directory, **options) as server:
        yield server
