"""One node per home, and commands that reach it while it runs.

A node's identity must be on the network once: two processes with the same
key would take each other's registry sessions and both answer its peers. So a
running :class:`node.app.runtime.NodeRuntime` holds an exclusive lock on its home
(:class:`HomeLock`), and `radmesh node run` and the TUI listen on a control
socket (``NodeRuntime(..., control=True)``). A command such as
`radmesh consult accept` first asks that socket: if the home's node runs, the
operation runs there (progress lines come back as it goes); if not, the
command brings the node up for the one operation (:func:`node.app.commands.run`).
The same operation table (:data:`node.app.operations.OPERATIONS`) serves both
ways, so the paths cannot drift. Commands that cannot share a running node
(`radmesh fetch --from`) get :class:`HomeBusy` with what to do.

The socket is a file in the home's 0700 data directory (``control.sock``,
mode 0600), so only the home's user can reach it or put one there. (It was a
Linux abstract socket named after the home's path: any local user could bind
that name first, receive the study UIDs and clinical questions commands sent,
and make `node run` fail with EADDRINUSE.) Both ends still check the other's
uid (SO_PEERCRED): the node answers only its own user, and a command talks only
to a node of its own user, sending nothing otherwise. The node refuses to start
when the socket's directory or an existing socket file is another user's, and
says what to do. Frames are a 4-byte length and msgpack, capped before parsing: a
:class:`ControlRequest` one way; :class:`Progress` lines, then an :class:`Answer` or a
:class:`Failure`, the other.

A :class:`Stream` operation keeps its connection after the :class:`Answer` (the TUI's
live session, :mod:`tui.remote_session`): both ends then send frames of that
operation's own protocol on it (:class:`Channel`, each frame capped before it is read),
until either closes it. The node closes every stream when it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import msgpack

from node.app.errors import USER_ERRORS
from node.core.config import NodeHome
from node.core.errors import NodeError
from node.core.private import private_dir

if TYPE_CHECKING:
    from node.app.operations import Operation
    from node.app.runtime import NodeRuntime

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024
MAX_REPLY = 1024 * 1024
REQUEST_TIMEOUT = 10.0  # a client that does not finish its request in time is dropped
Emit = Callable[[str], None]


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
        private_dir(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        handle = open(fd, "r+")  # noqa: SIM115 - held until release()
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


SOCKET_NAME = "control.sock"
_SUN_PATH_MAX = 100  # sockaddr_un holds 108 bytes; longer paths go through /proc/self/fd


def socket_path(home: NodeHome) -> Path:
    return home.data_dir / SOCKET_NAME


@contextlib.contextmanager
def _reachable(path: Path) -> Iterator[str]:
    """``path`` as bind()/connect() take it, however deep the home is."""
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _own_socket_dir(path: Path) -> None:
    """The socket's directory, 0700 and this user's: refuse one another user owns (they
    could put their own socket in place of the node's)."""
    with contextlib.suppress(FileNotFoundError):
        owner = path.parent.stat().st_uid
        if owner != os.getuid():
            raise ControlError(
                f"{path.parent} belongs to uid {owner}, not to this user, so another user "
                "could answer this node's commands: run the node as the home's owner, or "
                "give it a home of its own with --home"
            )
    private_dir(path.parent)


def _bind(path: Path) -> socket.socket:
    _own_socket_dir(path)
    with contextlib.suppress(FileNotFoundError):
        st = path.lstat()
        if st.st_uid != os.getuid() or not stat.S_ISSOCK(st.st_mode):
            raise ControlError(
                f"{path} is not this node's control socket (owned by uid {st.st_uid}): "
                "another program or user put it there. Remove it (`rm` it as root if "
                "needed), run `radmesh doctor --fix`, then start the node again"
            )
        path.unlink()  # left by a node that died: we hold the home lock, none serves it
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _reachable(path) as where:
            listener.bind(where)
        os.chmod(path, 0o600)
        listener.listen(16)  # a command sent while the node starts waits for it
    except OSError as exc:
        listener.close()
        raise ControlError(
            f"cannot create the control socket {path}: {exc}; check that the home is "
            "this user's (`radmesh doctor`)"
        ) from exc
    return listener


def _frame(value: dict[str, Any]) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return struct.pack(">I", len(data)) + data


def _unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False)
    except (ValueError, msgpack.ExtraData) as exc:
        raise ControlError(f"control message does not parse: {exc}") from exc


@dataclass(frozen=True)
class ControlRequest:
    """A command asks the running node to run operation ``op`` with ``args``."""

    op: str
    args: dict[str, Any]

    def to_wire(self) -> bytes:
        return _frame({"op": self.op, "args": self.args})

    @classmethod
    def from_wire(cls, data: bytes) -> ControlRequest | None:
        """The request in one frame's payload; None if it has the wrong shape (answered
        as an unknown request: the command is of another version)."""
        raw = _unpack(data)
        if not (isinstance(raw, dict) and isinstance(raw.get("args"), dict)):
            return None
        op = raw.get("op")
        return cls(op, raw["args"]) if isinstance(op, str) else None


