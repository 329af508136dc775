"""An in-memory node for tests and demos: one synthetic CT study, peers, consults, and a
live session that is the real one (:class:`~consult.live.LiveConsult` behind the TUI's
:class:`~tui.node_facade.LiveSessionView`) with peers joined to it in memory."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import numpy.typing as npt

from consult.errors import RemoteConsultError
from consult.live import LiveConsult, LiveFragment, PresenceEnvelope, Reassembler
from consult.presence import Cursor, Viewport
from consult.report_draft import split_report
from consult.shared import Annotation
from crypto.identity import Identity, NodeId
from crypto.safety import safety_number
from tui.facade import (
    ActionError,
    ConsultForm,
    ConsultItem,
    CriticalAlert,
    Frame,
    GuestProposal,
    InstanceRef,
    NodeStatus,
    PeerInfo,
    ReportSection,
    SeriesInfo,
    StudyInfo,
    TransferInfo,
)
from tui.imaging import Window
from tui.node_facade import LiveSessionView
from tui.session import SessionView

STUDY_UID = "1.2.826.0.1.3680043.10.1.1"
SERIES_UID = "1.2.826.0.1.3680043.10.1.1.1"
SERIES2_UID = "1.2.826.0.1.3680043.10.1.1.2"


def phantom_slice(size: int, z: int) -> npt.NDArray[np.int16]:
    """Stored values (HU + 1024) of a simple body phantom: fat, soft tissue, lungs, spine."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    hu = np.full((size, size), -1000.0, dtype=np.float32)
    hu[(xx / 0.42) ** 2 + (yy / 0.30) ** 2 < 1] = -100.0
    hu[(xx / 0.38) ** 2 + (yy / 0.26) ** 2 < 1] = 40.0
    for side in (-1, 1):
        hu[((xx - side * 0.17) / 0.13) ** 2 + ((yy + 0.02) / (0.15 + 0.005 * z)) ** 2 < 1] = -850
    hu[(xx / 0.05) ** 2 + ((yy - 0.18) / 0.05) ** 2 < 1] = 700.0
    return (hu + 1024).astype(np.int16)


