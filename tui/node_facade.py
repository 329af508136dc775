"""``NodeFacade`` and ``SessionView`` backed by a running :class:`~node.app.runtime.NodeRuntime`.

Everything here runs on the node's event loop (under `radmesh tui` that is in the
node's own process, reached through its control socket: :mod:`tui.remote`), except
:meth:`RuntimeNode.load_frame`, which the viewer runs on a worker thread (the store
is thread-safe). Studies come from the node's encrypted store,
consults from its consult database plus the live sessions it was invited to,
peers from its directory and trust store. Patient names never reach the screen:
each patient gets a stable pseudonym label.

Why one module: It implements the whole NodeFacade protocol (tui/facade.py) over one
runtime; the protocol, not this module, is what the screens read.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import replace

import pydicom
from pydicom.errors import InvalidDicomError

from consult.errors import ConsultError, IllegalTransition
from consult.live import LiveConsult
from consult.presence import Cursor, Participant, Viewport
from consult.report_draft import split_report
from consult.report_view import report_view
from consult.requests import ConsultCase, Event, Priority, Role, State, refusal
from consult.shared import Annotation, AnnotationKind, ChatMessage, Point
from crypto.errors import CryptoError
from crypto.identity import NodeId
from crypto.safety import safety_number
from node.app import cases, consults, guests
from node.app.alerts import policy_of
from node.app.availability import apply_availability, next_availability
from node.app.runtime import NodeRuntime
from node.core.audit import AuditKind
from node.core.display import peer_label
from node.core.errors import NodeError
from node.dicom.store import StoreError
from peer_transport.errors import TransportError
from registry.errors import RegistryError
from registry.trust import TrustState
from tui.dicom_frame import frame_from_dataset
from tui.facade import (
    PRIORITIES,
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
from tui.linking import slice_location
from tui.session import Listener, SessionView

MAX_NOTIFICATIONS = 100
_CLOSED_STATES = frozenset({State.DECLINED, State.WITHDRAWN, State.EXPIRED})
# Once a consultant holds the case, the requesting node's session invites it in.
_ACCEPTED_STATES = frozenset(
    {State.ACCEPTED, State.TRANSFERRING, State.IN_REVIEW, State.REPORTED, State.ACKNOWLEDGED}
)
_TRUST_LABEL = {
    TrustState.VERIFIED: "verified",
    TrustState.TRUSTED_BY_ORG: "organisation",
}


def _trust_label(state: TrustState | None) -> str:
    return _TRUST_LABEL.get(state, "unverified") if state is not None else "unverified"


def _study_cells(study: StudyInfo | None) -> tuple[str, int, str, str]:
    """The worklist's modality, image count, age and sex of a consult's study, as held here."""
    if study is None:
        return ("", 0, "", "")
    return (study.modalities, study.instance_count, study.patient_age, study.patient_sex)


def _cursor(cursor: Cursor | None, uid: Callable[[str], str]) -> Cursor | None:
    if cursor is None or uid(cursor.sop_instance_uid) == cursor.sop_instance_uid:
        return cursor
    return replace(cursor, sop_instance_uid=uid(cursor.sop_instance_uid))


def _viewport(viewport: Viewport, uid: Callable[[str], str]) -> Viewport:
    if uid(viewport.series_uid) == viewport.series_uid:
        return viewport
    return replace(viewport, series_uid=uid(viewport.series_uid))


def _annotation(annotation: Annotation, uid: Callable[[str], str]) -> Annotation:
    if uid(annotation.sop_instance_uid) == annotation.sop_instance_uid:
        return annotation
    return replace(annotation, sop_instance_uid=uid(annotation.sop_instance_uid))


class LiveSessionView:
    """A :class:`~tui.session.SessionView` over a :class:`~consult.live.LiveConsult`.

    ``uids`` translates between the study as this node stores it and as the session
    names it: on the requesting node of a de-identified consult, what the session holds
    is shown under the original UIDs and what the user does is written under the
    pseudonyms, so nothing identifying enters the shared state.
    """

    def __init__(
        self,
        live: LiveConsult,
        on_finalise: Callable[[LiveConsult, bool, frozenset[str]], None] | None = None,
        uids: cases.UidMapping | None = None,
    ) -> None:
        self.live = live
        self.consult_id = live.consult_id
        self.local_node = live.local_node
        self._on_finalise = on_finalise
        self.uids = uids or cases.UidMapping()

    def participants(self) -> list[Participant]:
        me = self.live.presence.me
        others = [p for p in self.live.participants() if p.client_id != me.client_id]
        local = self.uids.from_shared
        return [
            replace(
                p,
                cursor=_cursor(p.cursor, local),
                viewport=None if p.viewport is None else _viewport(p.viewport, local),
            )
            for p in (me, *others)
        ]

    def annotations(self) -> list[Annotation]:
        shown = [_annotation(a, self.uids.from_shared) for a in self.live.annotations()]
        return sorted(shown, key=lambda a: (a.at, a.id))

    def chat(self) -> list[ChatMessage]:
        return self.live.chat()

    def report_text(self) -> str:
        return self.live.report_text()

    def finalised(self) -> bool:
        return self.live.finalised

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
        shared = self.live.add_annotation(
            kind, self.uids.to_shared(sop_instance_uid), frame, points, text=text, values=values
        )
        return _annotation(shared, self.uids.from_shared)

    def remove_annotation(self, annotation_id: str) -> None:
        self.live.remove_annotation(annotation_id)

    def move_cursor(self, cursor: Cursor | None) -> None:
        self.live.move_cursor(_cursor(cursor, self.uids.to_shared))

    def say(self, text: str) -> ChatMessage:
        return self.live.say(text)

    def set_report_text(self, text: str) -> None:
        if not self.live.finalised:
            self.live.set_report_text(text)

    def finalise(self, critical: bool = False, drop: frozenset[str] = frozenset()) -> None:
        """Lock the draft; on the consultant's node, also sign and send the report
        (without the annotations in ``drop``: duplicates the preview said it leaves out)."""
        self.live.finalised = True
        self.live._changed()
        if self._on_finalise is not None:
            self._on_finalise(self.live, critical, drop)

    def set_viewport(self, viewport: Viewport, *, by_user: bool = True) -> None:
        was_following = self.live.presence.following
        self.live.set_viewport(_viewport(viewport, self.uids.to_shared), by_user=by_user)
        if was_following and not self.live.presence.following:
            self.live._changed()

    def set_tool(self, tool: str) -> None:
        self.live.set_tool(tool)

    def present(self, on: bool) -> None:
        self.live.present(on)

    def follow(self, on: bool) -> None:
        if on:
            self.live.follow()
        else:
            self.live.presence.following = False
            self.live._changed()

    def following(self) -> bool:
        return self.live.presence.following

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        return self.live.subscribe(listener)


def refused(exc: IllegalTransition) -> str:
    """A refused consult action in the TUI's words: what happened, and which key to press."""
    return refusal(State(exc.state), Event(exc.event), tui=True)