@dataclass(frozen=True)
class Progress:
    """A line of progress, before the answer."""

    line: str

    def to_wire(self) -> bytes:
        return _frame({"progress": self.line})


@dataclass(frozen=True)
class Answer:
    """The operation's result: the last frame."""

    result: Any

    def to_wire(self) -> bytes:
        return _frame({"result": self.result})


@dataclass(frozen=True)
class Failure:
    """The operation failed, in words for the person who ran the command: the last frame."""

    error: str

    def to_wire(self) -> bytes:
        return _frame({"error": self.error})


Reply = Progress | Answer | Failure
ControlMessage = ControlRequest | Reply


def decode_reply(data: bytes) -> Reply:
    """The node's frame (its payload) -> what it says; ControlError if it is malformed."""
    raw = _unpack(data)
    if not isinstance(raw, dict):
        raise ControlError("the running node sent a malformed answer")
    if "progress" in raw:
        return Progress(str(raw["progress"]))
    if "error" in raw:
        return Failure(str(raw["error"]))
    return Answer(raw.get("result"))


async def _read_frame(reader: asyncio.StreamReader, limit: int) -> bytes:
    (length,) = struct.unpack(">I", await reader.readexactly(4))
    if length > limit:
        raise ControlError(f"control message of {length} bytes exceeds the {limit}-byte limit")
    return await reader.readexactly(length)


def _same_user(writer: asyncio.StreamWriter) -> bool:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return False
    return _peer_uid(sock) == os.getuid()


