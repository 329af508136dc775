"""Helper servers (Orthanc, coturn, dcmtk) that never outlive the process that started them.

A demo or test starts real servers. If that process dies without running its
clean-up (SIGKILL, or a terminal closed under it: SIGHUP's default action ends
Python without ``finally``), an orphan keeps listening and accepting data.
:func:`die_with_parent` is a ``preexec_fn`` that asks the kernel to SIGKILL the
child when its parent goes (``prctl(PR_SET_PDEATHSIG)``), whatever kills it;
start the child with ``start_new_session=True`` too, so a terminal's signals
reach only the parent, which then stops the child in order.

Linux sends the death signal when the *thread* that forked the child ends:
start these servers from the main thread (or one that lives as long as they do).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets ``sig`` when this process (thread) dies."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)  # loaded before fork
    parent = os.getpid()

    def in_child() -> None:
        if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
            os._exit(127)  # cannot promise to die with the parent: do not run at all
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(0)

    return in_child


def stop(process: subprocess.Popen[bytes], timeout: float) -> None:
    """Stop a helper server in order: SIGTERM, up to ``timeout`` seconds to exit, then
    SIGKILL (and as long again to be reaped)."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


__all__ = ["die_with_parent", "stop"]
