"""Keeping receive loops alive: a loop that crashes is logged and started again.

One bad message must never leave a node deaf while its status says "connected".
Each loop catches what a single message can throw and goes on; :func:`supervise`
is the second line, for the bug nobody foresaw: it restarts the whole loop
after a short, growing pause (so a loop that fails at once does not spin).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

RESTART_DELAY = 0.5  # seconds before the first restart of a crashed loop
MAX_RESTART_DELAY = 30.0  # the pause doubles up to this
HEALTHY_AFTER = 60.0  # a loop that ran this long starts again from RESTART_DELAY


class Supervisor:
    """Counts restarts per loop name (``restarts``) for status screens and tests."""

    def __init__(self) -> None:
        self.restarts: dict[str, int] = {}

    async def run(self, name: str, start: Callable[[], Awaitable[None]]) -> None:
        """Run ``start()`` until it returns; restart it whenever it raises."""
        delay = RESTART_DELAY
        while True:
            began = time.monotonic()
            try:
                await start()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                self.restarts[name] = self.restarts.get(name, 0) + 1
                if time.monotonic() - began > HEALTHY_AFTER:
                    delay = RESTART_DELAY
                log.exception(
                    "%s stopped on an unexpected error; restarting in %.1f s", name, delay
                )
            await asyncio.sleep(delay)
            delay = min(MAX_RESTART_DELAY, delay * 2)


async def supervise(name: str, start: Callable[[], Awaitable[None]]) -> None:
    """:meth:`Supervisor.run` for a loop nobody counts."""
    await Supervisor().run(name, start)