class Channel:
    """One control connection kept open by a :class:`Stream` operation: length-prefixed
    frames both ways, each capped before it is read. ``send`` waits while the other end
    does not read (the socket's buffer is the only queue)."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limit: int
    ) -> None:
        self._reader, self._writer, self.limit = reader, writer, limit
        self.answered = False

    async def recv(self) -> bytes | None:
        """The next frame's payload; None when the other end closed the connection.
        ControlError for a frame over ``limit`` (nothing of it is read)."""
        try:
            return await _read_frame(self._reader, self.limit)
        except asyncio.IncompleteReadError:
            return None

    async def send(self, payload: bytes) -> None:
        self.write(payload)
        await self._writer.drain()

    def write(self, payload: bytes) -> None:
        """Queue one frame without waiting (for small frames sent in order from callbacks)."""
        self._writer.write(struct.pack(">I", len(payload)) + payload)

    def buffered(self) -> int:
        """Bytes written but not yet taken by the socket."""
        return self._writer.transport.get_write_buffer_size()

    async def answer(self, result: Any) -> None:
        """The node's side: the stream is open (the client's :func:`open_stream` returns)."""
        self.answered = True
        self._writer.write(Answer(result).to_wire())
        await self._writer.drain()

    def close(self) -> None:
        self._writer.close()

    @property
    def closed(self) -> bool:
        return self._writer.is_closing()


# How a stream ends that is no crash of the node: refused, or the client went away.
_STREAM_ENDS: tuple[type[Exception], ...] = (*USER_ERRORS, ConnectionError)


@dataclass(frozen=True)
class Stream:
    """An operation that keeps its connection: ``serve(runtime, args, channel)`` answers
    with :meth:`Channel.answer`, then talks on the channel until either end closes it.
    Called as a plain operation (a node brought up for one command), it refuses."""

    serve: Callable[[NodeRuntime, dict[str, Any], Channel], Awaitable[None]]
    limit: int = MAX_REQUEST  # the largest frame the client may send on it

    async def __call__(self, rt: NodeRuntime, args: dict[str, Any], emit: Emit) -> Any:
        raise ControlError("this operation needs a running node: start `radmesh node run`")


@dataclass
class ControlServer:
    """Runs ``operations`` (:data:`node.app.operations.OPERATIONS`) for local commands on a
    running node."""

    runtime: NodeRuntime
    operations: Mapping[str, Operation]
    server: asyncio.AbstractServer | None = None
    listener: socket.socket | None = None
    streams: set[Channel] = field(default_factory=set)

    def bind(self) -> None:
        """Take the socket before the node starts anything (a squatted socket stops the
        start cleanly); commands that connect meanwhile wait until :meth:`start`."""
        if self.listener is None and self.server is None:
            self.listener = _bind(socket_path(self.runtime.home))

    async def start(self) -> None:
        self.bind()
        self.server = await asyncio.start_unix_server(self._serve, sock=self.listener)
        self.listener = None

    async def close(self) -> None:
        bound = self.server is not None or self.listener is not None
        for channel in list(self.streams):  # an attached TUI's sessions end with the node
            channel.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if bound:
            socket_path(self.runtime.home).unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not _same_user(writer):
                log.warning("control socket: refused a process of another user")
                return
            async with asyncio.timeout(REQUEST_TIMEOUT):
                request = ControlRequest.from_wire(await _read_frame(reader, MAX_REQUEST))
            operation = self.operations.get(request.op) if request is not None else None
            if request is not None and isinstance(operation, Stream):
                await self._stream(operation, request, reader, writer)
                return
            reply = await self._run(request, lambda line: writer.write(Progress(line).to_wire()))
            writer.write(reply.to_wire())
            await writer.drain()
        except (ControlError, asyncio.IncompleteReadError, ConnectionError, TimeoutError) as exc:
            log.warning("control socket: request dropped: %r", exc)
        finally:
            writer.close()

    async def _stream(
        self,
        stream: Stream,
        request: ControlRequest,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        channel = Channel(reader, writer, stream.limit)
        self.streams.add(channel)
        try:
            await stream.serve(self.runtime, request.args, channel)
        except _STREAM_ENDS as exc:
            if not channel.answered:
                writer.write(Failure(str(exc)).to_wire())
            else:
                log.warning("control stream %s closed: %s", request.op, exc)
        except Exception as exc:
            log.exception("control stream %s failed", request.op)
            if not channel.answered:
                writer.write(Failure(f"the running node failed: {exc!r}").to_wire())
        finally:
            self.streams.discard(channel)

    async def _run(self, request: ControlRequest | None, emit: Emit) -> Answer | Failure:
        if request is None or request.op not in self.operations:
            return Failure("unknown control request: update radmesh on both sides")
        operation = self.operations[request.op]
        try:
            return Answer(await operation(self.runtime, request.args, emit))
        except USER_ERRORS as exc:  # the errors a command reports, not a crash
            return Failure(str(exc))
        except Exception as exc:  # the node keeps running; the command says what failed
            log.exception("control operation %s failed", request.op)
            return Failure(f"the running node failed: {exc.__class__.__name__}: {exc}")


async def ask(
    home: NodeHome, op: str, args: dict[str, Any], emit: Emit, *, limit: int = MAX_REPLY
) -> tuple[bool, Any]:
    """(True, result) from the home's running node, or (False, None) if none runs.
    ``limit``: the largest answer read (the TUI asks for whole frames)."""
    sock = await _connect(home)
    if sock is None:
        return False, None
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    try:
        writer.write(ControlRequest(op, args).to_wire())
        await writer.drain()
        while True:
            try:
                reply = decode_reply(await _read_frame(reader, limit))
            except asyncio.IncompleteReadError:
                raise ControlError(
                    "the running node closed the control connection without an answer: see its log"
                ) from None
            if isinstance(reply, Progress):
                emit(reply.line)
            elif isinstance(reply, Failure):
                raise ControlError(reply.error)
            else:
                return True, reply.result
    finally:
        writer.close()


async def _connect(home: NodeHome) -> socket.socket | None:
    path = socket_path(home)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _reachable(path) as where:
            sock.connect(where)  # local and listening, or refused at once
    except (ConnectionRefusedError, FileNotFoundError, NotADirectoryError):
        sock.close()
        return None  # no node runs (a socket file left by a crash refuses)
    except OSError:
        sock.close()
        raise
    uid = _peer_uid(sock)
    if uid != os.getuid():
        sock.close()
        raise ControlError(
            f"the control socket {path} is served by a process of another user (uid {uid}), "
            "not by this home's node: nothing was sent to it. Stop that process, then run "
            "`radmesh doctor --fix`"
        )
    return sock


async def open_stream(
    home: NodeHome, op: str, args: dict[str, Any], *, limit: int
) -> tuple[Any, Channel] | None:
    """Open the :class:`Stream` operation ``op`` on the home's running node: its answer and
    the channel (frames up to ``limit`` read from it), or None if no node runs."""
    sock = await _connect(home)
    if sock is None:
        return None
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    channel = Channel(reader, writer, limit)
    try:
        writer.write(ControlRequest(op, args).to_wire())
        await writer.drain()
        payload = await channel.recv()
        if payload is None:
            raise ControlError("the running node closed the control connection: see its log")
        reply = decode_reply(payload)
        if isinstance(reply, Failure):
            raise ControlError(reply.error)
        if not isinstance(reply, Answer):
            raise ControlError("the running node sent progress where a stream opens")
    except BaseException:
        channel.close()
        raise
    return reply.result, channel


async def ask_running(
    home: NodeHome, op: str, args: dict[str, Any], emit: Emit
) -> tuple[bool, Any]:
    """Run ``op`` only on the home's running node: (True, result), or (False, None) when
    none runs (for settings that take effect at the next start anyway)."""
    return await ask(home, op, args, emit)


__all__ = [
    "Answer",
    "Channel",
    "ControlError",
    "ControlMessage",
    "ControlRequest",
    "ControlServer",
    "Emit",
    "Failure",
    "HomeBusy",
    "HomeLock",
    "Progress",
    "Reply",
    "Stream",
    "ask",
    "ask_running",
    "decode_reply",
    "open_stream",
    "socket_path",
]