class InMemoryNode:
    def __init__(
        self, identity: Identity, *, slices: int = 12, size: int = 128, missing: int = 0
    ) -> None:
        self.identity = identity
        self.node_id = identity.node_id
        self._size = size
        self._slices = slices
        self._missing = set(range(slices - missing, slices))
        self.requested: list[str] = []
        self.actions: list[tuple[str, ...]] = []  # worklist/share calls, for tests
        self.views: list[str] = []  # studies opened in the viewer (the audit, in memory)
        self.live = MemorySession("consult-1", identity, "me")
        self.session = self.live.view
        # Guests the other party proposed (tests add some); answered ones drop out.
        self.proposals: list[GuestProposal] = []
        self.alerts: list[CriticalAlert] = []  # tests add critical results here
        self.acked: set[str] = set()
        self.reports: dict[str, list[ReportSection]] = {}  # tests add received reports
        self.states: dict[str, str] = {}  # tests move consults on (e.g. "reported")
        self._peers = [
            PeerInfo(
                "PEER-NEURO", "Dr Neuro", "St Elsewhere", ("neuro",), ("GB",), True, "verified"
            ),
            PeerInfo("PEER-MSK", "Dr Bones", "Ortho Clinic", ("msk",), ("FR",), False),
        ]
        self._peer_ids = {"PEER-NEURO": NodeId.from_public_key(b"\x01" * 32),
                          "PEER-MSK": NodeId.from_public_key(b"\x02" * 32)}  # fmt: skip

    def _sop(self, series: str, i: int) -> str:
        return f"{series}.{i + 1}"

    def status(self) -> NodeStatus:
        return NodeStatus(
            str(self.node_id),
            "Test node",
            "Test Hospital",
            (("registry", "1 of 1 connected", True), ("DICOM listener", "off", False)),
        )

    def studies(self) -> list[StudyInfo]:
        return [
            StudyInfo(
                STUDY_UID,
                "ANON-0001",
                "20260101",
                "CT CHEST",
                "CT",
                2,
                2 * self._slices,
                "067Y",
                "F",
                "ANON-ACC-1",
            )
        ]

    def series(self, study_uid: str) -> list[SeriesInfo]:
        if study_uid != STUDY_UID:
            return []
        return [
            SeriesInfo(SERIES_UID, STUDY_UID, 1, "CT", "Axial 5mm", self._slices),
            SeriesInfo(SERIES2_UID, STUDY_UID, 2, "CT", "Axial bone", self._slices),
        ]

    def instances(self, series_uid: str) -> list[InstanceRef]:
        return [
            InstanceRef(self._sop(series_uid, i), series_uid, i + 1, i not in self._missing)
            for i in range(self._slices)
        ]

    def load_frame(self, sop_uid: str, frame: int = 0) -> Frame | None:
        index = int(sop_uid.rsplit(".", 1)[1]) - 1
        if index in self._missing:
            return None
        return Frame(
            phantom_slice(self._size, index),
            1.0,
            -1024.0,
            (0.8, 0.8),
            True,
            (-50.0, -50.0, 5.0 * index),
            (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
            Window(40, 400),
            slice_location=5.0 * index,
            slice_thickness=5.0,
        )

    def arrive(self, index: int) -> None:
        self._missing.discard(index)

    def request_first(self, sop_uid: str) -> None:
        self.requested.append(sop_uid)

    def consults(self) -> list[ConsultItem]:
        now = time.time()
        items = [
            ConsultItem("c-1", True, "CT head: bleed?", "PEER-NE", "stat", "offered",
                        now + 1800, STUDY_UID, "Dr Neuro", "verified",
                        peer_institution="St Elsewhere", modality="CT",
                        images=2 * self._slices, patient_age="067Y", patient_sex="F"),
            ConsultItem("c-2", False, "Knee MRI", "PEER-MS", "routine", "in_review",
                        now + 86400 * 2, "", "Dr Bones", "unverified",
                        peer_institution="Ortho Clinic"),
        ]  # fmt: skip
        items = [replace(c, state=self.states.get(c.consult_id, c.state)) for c in items]
        alerted = {a.consult_id for a in self.alerts}
        return [  # a critical result came back for an outbox consult (tests add them)
            replace(c, state="acknowledged" if c.consult_id in self.acked else "reported",
                    critical=True) if c.consult_id in alerted else c
            for c in items
        ]  # fmt: skip

    def peers(self) -> list[PeerInfo]:
        return list(self._peers)

    def transfers(self) -> list[TransferInfo]:
        return [TransferInfo("t-1", "St Elsewhere", "CT CHEST (ANON-0001)", 3_000_000, 12_000_000)]

    def notifications(self) -> list[str]:
        return ["New STAT request from St Elsewhere"]

    def safety_number(self, peer_node_id: str) -> str:
        return safety_number(self.node_id, self._peer_ids[peer_node_id])

    def rekey(self, peer_node_id: str, node: str) -> None:
        """The directory entry ``peer_node_id`` names key ``node`` from now on (a peer
        joined the live session with it, and its trust shows there)."""
        self._peers = [replace(p, node_id=node) if p.node_id == peer_node_id else p
                       for p in self._peers]  # fmt: skip

    def mark_verified(self, peer_node_id: str) -> None:
        self._peers = [
            replace(p, trust="verified") if p.node_id == peer_node_id else p for p in self._peers
        ]

    def open_session(self, study_uid: str) -> SessionView | None:
        return self.session

    def record_view(self, study_uid: str, live: bool) -> None:
        self.views.append(study_uid)

    async def respond(self, consult_id: str, accept: bool, reason: str = "") -> str:
        self.actions.append(("accept" if accept else "decline", consult_id, reason))
        return f"consult {consult_id} {'accepted' if accept else 'declined'}"

    def fetch(self, consult_id: str) -> str:
        self.actions.append(("fetch", consult_id))
        return f"fetching the study of consult {consult_id}"

    def pause_transfer(self, consult_id: str) -> str:
        self.actions.append(("pause", consult_id))
        return f"the study of consult {consult_id} is paused"

    def cancel_transfer(self, consult_id: str) -> str:
        self.actions.append(("cancel", consult_id))
        return f"the study of consult {consult_id} was cancelled"

    async def withdraw(self, consult_id: str) -> str:
        self.actions.append(("withdraw", consult_id))
        return f"consult {consult_id} withdrawn"

    async def cycle_availability(self) -> str:
        self.actions.append(("availability",))
        return "now on call"

    def critical_alerts(self) -> list[CriticalAlert]:
        return [a for a in self.alerts if a.consult_id not in self.acked]

    async def acknowledge(self, consult_id: str, by: str) -> str:
        if consult_id in {a.consult_id for a in self.alerts} and not by.strip():
            raise ActionError("a critical result is acknowledged by name")
        self.actions.append(("ack", consult_id, by))
        self.acked.add(consult_id)
        return f"report of consult {consult_id} acknowledged by {by}"

    async def request_consult(self, form: ConsultForm) -> str:
        if form.peer_node_id not in {p.node_id for p in self._peers if p.trust != "unverified"}:
            raise ActionError("pick a verified peer")
        self.actions.append(("request", form.study_uid, form.peer_node_id, form.priority))
        return f"consult sent to {form.peer_node_id}: delivered (LAN)"

    async def propose_guest(self, consult_id: str, peer_node_id: str) -> str:
        if peer_node_id not in {p.node_id for p in self._peers if p.trust != "unverified"}:
            raise ActionError("a guest must be a verified peer")
        self.actions.append(("propose-guest", consult_id, peer_node_id))
        return f"{peer_node_id} proposed as a guest; the other party must approve it too"

    def guest_proposals(self) -> list[GuestProposal]:
        answered = {(a[1], a[2]) for a in self.actions if a[0] in ("approve-guest", "refuse-guest")}
        return [p for p in self.proposals if (p.consult_id, p.guest) not in answered]

    async def answer_guest(self, consult_id: str, guest_node_id: str, approve: bool) -> str:
        verb = "approve-guest" if approve else "refuse-guest"
        self.actions.append((verb, consult_id, guest_node_id))
        return f"{guest_node_id} {'approved' if approve else 'refused'}"

    def report(self, consult_id: str) -> list[ReportSection] | None:
        return self.reports.get(consult_id)

    async def add_addendum(self, consult_id: str, text: str) -> str:
        if not text.strip():
            raise ActionError("an addendum needs its text")
        self.actions.append(("addendum", consult_id, text))
        return f"addendum to the report of consult {consult_id} signed and sent"


class MemoryLiveLink:
    """The :class:`~consult.live.LiveLink` one :class:`LiveConsult` holds to another in this
    process. What is sent reaches the other side as a node's live hub hands it on
    (fragments reassembled, presence unwrapped from its envelope); a message the other
    side refuses is kept in ``refused`` and ends the link both ways, as the hub drops a
    peer that misbehaves."""

    def __init__(
        self, owner: LiveConsult, owner_key: bytes, other: LiveConsult, other_key: bytes,
        refused: list[Exception],
    ) -> None:  # fmt: skip
        self.peer = other_key
        self.is_connected = True
        self.closed = False
        self._owner, self._owner_key = owner, owner_key
        self._other = other
        self._reassembler = Reassembler()
        self._refused = refused
        self.back: MemoryLiveLink | None = None  # the other side's link to this one
        self.presence_sent = 0

    async def send_live(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionError("the in-memory live link is closed")
        self._deliver(lambda: self._live(data))

    def send_presence(self, data: bytes) -> bool:
        if self.closed:
            return False
        self.presence_sent += 1
        self._deliver(lambda: self._presence(data))
        return True

    def _live(self, data: bytes) -> None:
        message = self._reassembler.feed(LiveFragment.from_wire(data))
        if message is not None:
            self._other.receive_live(self._owner_key, message)

    def _presence(self, data: bytes) -> None:
        self._other.receive_presence(self._owner_key, PresenceEnvelope.from_wire(data).message)

    def _deliver(self, receive: Callable[[], None]) -> None:
        try:
            receive()
        except RemoteConsultError as exc:
            self._refused.append(exc)
            # The receiving side drops the peer now; the sender (maybe still sending this
            # presence to its other peers) sees the connection close next.
            self.closed, self.is_connected = True, False
            self._other.unbind(self._owner_key)
            asyncio.get_running_loop().call_soon(self.close)

    def close(self) -> None:
        """The connection is gone: each side unbinds the other."""
        for link in (self, self.back):
            if link is not None:
                link.closed, link.is_connected = True, False
                if link._owner.is_bound(link.peer):
                    link._owner.unbind(link.peer)


class MemoryPeer:
    """Another participant in the in-memory node's live session: a real
    :class:`LiveConsult` with its own identity, joined to the node's session by a
    :class:`MemoryLiveLink` each way.

    Tests play the other side through :attr:`live` (what the real client does), or
    :meth:`write_raw` into its shared state (what a modified client could send); what
    the node's session refuses lands in :attr:`MemorySession.refused`."""

    def __init__(self, consult_id: str, identity: Identity, name: str, colour: str) -> None:
        self.identity = identity
        self.node = str(identity.node_id)
        self._skew = 0.0
        self.live = LiveConsult(consult_id, identity, name, colour, clock=self.clock)
        self.to_node: MemoryLiveLink  # set when it joins
        self.from_node: MemoryLiveLink

    def clock(self) -> float:
        """The peer's clock: each presence change a test makes comes a presence period after
        the last, so the peer's coalescing sends it at once (a person is slower than 30 Hz)."""
        return time.time() + self._skew

    def cursor(self, cursor: Cursor | None) -> None:
        self._skew += 0.05
        self.live.move_cursor(cursor)

    def viewport(
        self, viewport: Viewport, *, presenting: bool | None = None, following: bool | None = None
    ) -> None:
        self._skew += 0.05
        if presenting is not None:
            self.live.presence.present(presenting, self.clock())
        if following is not None:
            self.live.presence.following = following
        self.live.set_viewport(viewport, by_user=following is None)

    def write_raw(self, annotation: Annotation) -> None:
        """A modified client: ``annotation`` (built past its own checks, signed or not)
        written into the shared state as it is."""
        self.live.state._annotations[annotation.id] = annotation.to_py()


class MemorySession:
    """The in-memory node's live session: a real :class:`LiveConsult`, shown to the TUI
    through the real :class:`~tui.node_facade.LiveSessionView`, and the peers tests join
    to it."""

    def __init__(self, consult_id: str, identity: Identity, name: str) -> None:
        self.identity = identity
        self.live = LiveConsult(consult_id, identity, name, "#00d7ff")
        self.view = LiveSessionView(self.live, on_finalise=self._finalised)
        self.peers: list[MemoryPeer] = []
        self.refused: list[Exception] = []  # peers' messages the node's session refused
        self.sent: list[tuple[str, str, frozenset[str]]] = []  # (findings, impression, drop)
        self.critical = False  # what the last finalise was told

    def _finalised(self, live: LiveConsult, critical: bool, drop: frozenset[str]) -> None:
        self.critical = critical
        self.sent.append((*split_report(live.report_text()), drop))

    def join(self, name: str, colour: str, identity: Identity | None = None) -> MemoryPeer:
        """A peer joins (inside a running event loop): bound on both sides, its presence
        shown at once; the shared state follows over the live channel (:meth:`settle`)."""
        peer = MemoryPeer(self.live.consult_id, identity or Identity.generate(), name, colour)
        own, theirs = self.identity.public_key, peer.identity.public_key
        to_peer = MemoryLiveLink(self.live, own, peer.live, theirs, self.refused)
        to_node = MemoryLiveLink(peer.live, theirs, self.live, own, self.refused)
        to_peer.back, to_node.back = to_node, to_peer
        peer.to_node, peer.from_node = to_node, to_peer
        self.live.bind(to_peer)
        peer.live.bind(to_node)
        self.peers.append(peer)
        return peer

    async def settle(self, within: float = 5.0) -> None:
        """Wait until every live message sent so far was taken in on the other side (each
        link delivers as it sends: an empty send queue is a delivered one)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        sessions = [self.live, *(p.live for p in self.peers)]
        while not all(b.queue.empty() for s in sessions for b in s._bindings.values()):
            if loop.time() > deadline:
                raise TimeoutError("the in-memory live session did not settle")
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        for peer in self.peers:
            await peer.live.close()
        await self.live.close()
