"""An in-memory node for tests and demos: one synthetic CT study, peers, consults."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace

import numpy as np
import numpy.typing as npt

from consult.errors import NotAuthor
from consult.presence import Cursor, Participant, Viewport
from consult.shared import MAX_CHAT_CHARS, Annotation, AnnotationKind, ChatMessage, Point
from crypto.identity import NodeId
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
from tui.session import Listener, SessionView

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
        self, node_id: NodeId, *, slices: int = 12, size: int = 128, missing: int = 0
    ) -> None:
        self.node_id = node_id
        self._size = size
        self._slices = slices
        self._missing = set(range(slices - missing, slices))
        self.requested: list[str] = []
        self.actions: list[tuple[str, ...]] = []  # worklist/share calls, for tests
        self.views: list[str] = []  # studies opened in the viewer (the audit, in memory)
        self.session = InMemorySession("consult-1", str(node_id), "me")
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


class InMemorySession:
    """A :class:`~tui.session.SessionView` held in memory, for tests: ``remote_*`` play
    the other participants, and may pass values a modified client would send past the
    checks of the real session (:class:`tui.node_facade.LiveSessionView`)."""

    def __init__(
        self, consult_id: str, local_node: str, name: str, colour: str = "#00d7ff"
    ) -> None:
        self.consult_id = consult_id
        self.local_node = local_node
        self._me = Participant(0, local_node, name, colour, "", False, None, None)
        self._others: dict[int, Participant] = {}
        self._annotations: dict[str, Annotation] = {}
        self._chat: list[ChatMessage] = []
        self._report = ""
        self._final = False
        self.critical = False  # what finalise() was told, for tests
        self.sent: list[tuple[str, str, frozenset[str]]] = []  # (findings, impression, drop)
        self._listeners: list[Listener] = []
        self._following = False
        self.cursor_moves = 0  # how many cursor updates left this participant

    # reading
    def participants(self) -> list[Participant]:
        return [self._me, *self._others.values()]

    def annotations(self) -> list[Annotation]:
        return sorted(self._annotations.values(), key=lambda a: (a.at, a.id))

    def chat(self) -> list[ChatMessage]:
        return list(self._chat)

    def report_text(self) -> str:
        return self._report

    def finalised(self) -> bool:
        return self._final

    # local edits
    def add_annotation(
        self,
        kind: AnnotationKind,
        sop_instance_uid: str,
        frame: int,
        points: tuple[Point, ...],
        *,
        text: str = "",
        values: Mapping[str, float] | None = None,
    ) -> Annotation:
        a = Annotation(
            uuid.uuid4().hex,
            kind,
            sop_instance_uid,
            frame,
            points,
            self.local_node,
            time.time(),
            text,
            dict(values or {}),
        )
        self._annotations[a.id] = a
        self._changed()
        return a

    def remove_annotation(self, annotation_id: str) -> None:
        a = self._annotations.get(annotation_id)
        if a is None:
            return
        if a.author != self.local_node:
            raise NotAuthor(
                "only the author can remove an annotation: ask them, or hide it in your own view"
            )
        del self._annotations[annotation_id]
        self._changed()

    def move_cursor(self, cursor: Cursor | None) -> None:
        self._me = replace(self._me, cursor=cursor)
        self.cursor_moves += 1

    def say(self, text: str) -> ChatMessage:
        text = text[:MAX_CHAT_CHARS]
        m = ChatMessage(uuid.uuid4().hex, self.local_node, time.time(), text)
        self._chat.append(m)
        self._changed()
        return m

    def set_report_text(self, text: str) -> None:
        if not self._final:
            self._report = text
            self._changed()

    def finalise(self, critical: bool = False, drop: frozenset[str] = frozenset()) -> None:
        from consult.report_draft import split_report

        self._final = True
        self.critical = critical
        self.sent.append((*split_report(self._report), drop))
        self._changed()

    def set_viewport(self, viewport: Viewport, *, by_user: bool = True) -> None:
        if by_user and self._following:
            self._following = False
            self._changed()
        self._me = replace(self._me, viewport=viewport)

    def set_tool(self, tool: str) -> None:
        self._me = replace(self._me, tool=tool)

    def present(self, on: bool) -> None:
        self._me = replace(self._me, presenting=on)
        self._following = self._following and not on
        self._changed()

    def follow(self, on: bool) -> None:
        self._following = on
        self._changed()

    def following(self) -> bool:
        return self._following

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _changed(self) -> None:
        for listener in list(self._listeners):
            listener()

    # the other side, for tests and demos
    def remote_join(self, client_id: int, node: str, name: str, colour: str) -> None:
        self._others[client_id] = Participant(client_id, node, name, colour, "", False, None, None)
        self._changed()

    def remote_cursor(self, client_id: int, cursor: Cursor | None) -> None:
        self._others[client_id] = replace(self._others[client_id], cursor=cursor)
        self._changed()

    def remote_viewport(
        self,
        client_id: int,
        viewport: Viewport | None,
        presenting: bool | None = None,
        following: bool | None = None,
    ) -> None:
        other = self._others[client_id]
        presenting = other.presenting if presenting is None else presenting
        following = other.following if following is None else following
        self._others[client_id] = replace(
            other, viewport=viewport, presenting=presenting, following=following
        )
        self._changed()

    def remote_annotation(self, annotation: Annotation) -> None:
        self._annotations[annotation.id] = annotation
        self._changed()

    def remote_say(self, node: str, text: str) -> None:
        self._chat.append(ChatMessage(uuid.uuid4().hex, node, time.time(), text))
        self._changed()
