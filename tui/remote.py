"""The TUI on the home's node, which runs in another process (issues 19 item 9, 18 item 2).

One node per home holds the key and the network; `radmesh tui` is a client of its
control socket (:mod:`node.app.control`: same user only, checked both ways), whether the
node was started by the user (`radmesh node run`) or by the TUI itself as its child
(:mod:`node.cli.tui`). Every call of the :class:`~tui.facade.NodeFacade` protocol is one
``tui.call`` operation that the node runs on its own :class:`~tui.node_facade.RuntimeNode`;
values travel as msgpack, the facade's dataclasses and frames' pixel arrays encoded here.
A live session is one long-lived ``tui.session`` connection (:mod:`tui.remote_session`).
The transport runs in the node's process: the UI and the network share no GIL.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from node.app.control import ControlError, ask, open_stream
from node.core.config import NodeHome
from tui import facade as f
from tui import remote_session
from tui.imaging import Window
from tui.remote_session import RemoteSession
from tui.session import SessionView

if TYPE_CHECKING:
    from node.app.operations import Operation
    from node.app.runtime import NodeRuntime
    from tui.node_facade import RuntimeNode

# A frame is one answer: a 4k x 4k 16-bit radiograph is 32 MiB. The node is this user's
# own (checked on the socket), so the cap guards against a runaway, not an attacker.
MAX_ANSWER = 256 * 1024 * 1024
CALL_TIMEOUT = 60.0  # seconds for one call; a fetch or a request answers well within it
OPERATION = "tui.call"
MAX_NOTES = 20  # errors of this side kept among the notifications
WATCH_SECONDS = 1.0  # how often a TUI looks whether the node process it started still runs
# What a TUI may ask the running node: the NodeFacade protocol, nothing else.
CALLS = frozenset(
    {
        "status", "studies", "series", "instances", "load_frame", "request_first",
        "consults", "peers", "transfers", "notifications", "safety_number", "mark_verified",
        "record_view", "respond", "fetch", "pause_transfer", "cancel_transfer", "withdraw",
        "request_consult", "cycle_availability", "propose_guest", "guest_proposals",
        "answer_guest", "critical_alerts", "acknowledge", "report", "add_addendum",
    }
)  # fmt: skip
_TYPES: dict[str, type[Any]] = {
    cls.__name__: cls
    for cls in (
        f.NodeStatus, f.StudyInfo, f.SeriesInfo, f.InstanceRef, f.Frame, f.ConsultItem,
        f.CriticalAlert, f.PeerInfo, f.TransferInfo, f.ConsultForm, f.GuestProposal,
        f.ReportSection, Window,
    )
}  # fmt: skip


class NodeGone(f.ActionError):
    """The home's node stopped under the TUI; the text says what to do."""


# What the screens read when the node has gone: nothing, and a status that says so.
WHEN_GONE: dict[str, Callable[[NodeGone], Any]] = {
    "status": lambda exc: f.NodeStatus("", "the node stopped", "", (("node", str(exc), False),)),
    **{
        read: lambda exc: []
        for read in (
            "studies", "series", "instances", "consults", "peers", "transfers",
            "notifications", "guest_proposals", "critical_alerts",
        )
    },
    "load_frame": lambda exc: None,
    "report": lambda exc: None,
}  # fmt: skip


def encode(value: Any) -> Any:
    """A facade value as msgpack-able data: dataclasses by name, arrays with dtype/shape."""
    if isinstance(value, np.ndarray):
        return {"__nd__": [value.dtype.str, list(value.shape), value.tobytes()]}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {
            field.name: encode(getattr(value, field.name)) for field in dataclasses.fields(value)
        }
        return {"__dc__": type(value).__name__, **fields}
    if isinstance(value, list | tuple):
        return [encode(v) for v in value]
    return value


def decode(value: Any) -> Any:
    """The inverse of :func:`encode`; only the facade's own types are built."""
    if isinstance(value, list):
        return [decode(v) for v in value]
    if isinstance(value, dict) and "__nd__" in value:
        dtype, shape, data = value["__nd__"]
        return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape)
    if isinstance(value, dict) and "__dc__" in value:
        cls = _TYPES[value["__dc__"]]
        kwargs = {}
        for field in dataclasses.fields(cls):
            if field.name in value:
                item = decode(value[field.name])
                kwargs[field.name] = tuple(item) if isinstance(item, list) else item
        return cls(**kwargs)
    return value


def operations() -> dict[str, Operation]:
    """The TUI's operations for one node's control table (``tui.call``, ``tui.session``),
    on one RuntimeNode, so its notifications and pseudonym labels stay the same across
    calls and sessions."""
    facades: dict[int, RuntimeNode] = {}

    def facade(rt: NodeRuntime) -> RuntimeNode:
        from tui.node_facade import RuntimeNode

        if id(rt) not in facades:
            facades.clear()  # one runtime per control table; a new one (tests) starts afresh
            facades[id(rt)] = RuntimeNode(rt)
        return facades[id(rt)]

    return {OPERATION: operation(facade), remote_session.OPERATION: remote_session.stream(facade)}


