"""One command's operation on this home's node: the running one (through its control
socket), or a node brought up for the operation alone.

A node brought up for one command is on the network for the command's duration; its
services take in whatever its registries' mailboxes hold for it meanwhile, but it does
not resume fetches or run the critical-result timer (it would stop them seconds later).

The node's stack (WebRTC, DICOM, the operations) is imported only when no node runs: a
command the running node answers costs a process start, not an import of all of radmesh.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from node.app.control import Emit, ask
from node.core.config import NodeHome
from node.core.keystore import load_identity

if TYPE_CHECKING:
    from node.app.runtime import NodeRuntime


@contextlib.asynccontextmanager
async def short_lived(home: NodeHome) -> AsyncIterator[NodeRuntime]:
    """This node on the network for one command."""
    from node.app.runtime import NodeRuntime

    runtime = NodeRuntime(home, load_identity(home.key_path), resume=False)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


async def run(home: NodeHome, op: str, args: dict[str, Any], emit: Emit) -> Any:
    """Run operation ``op``: on the home's running node if there is one, else on a node
    brought up for it."""
    found, result = await ask(home, op, args, emit)
    if found:
        return result
    from node.app.operations import OPERATIONS

    async with short_lived(home) as runtime:
        return await OPERATIONS[op](runtime, args, emit)


__all__ = ["run", "short_lived"]
