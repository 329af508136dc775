"""A real Orthanc PACS for tests (:mod:`node.dicom.pacs`), skipped when the package is absent."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node.dicom import pacs
from node.dicom.pacs import Orthanc

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
