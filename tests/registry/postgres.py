"""A real PostgreSQL for tests: a throwaway cluster on 127.0.0.1, skipped with the package
name when absent. The server dies with the test process (PR_SET_PDEATHSIG)."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.core.children import die_with_parent, stop
from tests.ports import free_port as _free_port

__all__ = ["postgres_cluster", "require_postgres"]


def require_postgres() -> Path:
    """The directory of initdb and postgres; skips naming what to install."""
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        pytest.skip("asyncpg not installed: pip install -e '.[postgres]'")
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or [shutil.which("initdb") or ""]
    if not found[-1]:
        pytest.skip("PostgreSQL not found: install the Debian package postgresql")
    return Path(found[-1]).parent


def _account() -> tuple[int, int] | None:
    """postgres refuses to run as root: run it as the postgres (or nobody) account."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return entry.pw_uid, entry.pw_gid
    pytest.skip("running as root and no postgres or nobody account to run PostgreSQL as")


@contextlib.contextmanager
def postgres_cluster() -> Iterator[str]:
    """Start a cluster in a temporary directory; yields its base URL (no database name)."""
    bindir = require_postgres()
    account = _account()
    root = Path(tempfile.mkdtemp(prefix="radmesh-pg-"))
    data = root / "data"
    uid = gid = None
    if account is not None:
        os.chown(root, *account)
        uid, gid = account
    process: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "radmesh",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            cwd=root,
            timeout=120,
            user=uid,
            group=gid,
            extra_groups=None if uid is None else [],
        )
        # A port picked free can be taken before postgres binds it (the suite opens many
        # sockets at once): a start refused with "Address already in use" tries another.
        for _attempt in range(3):
            port = _free_port()
            process = _start(bindir, data, root, port, uid, gid)
            if _ready(process, bindir, root, port):
                break
            stop(process, 20)
        else:
            raise RuntimeError("PostgreSQL lost its port to another socket three times")
        yield f"postgresql://radmesh@127.0.0.1:{port}"
    finally:
        if process is not None:
            stop(process, 20)
        shutil.rmtree(root, ignore_errors=True)


def _start(
    bindir: Path, data: Path, root: Path, port: int, uid: int | None, gid: int | None
) -> subprocess.Popen[bytes]:
    with (root / "postgres.log").open("wb") as log:
        return subprocess.Popen(
            [
                str(bindir / "postgres"),
                "-D",
                str(data),
                "-p",
                str(port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={root}",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=root,
            preexec_fn=die_with_parent(),  # prctl only, after the uid change, before exec
            user=uid,
            group=gid,
            extra_groups=None if uid is None else [],
        )


def _ready(process: subprocess.Popen[bytes], bindir: Path, root: Path, port: int) -> bool:
    """True once the cluster accepts connections; False if it lost its port to another
    socket; raises for any other failure to start."""
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            said = (root / "postgres.log").read_text()[-2000:]
            if "Address already in use" in said:
                return False
            raise RuntimeError("PostgreSQL exited at start: " + said)
        # Listening is not ready: until recovery ends it answers "starting up".
        ready = subprocess.run(
            [str(bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)],
            check=False,
            timeout=10,
        )
        if ready.returncode == 0:
            return True
        if time.monotonic() > deadline:
            raise RuntimeError("PostgreSQL did not accept connections within 60 s")
        time.sleep(0.1)