def operation(
    facade: Callable[[Any], Any] | None = None,
) -> Callable[[Any, dict[str, Any], Any], Awaitable[Any]]:
    """The ``tui.call`` operation, on ``facade(runtime)`` (by default one RuntimeNode for
    all its calls)."""
    made: list[Any] = []

    def own(rt: Any) -> Any:
        from tui.node_facade import RuntimeNode

        if not made:
            made.append(RuntimeNode(rt))
        return made[0]

    get = facade or own

    async def call(rt: Any, args: dict[str, Any], emit: Any) -> Any:
        method = args.get("method")
        if method not in CALLS:
            return {"refused": f"{method!r} is not something the TUI asks a node"}
        node = get(rt)
        try:
            result = getattr(node, method)(*decode(list(args.get("args", []))))
            if asyncio.iscoroutine(result):
                result = await result
        except f.ActionError as exc:
            return {"action_error": str(exc)}
        return {"value": encode(result)}

    return call


class RemoteNode:
    """:class:`~tui.facade.NodeFacade` over the home's running node. Calls block for one
    round trip on the local socket (a millisecond or two); the node does the work."""

    def __init__(self, home: NodeHome, *, stopped: Callable[[], str | None] | None = None) -> None:
        """``stopped``: why the node is gone (its process exited), or None while it runs;
        asked when a call fails, so the error says what happened."""
        self.home = home
        self._stopped = stopped or (lambda: None)
        self._said_gone = False
        self._own_child = stopped is not None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="radmesh-remote-node", daemon=True
        )
        self._thread.start()
        self._notes: list[str] = []
        self._show: Callable[[str], None] | None = None
        self._sessions: list[RemoteSession] = []

    def close(self) -> None:
        async def sessions_closed() -> None:
            await asyncio.gather(*(s.aclose() for s in self._sessions))
            others = asyncio.all_tasks() - {asyncio.current_task()}
            for task in others:  # the watch, a call the UI gave up on
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        with contextlib.suppress(concurrent.futures.TimeoutError):
            asyncio.run_coroutine_threadsafe(sessions_closed(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    def show_errors(self, show: Callable[[str], None]) -> None:
        """Errors nobody awaits (a live session that closed, a refused edit): ``show``
        runs on the calling (UI) loop."""
        ui = asyncio.get_running_loop()

        def on_ui(text: str) -> None:
            with contextlib.suppress(RuntimeError):  # the UI has gone
                ui.call_soon_threadsafe(show, text)

        self._show = on_ui
        if self._own_child:
            asyncio.run_coroutine_threadsafe(self._watch(), self._loop)

    async def _watch(self) -> None:
        """Say once, unasked, that the node's process ended (the TUI started it)."""
        while True:  # polled: the process is this one's child, not the loop's
            if self._stopped():
                self._error(str(self.gone()))
                return
            await asyncio.sleep(WATCH_SECONDS)

    def _error(self, text: str) -> None:
        """Shown now if the app listens, and kept among the notifications either way."""
        self._notes.append(text)
        del self._notes[:-MAX_NOTES]
        if self._show is not None:
            self._show(text)

    def gone(self) -> NodeGone:
        why = self._stopped()
        return NodeGone(
            f"the node of this home stopped ({why}): quit (ctrl+q) and run `radmesh tui` again"
            if why
            else "the node of this home stopped: start it again, then the TUI"
        )

    async def _ask(self, method: str, args: tuple[Any, ...]) -> Any:
        request = {"method": method, "args": encode(list(args))}
        try:
            running, reply = await ask(
                self.home, OPERATION, request, lambda _: None, limit=MAX_ANSWER
            )
        except (ControlError, OSError, asyncio.IncompleteReadError) as exc:
            if self._stopped():
                raise self.gone() from exc
            if isinstance(exc, ControlError):
                raise f.ActionError(str(exc)) from exc
            raise f.ActionError(
                f"the node's control socket failed ({exc}): if the node stopped, start it "
                "again, then the TUI"
            ) from exc
        if not running:
            raise self.gone()
        if "action_error" in reply:
            raise f.ActionError(reply["action_error"])
        if "refused" in reply:
            raise f.ActionError(reply["refused"])
        return decode(reply["value"])

    def _call(self, method: str, *args: Any) -> Any:
        """One call; a read on a node that has gone is empty (the screens stay up, the
        error is shown once), an action raises what happened."""
        future = asyncio.run_coroutine_threadsafe(self._ask(method, args), self._loop)
        try:
            return future.result(CALL_TIMEOUT)
        except NodeGone as exc:
            if method not in WHEN_GONE:
                raise
            if not self._own_child and not self._said_gone:  # else the watch says it
                self._said_gone = True
                self._error(str(exc))
            return WHEN_GONE[method](exc)

    async def _acall(self, method: str, *args: Any) -> Any:
        future = asyncio.run_coroutine_threadsafe(self._ask(method, args), self._loop)
        return await asyncio.wait_for(asyncio.wrap_future(future), CALL_TIMEOUT)

    # -- the NodeFacade protocol ---------------------------------------------------------
    def status(self) -> f.NodeStatus:
        status: f.NodeStatus = self._call("status")
        note = ("running node", "attached through its control socket", True)
        return dataclasses.replace(status, lines=(*status.lines, note))

    def studies(self) -> list[f.StudyInfo]:
        return list(self._call("studies"))

    def series(self, study_uid: str) -> list[f.SeriesInfo]:
        return list(self._call("series", study_uid))

    def instances(self, series_uid: str) -> list[f.InstanceRef]:
        return list(self._call("instances", series_uid))

    def load_frame(self, sop_uid: str, frame: int = 0) -> f.Frame | None:
        loaded: f.Frame | None = self._call("load_frame", sop_uid, frame)
        return loaded

    def request_first(self, sop_uid: str) -> None:
        self._call("request_first", sop_uid)

    def consults(self) -> list[f.ConsultItem]:
        return list(self._call("consults"))

    def peers(self) -> list[f.PeerInfo]:
        return list(self._call("peers"))

    def transfers(self) -> list[f.TransferInfo]:
        return list(self._call("transfers"))

    def notifications(self) -> list[str]:
        return [*self._notes, *self._call("notifications")]

    def safety_number(self, peer_node_id: str) -> str:
        return str(self._call("safety_number", peer_node_id))

    def mark_verified(self, peer_node_id: str) -> None:
        self._call("mark_verified", peer_node_id)

    def open_session(self, study_uid: str) -> SessionView | None:
        async def opening() -> tuple[Any, Any] | None:
            return await open_stream(
                self.home,
                remote_session.OPERATION,
                {"study_uid": study_uid},
                limit=remote_session.MAX_SNAPSHOT,
            )

        try:
            future = asyncio.run_coroutine_threadsafe(opening(), self._loop)
            opened = future.result(CALL_TIMEOUT)
            if opened is None:
                raise self.gone()
            session = RemoteSession(opened[0], opened[1], self._loop, self._error)
            self._sessions = [s for s in self._sessions if not s.closed]
            self._sessions.append(session)  # closed with the node, whatever happens next
            session.wait_open()
        except (ControlError, OSError, f.ActionError, concurrent.futures.TimeoutError) as exc:
            # the viewer opens without the live panel, and says why
            self._error(f"The live session did not open: {exc or 'the node did not answer'}")
            return None
        return session

    def record_view(self, study_uid: str, live: bool) -> None:
        self._call("record_view", study_uid, live)

    async def respond(self, consult_id: str, accept: bool, reason: str = "") -> str:
        return str(await self._acall("respond", consult_id, accept, reason))

    def fetch(self, consult_id: str) -> str:
        return str(self._call("fetch", consult_id))

    def pause_transfer(self, consult_id: str) -> str:
        return str(self._call("pause_transfer", consult_id))

    def cancel_transfer(self, consult_id: str) -> str:
        return str(self._call("cancel_transfer", consult_id))

    async def withdraw(self, consult_id: str) -> str:
        return str(await self._acall("withdraw", consult_id))

    async def request_consult(self, form: f.ConsultForm) -> str:
        return str(await self._acall("request_consult", form))

    async def cycle_availability(self) -> str:
        return str(await self._acall("cycle_availability"))

    async def propose_guest(self, consult_id: str, peer_node_id: str) -> str:
        return str(await self._acall("propose_guest", consult_id, peer_node_id))

    def guest_proposals(self) -> list[f.GuestProposal]:
        return list(self._call("guest_proposals"))

    async def answer_guest(self, consult_id: str, guest_node_id: str, approve: bool) -> str:
        return str(await self._acall("answer_guest", consult_id, guest_node_id, approve))

    def critical_alerts(self) -> list[f.CriticalAlert]:
        return list(self._call("critical_alerts"))

    async def acknowledge(self, consult_id: str, by: str) -> str:
        return str(await self._acall("acknowledge", consult_id, by))

    def report(self, consult_id: str) -> list[f.ReportSection] | None:
        sections = self._call("report", consult_id)
        return None if sections is None else list(sections)

    async def add_addendum(self, consult_id: str, text: str) -> str:
        return str(await self._acall("add_addendum", consult_id, text))
