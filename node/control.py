"""One node per home, and commands that reach it while it runs.

A node's identity must be on the network once: two processes with the same
key would take each other's registry sessions and both answer its peers. So a
running :class:`node.runtime.NodeRuntime` holds an exclusive lock on its home
(:class:`HomeLock`), and `radmesh node run` and the TUI listen on a control
socket (``NodeRuntime(..., control=True)``). A command such as
`radmesh consult accept` first asks that socket: if the home's node runs, the
operation runs there (progress lines come back as it goes); if not, the
command brings the node up for the one operation. The same operation table
(:data:`OPERATIONS`, filled by the command modules with :func:`operation`)
serves both ways, so the paths cannot drift. Commands that cannot share a
running node (`radmesh fetch --from`) get :class:`HomeBusy` with what to do.

The socket is in Linux's abstract namespace (no path-length limit, nothing
left behind by a crash), named after the home's real path; only processes of
the same user get an answer (SO_PEERCRED), the same rule as the home's 0700
directory. Frames are a 4-byte length and msgpack, capped before parsing.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import importlib
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

import msgpack

from node.config import NodeHome
from node.errors import NodeError

if TYPE_CHECKING:
    from node.runtime import NodeRuntime

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024
MAX_REPLY = 1024 * 1024
REQUEST_TIMEOUT = 10.0  # a client that does not finish its request in time is dropped
Emit = Callable[[str], None]
Operation = Callable[["NodeRuntime", dict[str, Any], Emit], Awaitable[Any]]


class HomeBusy(NodeError):
    """Another process runs this home's node."""


class ControlError(NodeError):
    """The running node refused or failed a command (the message says why)."""


class HomeLock:
    """An exclusive lock on a node home, held while its node runs (freed when the process
    dies, however it dies)."""

    def __init__(self, home: NodeHome) -> None:
        self.path = home.data_dir / "node.lock"
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise HomeBusy(
                f"a radmesh node already runs on {self.path.parent.parent} (pid {holder}) and "
                "this cannot run beside it: stop that node, or give this one its own home "
                "with --home"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def socket_name(home: NodeHome) -> str:
    digest = hashlib.sha256(str(home.root.resolve()).encode()).hexdigest()[:24]
    return f"\0radmesh-control-{digest}"


def _frame(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return struct.pack(">I", len(data)) + data


async def _read_frame(reader: asyncio.StreamReader, limit: int) -> Any:
    (length,) = struct.unpack(">I", await reader.readexactly(4))
    if length > limit:
        raise ControlError(f"control message of {length} bytes exceeds the {limit}-byte limit")
    try:
        return msgpack.unpackb(await reader.readexactly(length), raw=False)
    except (ValueError, msgpack.ExtraData) as exc:
        raise ControlError(f"control message does not parse: {exc}") from exc


def _same_user(writer: asyncio.StreamWriter) -> bool:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return False
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return bool(uid == os.getuid())


@dataclass
class ControlServer:
    """Runs :data:`OPERATIONS` for local commands on a running node."""

    runtime: NodeRuntime
    server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        from node.cli import COMMAND_MODULES

        for name in COMMAND_MODULES:  # the command modules register the operations
            importlib.import_module(name)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:  # bound here: uvloop refuses abstract names given as a path
            listener.bind(socket_name(self.runtime.home))
        except OSError:
            listener.close()
            raise
        self.server = await asyncio.start_unix_server(self._serve, sock=listener)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not _same_user(writer):
                log.warning("control socket: refused a process of another user")
                return
            async with asyncio.timeout(REQUEST_TIMEOUT):
                request = await _read_frame(reader, MAX_REQUEST)
            reply = await self._run(request, lambda line: writer.write(_frame({"progress": line})))
            writer.write(_frame(reply))
            await writer.drain()
        except (ControlError, asyncio.IncompleteReadError, ConnectionError, TimeoutError) as exc:
            log.warning("control socket: request dropped: %r", exc)
        finally:
            writer.close()

    async def _run(self, request: Any, emit: Emit) -> dict[str, Any]:
        if not (
            isinstance(request, dict)
            and isinstance(request.get("args"), dict)
            and request.get("op") in OPERATIONS
        ):
            return {"error": "unknown control request: update radmesh on both sides"}
        from node.cli import user_errors  # the errors a command reports, not a crash

        try:
            return {"result": await OPERATIONS[request["op"]](self.runtime, request["args"], emit)}
        except user_errors() as exc:
            return {"error": str(exc)}
        except Exception as exc:  # the node keeps running; the command says what failed
            log.exception("control operation %s failed", request["op"])
            return {"error": f"the running node failed: {exc.__class__.__name__}: {exc}"}


async def _ask(home: NodeHome, op: str, args: dict[str, Any], emit: Emit) -> tuple[bool, Any]:
    """(True, result) from the home's running node, or (False, None) if none runs."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(socket_name(home))  # local and listening, or refused at once
    except (ConnectionRefusedError, FileNotFoundError):
        sock.close()
        return False, None
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    try:
        writer.write(_frame({"op": op, "args": args}))
        await writer.drain()
        while True:
            try:
                reply = await _read_frame(reader, MAX_REPLY)
            except asyncio.IncompleteReadError:
                raise ControlError(
                    "the running node closed the control connection without an answer: see its log"
                ) from None
            if not isinstance(reply, dict):
                raise ControlError("the running node sent a malformed answer")
            if "progress" in reply:
                emit(str(reply["progress"]))
            elif "error" in reply:
                raise ControlError(str(reply["error"]))
            else:
                return True, reply.get("result")
    finally:
        writer.close()


async def ask_running(
    home: NodeHome, op: str, args: dict[str, Any], emit: Emit
) -> tuple[bool, Any]:
    """Run ``op`` only on the home's running node: (True, result), or (False, None) when
    none runs (for settings that take effect at the next start anyway)."""
    return await _ask(home, op, args, emit)


@contextlib.asynccontextmanager
async def _short_lived(home: NodeHome) -> AsyncIterator[NodeRuntime]:
    """This node on the network for one command; the workflow's handlers take in whatever
    its registries' mailboxes hold for it meanwhile."""
    from node import workflow
    from node.keystore import load_identity
    from node.runtime import NodeRuntime

    runtime = NodeRuntime(home, load_identity(home.key_path))
    await runtime.start()
    workflow.install(runtime, resume=False)
    try:
        yield runtime
    finally:
        await runtime.stop()


async def run(home: NodeHome, op: str, args: dict[str, Any], emit: Emit) -> Any:
    """Run operation ``op``: on the home's running node if there is one, else on a node
    brought up for it."""
    found, result = await _ask(home, op, args, emit)
    if found:
        return result
    async with _short_lived(home) as runtime:
        return await OPERATIONS[op](runtime, args, emit)


def operation(name: str) -> Callable[[Operation], Operation]:
    def register(fn: Operation) -> Operation:
        OPERATIONS[name] = fn
        return fn

    return register


OPERATIONS: dict[str, Operation] = {}

__all__ = [
    "OPERATIONS",
    "ControlError",
    "ControlServer",
    "HomeBusy",
    "HomeLock",
    "ask_running",
    "operation",
    "run",
    "socket_name",
]