def impression_of(text: str) -> tuple[str, str]:
    """(findings, impression) of a report draft: after an "Impression:" line if there is
    one, else the last paragraph."""
    lines = text.strip().splitlines()
    for index, line in enumerate(lines):
        if line.strip().lower().startswith("impression"):
            rest = line.split(":", 1)[1] if ":" in line else ""
            impression = "\n".join([rest, *lines[index + 1 :]]).strip()
            return "\n".join(lines[:index]).strip(), impression
    paragraphs = [p.strip() for p in text.strip().split("\n\n") if p.strip()]
    if not paragraphs:
        return "", ""
    return "\n\n".join(paragraphs[:-1]), paragraphs[-1]


class RuntimeNode:
    """The TUI's :class:`~tui.facade.NodeFacade` on a NodeRuntime (started by the caller)."""

    def _finalise(
        self, live: LiveConsult, critical: bool = False, drop: frozenset[str] = frozenset()
    ) -> None:
        """Sign and send the report when this node is the consultant of the case."""
        runtime = self.runtime
        try:
            role = runtime.consults.info(live.consult_id).role
        except ConsultError:
            return  # an ad-hoc session: nothing to report to
        if role is not Role.CONSULTANT:
            runtime.notify("Only the consultant's node signs the report of this case")
            return
        findings, impression = split_report(live.report_text())

        async def send() -> None:
            try:
                measurements, marks = runtime.consulting.reports.report_items_of(
                    live.consult_id, [a for a in live.annotations() if a.id not in drop]
                )
                await runtime.consulting.reports.send_report(
                    live.consult_id,
                    text=findings,
                    impression=impression,
                    measurements=measurements,
                    marks=marks,
                    critical=critical,
                )
                runtime.notify(f"Report for consult {live.consult_id[:8]} signed and sent")
            except IllegalTransition as exc:
                runtime.notify(f"The report was not sent. {refused(exc)}")
            except (ConsultError, NodeError) as exc:
                runtime.notify(f"The report was not sent: {exc}")

        runtime.spawn(send())

    def __init__(self, runtime: NodeRuntime) -> None:
        self.runtime = runtime
        self._notes: deque[str] = deque(maxlen=MAX_NOTIFICATIONS)
        self._patients: dict[str, str] = {}
        self._ages: dict[str, str] = {}  # study uid -> PatientAge as stored (read once)
        self._originals: dict[str, str] = {}  # consult id -> original study (requesting side)

    # -- status and studies ---------------------------------------------------------
    def status(self) -> NodeStatus:
        r = self.runtime
        s = r.status()
        lines: list[tuple[str, str, bool]] = [
            (f"registry {url}", state, state == "connected") for url, state in s.registries.items()
        ]
        if not s.registries:
            lines.append(("registries", "none configured", False))
        net = r.config.network
        lines += [
            ("LAN endpoint", s.lan_url or "not listening", bool(s.lan_url)),
            ("mDNS", "on" if s.mdns else "off", s.mdns),
            ("DICOM listener", s.dicom, s.dicom != "off"),
            (
                "TURN/ICE",
                f"{s.turn}; {len(net.ice_servers)} configured",
                s.turn != "none" or bool(net.ice_servers),
            ),
            ("live sessions", str(len(r.live_hub().sessions)), True),
            ("availability (o)", r.config.availability, r.config.availability != "away"),
        ]
        return NodeStatus(s.node_id, r.config.display_name, r.config.institution, tuple(lines))

    def _pseudonym(self, patient_id: str, patient_name: str) -> str:
        key = hashlib.sha256(f"{patient_id}|{patient_name}".encode()).hexdigest()
        if key not in self._patients:
            self._patients[key] = f"PATIENT-{len(self._patients) + 1:04d}"
        return self._patients[key]

    def studies(self) -> list[StudyInfo]:
        rows = sorted(self.runtime.store.studies(), key=lambda r: (r.patient_id, r.study_uid))
        stored = {r.study_uid for r in rows}
        streaming = [
            StudyInfo(
                m.study_instance_uid,
                "(arriving)",
                "",
                "study still streaming in",
                "",
                len({e.series_instance_uid for e in m.entries}),
                m.count,
            )
            for m in self.runtime.transfers.incoming()
            if m.study_instance_uid not in stored
        ]
        return streaming + [
            StudyInfo(
                r.study_uid,
                self._pseudonym(r.patient_id, r.patient_name),
                r.study_date,
                r.description,
                ",".join(r.modalities),
                r.series_count,
                r.instance_count,
                self._age(r.study_uid),
                r.patient_sex,
                r.accession_number,
            )
            for r in rows
        ]

    def _age(self, study_uid: str) -> str:
        """PatientAge as the store holds it (the store's index has no column for it): read
        from one instance's header, once per study."""
        if study_uid not in self._ages:
            store = self.runtime.store
            for series in store.series(study_uid)[:1]:
                for row in store.instances(study_uid, series.series_uid)[:1]:
                    self._ages[study_uid] = ""  # an instance is here: read it once, not again
                    with contextlib.suppress(StoreError, InvalidDicomError, OSError, ValueError):
                        raw = io.BytesIO(store.read_instance(row.sop_instance_uid))
                        ds = pydicom.dcmread(raw, stop_before_pixels=True)
                        self._ages[study_uid] = str(ds.get("PatientAge", "") or "")
        return self._ages.get(study_uid, "")

    def series(self, study_uid: str) -> list[SeriesInfo]:
        manifest = self.runtime.transfers.manifest_of(study_uid)
        if manifest is not None:  # still streaming in: every series, stored or not
            stored = {r.series_uid: r for r in self.runtime.store.series(study_uid)}
            counts: dict[str, int] = {}
            numbers: dict[str, int] = {}
            for e in manifest.entries:
                counts[e.series_instance_uid] = counts.get(e.series_instance_uid, 0) + 1
                numbers.setdefault(e.series_instance_uid, e.series_number)
            return [
                SeriesInfo(
                    uid,
                    study_uid,
                    numbers[uid],
                    stored[uid].modality if uid in stored else "",
                    stored[uid].description if uid in stored else "arriving",
                    count,
                )
                for uid, count in sorted(counts.items(), key=lambda kv: numbers[kv[0]])
            ]
        return [
            SeriesInfo(
                r.series_uid,
                r.study_uid,
                r.series_number or 0,
                r.modality,
                r.description,
                r.instance_count,
            )
            for r in self.runtime.store.series(study_uid)
        ]

    def instances(self, series_uid: str) -> list[InstanceRef]:
        for manifest in self.runtime.transfers.incoming():
            entries = [e for e in manifest.entries if e.series_instance_uid == series_uid]
            if entries:  # still streaming in: slices not stored yet show as loading
                store = self.runtime.store
                return [
                    InstanceRef(
                        e.sop_instance_uid,
                        series_uid,
                        e.instance_number,
                        store.has_instance(e.sop_instance_uid),
                    )
                    for e in sorted(entries, key=lambda e: e.instance_number)
                ]
        study_uid = self._study_of_series(series_uid)
        if study_uid is None:
            return []
        rows = self.runtime.store.instances(study_uid, series_uid)
        return [
            InstanceRef(
                r.sop_instance_uid,
                series_uid,
                r.instance_number or 0,
                location=slice_location(r.image_position, r.image_orientation),
            )
            for r in rows
        ]

    def _study_of_series(self, series_uid: str) -> str | None:
        for study in self.runtime.store.studies():
            if any(s.series_uid == series_uid for s in self.runtime.store.series(study.study_uid)):
                return study.study_uid
        return None

    def load_frame(self, sop_uid: str, frame: int = 0) -> Frame | None:
        store = self.runtime.store
        if not store.has_instance(sop_uid):
            return None
        try:
            ds = pydicom.dcmread(io.BytesIO(store.read_instance(sop_uid)))
            return frame_from_dataset(ds, frame)
        except StoreError:
            raise
        except (InvalidDicomError, OSError, ValueError, AttributeError, RuntimeError) as exc:
            raise NodeError(f"cannot decode instance {sop_uid[-12:]}: {exc}") from exc

    def request_first(self, sop_uid: str) -> None:
        self.runtime.transfers.request_first(sop_uid, self.runtime.spawn)

    # -- consults, peers, notifications ---------------------------------------------------
    def consults(self) -> list[ConsultItem]:
        items = []
        known = set()
        peers = {p.node_id: p for p in self.peers()}
        acks = {r.consult_id: r for r in self.runtime.consults.report_acks(unacknowledged=True)}
        policy, now = policy_of(self.runtime.config.alerts), self.runtime.now()
        studies = {s.study_uid: s for s in self.studies()}
        trusted = self.runtime.trust.known()  # for peers whose record is not remembered
        for case in self.runtime.consults.cases():
            about = self.runtime.consults.info(case.request.id)
            role, peer_id = about.role, about.peer_id
            known.add(case.request.id)
            info = peers.get(str(peer_id)) if peer_id is not None else None
            items.append(
                ConsultItem(
                    case.request.id,
                    role is not Role.REQUESTER,
                    case.request.question,
                    peer_id.short() if peer_id is not None else "",
                    case.request.priority.value,
                    case.state.value,
                    float(case.request.deadline),
                    self._study_here(case, role),
                    info.name if info else "",
                    info.trust
                    if info
                    else _trust_label(trusted.get(peer_id))
                    if peer_id is not None
                    else "",
                    (ack := acks.get(case.request.id)) is not None and ack.critical,
                    ack is not None
                    and case.state is State.REPORTED
                    and policy.overdue(ack.priority, ack.critical, ack.reported_at, now),
                    info.institution if info else "",
                    *_study_cells(studies.get(self._study_here(case, role))),
                )
            )
        for live in self.runtime.live_hub().sessions.values():
            if live.consult_id not in known:
                items.append(
                    ConsultItem(
                        live.consult_id,
                        True,
                        live.title or "live session",
                        f"{len(live.peers)} peer(s)",
                        "routine",
                        "live",
                        0.0,
                        live.study_uid,
                    )
                )
        return items

    def peers(self) -> list[PeerInfo]:
        r = self.runtime
        return [
            PeerInfo(
                str(NodeId.from_public_key(p.record.public_key)),
                p.record.display_name,
                p.record.institution,
                tuple(p.record.subspecialties),
                tuple(p.record.jurisdictions),
                p.fresh,
                _TRUST_LABEL.get(p.trust, "unverified"),
            )
            for p in r.directory.list(r.now())
        ]

    def transfers(self) -> list[TransferInfo]:
        return [
            TransferInfo(
                t.transfer_id,
                t.peer,
                t.label,
                t.bytes_done,
                t.bytes_total,
                t.direction.value,
                t.state.value,
                t.instances_done,
                t.instances_total,
                t.rate,
                t.eta,
            )
            for t in self.runtime.transfers.views()
        ]

    def notifications(self) -> list[str]:
        queue = self.runtime.notifications
        while not queue.empty():
            self._notes.append(queue.get_nowait())
        return list(self._notes)

    def safety_number(self, peer_node_id: str) -> str:
        return safety_number(self.runtime.identity.node_id, NodeId.parse(peer_node_id))

    def mark_verified(self, peer_node_id: str) -> None:
        rt = self.runtime
        rt.trust.mark_verified(NodeId.parse(peer_node_id), rt.now())
        details = {"event": "verify", "method": "safety-number", "by": "tui"}
        rt.audit.append(AuditKind.TRUST, now=rt.clock(), peer=peer_node_id, details=details)

    # -- live -----------------------------------------------------------------------
    def open_session(self, study_uid: str) -> SessionView | None:
        """The live session on this study: its consult's (on the requesting node, the
        consultant is invited in), one we were invited to, or a new ad-hoc one.

        On the requesting node ``study_uid`` is the original study, which the consult
        shares under a pseudonym: the session is named by the pseudonym and the view
        translates every UID between the two.
        """
        rt = self.runtime
        hub = rt.live_hub()
        case = self._consult_on(study_uid)
        if case is not None:
            consult_id = case.request.id
            live = hub.open(consult_id, case.request.question[:200], case.request.study_uid)
            role = rt.consults.info(consult_id).role
            if role is Role.REQUESTER and case.state in _ACCEPTED_STATES:
                rt.spawn(self._invite_consultant(consult_id))
            rt.spawn(self._invite_guests(consult_id))  # approved by both: they join now
            return LiveSessionView(live, self._finalise, rt.consulting.uid_mapping(consult_id))
        for live in hub.sessions.values():
            if live.study_uid == study_uid:
                return LiveSessionView(live, self._finalise)
        consult_id = "study-" + hashlib.sha256(study_uid.encode()).hexdigest()[:32]
        return LiveSessionView(hub.open(consult_id, "ad-hoc session", study_uid), self._finalise)

    def _consult_on(self, study_uid: str) -> ConsultCase | None:
        """The open consult on this study: shared under this UID, or (requesting node)
        de-identified from it. One with a live session open first, then the newest."""
        rt = self.runtime
        found = []
        for case in rt.consults.cases():
            if case.state in _CLOSED_STATES:
                continue
            role = rt.consults.info(case.request.id).role
            if study_uid in (case.request.study_uid, self._study_here(case, role)):
                found.append(case)
        sessions = rt.live_hub().sessions
        return max(
            found,
            key=lambda c: (c.request.id in sessions, c.request.created_at),
            default=None,
        )

    def _study_here(self, case: ConsultCase, role: Role) -> str:
        """The consult's study as this node stores it: the original on the requesting node
        of a de-identified share, else the UID the consult shares it under."""
        consult_id = case.request.id
        if role is not Role.REQUESTER or not case.request.deidentified:
            return case.request.study_uid
        if consult_id not in self._originals:  # fixed per consult; spares a map decrypt
            try:
                share = self.runtime.consulting.share_of(consult_id)
            except (ConsultError, NodeError, TransportError):
                return case.request.study_uid  # no pseudonym map here (sent with --out)
            self._originals[consult_id] = share.original_study_uid
        return self._originals[consult_id]

    async def _invite_consultant(self, consult_id: str) -> None:
        """Requesting side: bring the consultant's node into our session on its consult
        (it joins automatically; if it already has the session open, it is the same one)."""
        rt = self.runtime
        hub = rt.live_hub()
        try:
            peer = await rt.consulting.consultant_key(consult_id)
            live = hub.sessions.get(consult_id)
            if peer is None or live is None or live.is_bound(peer):
                return
            await hub.invite(consult_id, peer)
        except (ConsultError, NodeError, TransportError, OSError, TimeoutError) as exc:
            rt.notify(
                f"The consultant of consult {consult_id[:8]} is not in the live session: "
                f"{exc}. Open the study again once its node is online."
            )

    def record_view(self, study_uid: str, live: bool) -> None:
        rt = self.runtime
        rt.audit.append(
            AuditKind.VIEW,
            now=rt.clock(),
            study_uid=study_uid,
            details={"live": str(live), "by": "tui"},
        )

    # -- critical results ----------------------------------------------------------------
    def critical_alerts(self) -> list[CriticalAlert]:
        return [
            CriticalAlert(r.consult_id, r.steps, float(r.reported_at))
            for r in self.runtime.alerts.banners()
        ]

    async def acknowledge(self, consult_id: str, by: str) -> str:
        try:
            how, _ = await self.runtime.consulting.reports.acknowledge(consult_id, by)
        except IllegalTransition as exc:
            raise ActionError(refused(exc)) from exc
        except (ConsultError, NodeError) as exc:
            raise ActionError(f"could not acknowledge consult {consult_id[:8]}: {exc}") from exc
        return f"report of consult {consult_id[:8]} acknowledged; consultant told: {how}"

    def report(self, consult_id: str) -> list[ReportSection] | None:
        db = self.runtime.consults
        peer_id = db.info(consult_id).peer_id
        info = next(
            (p for p in self.peers() if peer_id is not None and p.node_id == str(peer_id)), None
        )
        trust = info.trust if info else ("unverified" if peer_id is not None else "")
        sections = report_view(db, consult_id, trust=trust)
        if sections is None:
            return None
        return [ReportSection(s.heading, s.lines) for s in sections]

    async def add_addendum(self, consult_id: str, text: str) -> str:
        try:
            addendum, how = await self.runtime.consulting.reports.send_addendum(consult_id, text)
        except (ConsultError, NodeError) as exc:
            raise ActionError(f"no addendum was added to consult {consult_id[:8]}: {exc}") from exc
        return f"addendum {addendum.number} to the report of consult {consult_id[:8]}: {how}"

    # -- worklist and sharing -----------------------------------------------------------
    async def respond(self, consult_id: str, accept: bool, reason: str = "") -> str:
        event = Event.ACCEPT if accept else Event.DECLINE
        try:
            state = await self.runtime.consulting.respond(consult_id, event, reason)
        except IllegalTransition as exc:
            raise ActionError(refused(exc)) from exc
        except (ConsultError, NodeError, TransportError) as exc:
            raise ActionError(f"could not {event.value} consult {consult_id[:8]}: {exc}") from exc
        return f"consult {consult_id[:8]} {state.value}; the requesting node was told"

    def pause_transfer(self, consult_id: str) -> str:
        try:
            paused = self.runtime.transfers.pause(consult_id)
        except NodeError as exc:
            raise ActionError(str(exc)) from exc
        what = f"the study of consult {consult_id[:8]}"
        return f"{what} is paused (z goes on)" if paused else f"{what} goes on"

    def cancel_transfer(self, consult_id: str) -> str:
        try:
            self.runtime.transfers.cancel(consult_id)
        except NodeError as exc:
            raise ActionError(str(exc)) from exc
        return f"the study of consult {consult_id[:8]} was cancelled; f fetches it again"

    def fetch(self, consult_id: str) -> str:
        rt = self.runtime
        try:
            case = rt.consults.get(rt.consults.resolve(consult_id))
            role = rt.consults.info(case.request.id).role
        except ConsultError as exc:
            raise ActionError(str(exc)) from exc
        if role is not Role.CONSULTANT:
            raise ActionError("only the consultant's node fetches the study of a consult")
        if case.state not in cases.SERVABLE:
            raise ActionError(refusal(case.state, Event.START_TRANSFER, tui=True))
        # The desk's own record, not one kept here: it lets a fetch go in the same step
        # as its spool, so f pressed right after a cancel fetches again.
        try:
            started = rt.consulting.studies.start_fetch(case.request.id)
        except (ConsultError, NodeError) as exc:
            raise ActionError(str(exc)) from exc
        if started is None:
            return f"the study of consult {consult_id[:8]} is already being fetched"
        outcome = started

        async def pull() -> None:
            try:
                done = await asyncio.shield(outcome)
                rt.notify(
                    f"Study of consult {consult_id[:8]} received: {done.instances_done} images"
                )
            except (ConsultError, NodeError, TransportError) as exc:
                rt.notify(f"Fetching the study of consult {consult_id[:8]} failed: {exc}")

        rt.spawn(pull())
        return f"fetching the study of consult {consult_id[:8]} (see Transfers)"

    async def cycle_availability(self) -> str:
        value = next_availability(self.runtime.config.availability)
        try:
            return await apply_availability(self.runtime, value)
        except (NodeError, RegistryError) as exc:
            raise ActionError(f"could not change availability: {exc}") from exc

    async def withdraw(self, consult_id: str) -> str:
        """Requester side: withdraw the request and tell every consultant it went to."""
        try:
            unreached = await self.runtime.consulting.withdraw(consult_id)
        except IllegalTransition as exc:
            raise ActionError(refused(exc)) from exc
        except ConsultError as exc:
            raise ActionError(f"could not withdraw consult {consult_id[:8]}: {exc}") from exc
        if unreached:
            names = ", ".join(n.short() for n in unreached)
            return f"consult {consult_id[:8]} withdrawn; not told yet: {names}"
        return f"consult {consult_id[:8]} withdrawn; every consultant told"

    async def request_consult(self, form: ConsultForm) -> str:
        rt = self.runtime
        peer = next((p for p in self.peers() if p.node_id == form.peer_node_id), None)
        if peer is None or peer.trust == "unverified":
            raise ActionError(
                "pick a verified peer: studies are never shared with an unverified key"
            )
        if form.priority not in PRIORITIES:
            raise ActionError(f"priority must be one of {', '.join(PRIORITIES)}")
        jurisdiction = form.jurisdiction or rt.config.country
        if not jurisdiction:
            raise ActionError("give the patient's country (jurisdiction), e.g. IE")
        peer_id = NodeId.parse(peer.node_id)
        who = peer_label(peer.name, peer_id.short(), peer.trust)  # never the name alone
        record = await rt.directory.resolve(peer_id, rt.now())
        if record is None:
            raise ActionError(f"{who}'s address is not known: check the Peers screen")
        try:
            request, _, how = await rt.consulting.request_consult(
                record.record.public_key,
                form.study_uid,
                consults.Terms(
                    question=form.question,
                    priority=Priority(form.priority),
                    subspecialty=form.subspecialty,
                    jurisdiction=jurisdiction,
                    deadline_seconds=int(form.deadline_hours * 3600),
                    burned_in_checked=form.burned_in_checked,
                    priors=(
                        rt.consulting.priors_in_store(form.study_uid) if form.with_priors else ()
                    ),
                ),
            )
        except (ConsultError, NodeError, TransportError) as exc:
            raise ActionError(f"the request was not sent: {exc}") from exc
        return f"consult {request.id[:8]} sent to {who}: {how}"

    # -- guests of a live session ---------------------------------------------------------
    async def propose_guest(self, consult_id: str, peer_node_id: str) -> str:
        try:
            guest = NodeId.parse(peer_node_id)
            return await self.runtime.guests.propose(consult_id, guest)
        except (ConsultError, NodeError, TransportError, CryptoError) as exc:
            raise ActionError(f"the guest was not proposed: {exc}") from exc

    def guest_proposals(self) -> list[GuestProposal]:
        rt = self.runtime
        own = str(rt.identity.node_id)
        peers = {p.node_id: p for p in self.peers()}
        found = []
        for status in guests.pending(rt.consults, own):
            info = peers.get(status.guest)
            by = sorted(status.approvers - {own})
            found.append(
                GuestProposal(
                    status.consult_id,
                    rt.consults.get(status.consult_id).request.question,
                    status.guest,
                    info.name if info else "",
                    info.trust if info else "unverified",
                    NodeId.parse(by[0]).short() if by else "",
                )
            )
        return found

    async def answer_guest(self, consult_id: str, guest_node_id: str, approve: bool) -> str:
        try:
            guest = NodeId.parse(guest_node_id)
            return await self.runtime.guests.answer(consult_id, guest, approve)
        except (ConsultError, NodeError, TransportError, CryptoError) as exc:
            verb = "approved" if approve else "refused"
            raise ActionError(f"the guest was not {verb}: {exc}") from exc

    async def _invite_guests(self, consult_id: str) -> None:
        """Bring the guests both parties approved into the session this node just opened."""
        rt = self.runtime
        own = str(rt.identity.node_id)
        for status in guests.statuses(rt.consults, own, consult_id):
            if status.state != "approved":
                continue
            guest = NodeId.parse(status.guest)
            try:
                found = await rt.directory.resolve(guest, rt.now())
                if found is not None:
                    await rt.guests.invite_if_admitted(consult_id, found.record.public_key)
            except (ConsultError, NodeError, TransportError, OSError, TimeoutError) as exc:
                rt.notify(
                    f"Guest {guest.short()} of consult {consult_id[:8]} is not in the live "
                    f"session: {exc}"
                )
