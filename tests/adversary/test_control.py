"""Attacks on the control socket by another local user: squatting its name or path so
that commands (study UIDs, clinical questions) go to them, or so the node cannot start."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from node.app import commands, control
from node.app.control import ControlError, Emit
from node.app.operations import OPERATIONS
from node.app.runtime import NodeRuntime
from node.core.config import NodeHome
from tests.node.test_runtime import FAST, make_home

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to run the squatter as another user (uid 65534)"
)

NOBODY = 65534
WAIT = 20.0

# The squatter, as user nobody: listen on ADDRESS (a path, or "@name" for an abstract
# name), accept whatever connects, and when its stdin closes print "<connections> <bytes>".
_SQUATTER = """
import os, select, socket, sys
os.setgid(65534); os.setuid(65534)
listener = socket.socket(socket.AF_UNIX)
address = sys.argv[1]  # "@name": the abstract name NUL + name
listener.bind(chr(0) + address[1:] if address.startswith("@") else address)
listener.listen(8)
print("ready", flush=True)
connections = received = 0
while True:
    readable, _, _ = select.select([listener, sys.stdin], [], [], 30)
    if listener not in readable:  # stdin closed (or nothing for 30 s): report
        break
    peer, _ = listener.accept()
    connections += 1
    peer.settimeout(2)
    try:
        while chunk := peer.recv(65536):
            received += len(chunk)
    except OSError:
        pass
    peer.close()
print(connections, received, flush=True)
"""


async def _where(rt: NodeRuntime, args: dict[str, Any], emit: Emit) -> int:
    emit("clinical question: suspected subdural haematoma")
    return id(rt)


@pytest.fixture(autouse=True)
def _where_operation(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test's operation in the node's table, for this test only."""
    monkeypatch.setitem(OPERATIONS, "adversary.where", _where)


@contextlib.contextmanager
def _shared_dir() -> Iterator[Path]:
    """A directory user nobody can traverse (pytest's tmp_path is root's 0700)."""
    base = Path(tempfile.mkdtemp(prefix="rm-ctl-", dir="/tmp"))
    os.chmod(base, 0o755)  # noqa: S103 - the squatter must reach into it
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextlib.asynccontextmanager
async def _squatter(address: str) -> AsyncIterator[list[int]]:
    """Run the squatter on ``address``; the yielded list gets [connections, bytes]."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _SQUATTER,
        address,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    async with asyncio.timeout(WAIT):
        assert (await proc.stdout.readline()).strip() == b"ready"
    seen: list[int] = []
    try:
        yield seen
    finally:
        proc.stdin.close()
        async with asyncio.timeout(WAIT):
            out = await proc.stdout.read()
            await proc.wait()
        seen.extend(int(n) for n in out.split())


def _old_abstract_name(home: NodeHome) -> str:
    """The predictable name the control socket had: anyone could compute and bind it."""
    digest = hashlib.sha256(str(home.root.resolve()).encode()).hexdigest()[:24]
    return f"@radmesh-control-{digest}"


async def test_a_squatter_on_the_predictable_name_gets_no_command_and_the_node_starts(
    tmp_path: Path,
) -> None:
    home, identity = make_home(tmp_path, "hospital", "", [])
    lines: list[str] = []
    async with _squatter(_old_abstract_name(home)) as seen:
        # no node runs: the command brings one up for itself instead of telling the squatter
        result = await commands.run(home, "adversary.where", {}, lines.append)
        assert isinstance(result, int)
        node = NodeRuntime(home, identity, transport_options=FAST, control=True)
        await node.start()  # `node run`: no EADDRINUSE from the squatter
        try:
            assert await commands.run(home, "adversary.where", {}, lines.append) == id(node)
        finally:
            await node.stop()
    assert seen == [0, 0]  # not even a connection reached the squatter
    assert lines == ["clinical question: suspected subdural haematoma"] * 2


async def test_a_socket_of_another_user_in_the_home_gets_nothing_and_blocks_start_clearly(
    tmp_path: Path,
) -> None:
    with _shared_dir() as base:
        home, identity = make_home(base, "hospital", "", [])
        home.data_dir.mkdir(mode=0o700)
        # a home left loose (the modes doctor --fix repairs): nobody can write in data/
        for directory in (home.root, home.data_dir):
            os.chmod(directory, 0o777)  # noqa: S103 - the attack needs it
        path = control.socket_path(home)
        async with _squatter(str(path)) as seen:
            with pytest.raises(ControlError, match=f"another user \\(uid {NOBODY}\\).*nothing"):
                await commands.run(home, "adversary.where", {}, print)
            node = NodeRuntime(home, identity, transport_options=FAST, control=True)
            with pytest.raises(ControlError, match=f"owned by uid {NOBODY}.*doctor --fix"):
                await node.start()
        assert seen == [1, 0]  # the client connected, checked the uid and sent nothing
        path.unlink()
        # with the squatter's socket gone the same node starts and answers (the canary)
        node = NodeRuntime(home, identity, transport_options=FAST, control=True)
        await node.start()
        try:
            assert await commands.run(home, "adversary.where", {}, print) == id(node)
            assert os.stat(home.data_dir).st_mode & 0o777 == 0o700  # tightened at start
        finally:
            await node.stop()


async def test_the_tui_operation_runs_only_facade_methods() -> None:
    """A same-user client asking the node for anything but the facade's methods (a
    private helper, the runtime itself) is refused by name."""
    from tui.remote import operation

    call = operation()

    class Runtime:  # never reached: the name is refused before a facade is made
        pass

    for name in ("_finalise", "runtime", "__class__", "open_session", "pull"):
        reply = await call(Runtime(), {"method": name, "args": []}, print)
        assert "refused" in reply, name
