"""One node per home; commands reach the running node over its control socket (node.app.control)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from consult.errors import LocalConsultError
from node.app import commands, control
from node.app.control import ControlError, Emit, HomeBusy
from node.app.operations import OPERATIONS
from node.app.runtime import NodeRuntime
from tests.node.test_runtime import FAST, make_home


@contextlib.asynccontextmanager
async def running_node(tmp_path: Path, registry: str) -> AsyncIterator[NodeRuntime]:
    """A node as `radmesh node run` has it: holding its home, answering the control socket."""
    home, identity = make_home(tmp_path, "hospital", registry, [])
    running = NodeRuntime(home, identity, transport_options=FAST, control=True)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


async def _where(rt: NodeRuntime, args: dict[str, Any], emit: Emit) -> int:
    for n in range(args["steps"]):
        emit(f"step {n}")
    if args.get("fail"):
        raise LocalConsultError("consult 1234 is not here: check the id")
    return id(rt)


@pytest.fixture(autouse=True)
def _where_operation(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test's operation in the node's table, for this test only."""
    monkeypatch.setitem(OPERATIONS, "test.where", _where)


async def test_a_second_node_on_the_same_home_is_refused_until_the_first_stops(
    tmp_path: Path, registry: str
) -> None:
    home, identity = make_home(tmp_path, "hospital", registry, [])
    first = NodeRuntime(home, identity, transport_options=FAST)
    await first.start()
    try:
        second = NodeRuntime(home, identity, transport_options=FAST)
        with pytest.raises(HomeBusy, match=f"pid {os.getpid()}.*--home"):
            await second.start()
    finally:
        await first.stop()
    await second.start()  # the lock went with the first node
    await second.stop()


async def test_an_operation_runs_on_the_running_node_with_its_progress(
    tmp_path: Path, registry: str
) -> None:
    async with running_node(tmp_path, registry) as running:
        home = running.home
        lines: list[str] = []
        assert await commands.run(home, "test.where", {"steps": 3}, lines.append) == id(running)
        assert lines == ["step 0", "step 1", "step 2"]
        with pytest.raises(ControlError, match="consult 1234 is not here: check the id"):
            await commands.run(home, "test.where", {"steps": 0, "fail": True}, lines.append)
        with pytest.raises(ControlError, match="unknown control request"):
            await commands.run(home, "no.such.op", {}, lines.append)
        # nothing of that stopped the node or its socket
        assert await commands.run(home, "test.where", {"steps": 0}, lines.append) == id(running)


async def test_without_a_running_node_the_command_brings_one_up_for_itself(
    tmp_path: Path, registry: str
) -> None:
    home, identity = make_home(tmp_path, "hospital", registry, [])
    where = await commands.run(home, "test.where", {"steps": 1}, lambda _line: None)
    assert isinstance(where, int)
    node = NodeRuntime(home, identity, transport_options=FAST)
    await node.start()  # the command's node stopped and let go of the home
    await node.stop()


def _raw_request(path: Path, payload: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock, control._reachable(path) as at:
        sock.settimeout(10)
        sock.connect(at)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)  # all it will ever send
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


async def test_oversized_and_malformed_requests_are_dropped_and_the_node_carries_on(
    tmp_path: Path, registry: str
) -> None:
    async with running_node(tmp_path, registry) as running:
        home = running.home
        name = control.socket_path(home)
        huge = struct.pack(">I", control.MAX_REQUEST + 1) + b"x" * 16
        assert await asyncio.to_thread(_raw_request, name, huge) == b""
        garbage = struct.pack(">I", 3) + b"\xc1\xc1\xc1"  # 0xc1 is never valid msgpack
        assert await asyncio.to_thread(_raw_request, name, garbage) == b""
        truncated = struct.pack(">I", 100) + b"\x80"
        assert await asyncio.to_thread(_raw_request, name, truncated) == b""
        assert await commands.run(home, "test.where", {"steps": 0}, print) == id(running)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")
async def test_a_process_of_another_user_gets_no_answer(tmp_path: Path, registry: str) -> None:
    client = (
        "import os, socket, struct, sys\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX); s.settimeout(10)\n"
        "try:\n    s.connect(sys.argv[1])\n"
        "except PermissionError:\n    print('no access'); sys.exit()\n"
        "body = bytes([0x82, 0xa2]) + b'op' + bytes([0xaa]) + b'test.where'"
        " + bytes([0xa4]) + b'args' + bytes([0x81, 0xa5]) + b'steps' + bytes([0])\n"
        "try:\n    s.sendall(struct.pack('>I', len(body)) + body)\n"
        "    print(len(s.recv(65536)))\n"
        "except (BrokenPipeError, ConnectionResetError):\n    print(0)\n"
    )
    base = Path(tempfile.mkdtemp(prefix="rm-ctl-", dir="/tmp"))  # short, and nobody may enter
    os.chmod(base, 0o755)  # noqa: S103
    try:
        async with running_node(base, registry) as running:
            home = running.home
            path = control.socket_path(home)
            os.chmod(home.root, 0o755)  # noqa: S103 - only data/ (0700) stands in the way

            async def other_user() -> str:
                done = await asyncio.to_thread(
                    subprocess.run,
                    [sys.executable, "-c", client, str(path)],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                assert done.returncode == 0, done.stderr
                return done.stdout.strip()

            assert await other_user() == "no access"  # the home's 0700 data directory
            os.chmod(home.data_dir, 0o755)  # noqa: S103 - loosened: the uid check remains
            os.chmod(path, 0o666)  # noqa: S103
            assert await other_user() == "0"  # closed without a byte
            # the same request from this user is answered (so the refusal above is the uid's)
            assert await commands.run(home, "test.where", {"steps": 0}, print) == id(running)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_every_operation_a_command_asks_for_is_in_the_table() -> None:
    """The CLI names operations by string; a name missing from the table would only show
    as "unknown control request" at run time."""
    import ast

    asked = set()
    for path in (Path(__file__).resolve().parents[2] / "node" / "cli").glob("*.py"):
        for call in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(call, ast.Call) and len(call.args) >= 2):
                continue
            name = ast.unparse(call.func)
            op = call.args[1]
            if name in ("commands.run", "control.ask_running", "_run") and isinstance(
                op, ast.Constant
            ):
                asked.add(op.value)
    assert len(asked) >= 12  # the scan found the commands' calls
    assert asked <= OPERATIONS.keys(), asked - OPERATIONS.keys()
