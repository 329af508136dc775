"""`radmesh` as its own process for the transfer fault tests (run with ``python -m``).

The real CLI (``node.cli.main``, uvloop as the console script installs it), with two
test-only changes: ICE host candidates on 127.0.0.1 only; a line ``bulk N`` on stdout
before each bulk chunk this process hands to its connection, so a test can count what
a sender sent even when it kills it with SIGKILL; the peer transport's INFO log
(connections lost and back, chunks rejected) on stderr, for the test's failure message;
``RADMESH_TEST_REOFFER_AFTER`` (seconds) in the environment replaces the sender's
``peer_transport.transfer.serving.REOFFER_AFTER``, so a test can take that fallback away;
and ``RADMESH_TEST_WINDOW`` (chunks) is the window a ``fetch`` receives with, so a small
study spans several windows.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

from node.cli import main
from peer_transport.connection import install_event_loop_policy
from peer_transport.mux import ChannelLink
from peer_transport.rtc import restrict_host_addresses
from peer_transport.transfer import runner as transfer_runner
from peer_transport.transfer import serving as transfer_serving


def count_bulk_chunks() -> None:
    send_bulk = ChannelLink.send_bulk
    sent = 0

    async def counting(self: ChannelLink, data: bytes) -> None:
        nonlocal sent
        sent += 1  # counted before it leaves: an upper bound, even for a killed process
        print(f"bulk {sent}", flush=True)
        await send_bulk(self, data)

    ChannelLink.send_bulk = counting  # type: ignore[method-assign]


if __name__ == "__main__":
    restrict_host_addresses(["127.0.0.1"])
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("peer_transport").setLevel(logging.INFO)
    count_bulk_chunks()
    if reoffer_after := os.environ.get("RADMESH_TEST_REOFFER_AFTER"):
        transfer_serving.REOFFER_AFTER = float(reoffer_after)
    if window := os.environ.get("RADMESH_TEST_WINDOW"):
        # node.cli.transfer imports receive_study when it fetches: it finds this one.
        transfer_runner.receive_study = functools.partial(
            transfer_runner.receive_study, window=int(window)
        )
    install_event_loop_policy()
    sys.exit(main(sys.argv[1:]))
