"""`radmesh` commands run from a test whose own event loop runs the nodes they talk to."""

from __future__ import annotations

import asyncio
import contextlib
import io
import sys
import threading
from pathlib import Path

from node.cli import main
from node.core.config import NodeHome

_ONE_AT_A_TIME = threading.Lock()  # the redirection of stdout and stderr is process-wide


async def radmesh(home: NodeHome | Path, *args: str, within: float = 60.0) -> tuple[int, str]:
    """`radmesh --home HOME ARGS` through the console script's ``main``, in a worker thread
    of this process: the test's loop keeps serving the registry and the nodes meanwhile, and
    the command reaches a running node through its control socket as from a terminal. Its
    exit code and what it printed (stdout and stderr in the order written). The command's
    own process is the README walk-through's to prove (tests/test_readme.py); here it
    would only add an interpreter start and the imports to every command."""
    root = home.root if isinstance(home, NodeHome) else home
    out = io.StringIO()

    def run() -> int:
        with _ONE_AT_A_TIME, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                return main(["--home", str(root), *args])
            except SystemExit as exit_:  # argparse's usage errors, as the process exits
                return exit_.code if isinstance(exit_.code, int) else 1
            finally:
                sys.stdout.flush()

    code = await asyncio.wait_for(asyncio.to_thread(run), within)
    return code, out.getvalue()
