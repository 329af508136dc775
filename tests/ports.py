"""Ports for the tests' own servers (a node's LAN endpoint, storescp, Orthanc, PostgreSQL).

A port picked with ``bind(0)`` comes from the kernel's ephemeral range, the same range
every outgoing connection takes its source port from: when a server is started later
(a node restarted after a kill, a server whose start takes a while), a connection of
another test may hold that port by then (`address already in use`). Ports here come
from below that range, so no outgoing connection ever takes one, and each xdist worker
has a slice of its own, walked in turn, so two workers never pick the same one.
"""

from __future__ import annotations

import itertools
import os
import random
import socket
from pathlib import Path

LOOPBACK = "127.0.0.1"
FIRST, LAST = 20000, 32000  # Linux's ephemeral range starts at 32768 by default
SLICES = 8  # xdist workers with a slice of their own (gw0..gw7; more share)


def _ephemeral_overlaps() -> bool:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return True  # not Linux, or unreadable: leave it to the kernel
    return low < LAST and high >= FIRST


def _ports() -> itertools.cycle[int]:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
    size = (LAST - FIRST) // SLICES
    start = FIRST + (int(worker) % SLICES if worker.isdigit() else 0) * size
    offset = random.randrange(size)  # runs right after each other start elsewhere
    return itertools.cycle([*range(start + offset, start + size), *range(start, start + offset)])


_NEXT = None if _ephemeral_overlaps() else _ports()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now and that no outgoing connection takes."""
    for port in itertools.islice(_NEXT or (), 500):
        with socket.socket() as probe:
            try:
                probe.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])
