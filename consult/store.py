"""The node's consult database: SQLite in the node data dir, so requests survive restarts.

Each request is stored as its canonical body (and the signed bytes when it came
from a peer); each transition is a row, written in the same transaction as the
new state, so the history and the state can never disagree after a crash.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from consult.addenda import Addendum, verify_addendum
from consult.alerts import ReportAck
from consult.errors import BadReport, LocalConsultError, MalformedMessage, UnknownConsult
from consult.requests import (
    STUDY_EVENTS,
    TRANSITIONS,
    AuditHook,
    ConsultCase,
    ConsultRequest,
    Event,
    OfferRound,
    Priority,
    Role,
    State,
    Transition,
    _no_audit,
    path_to,
)
from crypto import canonical
from crypto.identity import NodeId
from node.core.db import connect, transaction

if TYPE_CHECKING:
    from consult.report import PeerReview, Report

DB_NAME = "consult.sqlite3"
ROLES = tuple(Role)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY,
    body BLOB NOT NULL,
    wire BLOB,
    role TEXT NOT NULL,
    peer TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    priority TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS transitions (
    consult_id TEXT NOT NULL REFERENCES requests(id),
    seq INTEGER NOT NULL,
    at INTEGER NOT NULL,
    event TEXT NOT NULL,
    source TEXT NOT NULL,
    target TEXT NOT NULL,
    actor TEXT NOT NULL,
    PRIMARY KEY (consult_id, seq)
);
CREATE TABLE IF NOT EXISTS reports (
    consult_id TEXT PRIMARY KEY REFERENCES requests(id),
    wire BLOB NOT NULL,
    received_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS reviews (
    consult_id TEXT NOT NULL REFERENCES requests(id),
    reviewer TEXT NOT NULL,
    wire BLOB NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (consult_id, reviewer)
);
CREATE TABLE IF NOT EXISTS offers (
    consult_id TEXT NOT NULL REFERENCES requests(id),
    peer TEXT NOT NULL,
    declined INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (consult_id, peer)
);
CREATE TABLE IF NOT EXISTS live_guests (
    consult_id TEXT NOT NULL REFERENCES requests(id),
    guest TEXT NOT NULL,
    approver TEXT NOT NULL,
    PRIMARY KEY (consult_id, guest, approver)
);
CREATE TABLE IF NOT EXISTS live_guest_refusals (
    consult_id TEXT NOT NULL REFERENCES requests(id),
    guest TEXT NOT NULL,
    refuser TEXT NOT NULL,
    PRIMARY KEY (consult_id, guest, refuser)
);
CREATE INDEX IF NOT EXISTS requests_state ON requests(state);
CREATE TABLE IF NOT EXISTS report_acks (
    consult_id TEXT PRIMARY KEY REFERENCES requests(id),
    critical INTEGER NOT NULL,
    reported_at INTEGER NOT NULL,
    acked_at INTEGER,
    acked_by TEXT NOT NULL DEFAULT '',
    ack_wire BLOB,
    steps INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS addenda (
    consult_id TEXT NOT NULL REFERENCES reports(consult_id),
    number INTEGER NOT NULL,
    wire BLOB NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (consult_id, number)
);
"""
_PRIORITY_ORDER = {p: i for i, p in enumerate(Priority)}


@dataclass(frozen=True)
class CaseInfo:
    """Who a stored consult is between, as this node sees it."""

    role: Role
    peer: str  # the other party's node id, "" while none (a request not accepted yet)
    request_wire: bytes | None  # the signed request (None for one made offline here)

    @property
    def peer_id(self) -> NodeId | None:
        return NodeId.parse(self.peer) if self.peer else None


@dataclass(frozen=True)
class OfferAnswer:
    """What an offered consultant's accept or decline did to one of our requests."""

    transition: Transition | None  # None: the case did not move (late, or one decline of many)
    withdraw: tuple[NodeId, ...]  # consultants to tell the case is withdrawn for them


MAX_GUESTS = 32  # guests one party may approve for one consult's live session


class ConsultDB:
    def __init__(self, path: Path, audit: AuditHook = _no_audit) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = connect(path)
        self._db.executescript(_SCHEMA)
        self._audit = audit

    @classmethod
    def in_data_dir(cls, data_dir: Path, audit: AuditHook = _no_audit) -> ConsultDB:
        return cls(data_dir / DB_NAME, audit)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ConsultDB:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        with transaction(self._db):
            yield

    def add(
        self,
        request: ConsultRequest,
        *,
        role: Role | str,
        now: int,
        wire: bytes | None = None,
        peer: str = "",
    ) -> ConsultCase:
        if role not in ROLES:
            raise LocalConsultError(f"role must be one of {[r.value for r in ROLES]}, not {role!r}")
        role = Role(role)
        try:
            self._db.execute(
                "INSERT INTO requests VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    request.id,
                    canonical.encode(request.to_body()),
                    wire,
                    role.value,
                    peer,
                    State.REQUESTED.value,
                    request.priority.value,
                    request.created_at,
                    now,
                ),
            )
        except sqlite3.IntegrityError as exc:
            raise LocalConsultError(f"consult {request.id} is already on this node") from exc
        return ConsultCase(request, audit=self._audit)

    def _load(self, row: tuple[str, bytes, str]) -> ConsultCase:
        consult_id, body, state = row
        case = ConsultCase(
            ConsultRequest.from_body(canonical.decode(body)), State(state), audit=self._audit
        )
        for at, event, source, target, actor in self._db.execute(
            "SELECT at, event, source, target, actor FROM transitions "
            "WHERE consult_id = ? ORDER BY seq",
            (consult_id,),
        ):
            case.history.append(Transition(at, Event(event), State(source), State(target), actor))
        return case

    def resolve(self, id_or_prefix: str) -> str:
        """A full id from an unambiguous prefix (people type the first few characters)."""
        rows = self._db.execute(
            "SELECT id FROM requests WHERE id LIKE ? ESCAPE '\\' LIMIT 2",
            (id_or_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%",),
        ).fetchall()
        if not rows or not id_or_prefix:
            raise UnknownConsult(id_or_prefix)
        if len(rows) > 1:
            raise LocalConsultError(f"{id_or_prefix!r} matches several consults: type more of it")
        return str(rows[0][0])

    def get(self, consult_id: str) -> ConsultCase:
        row = self._db.execute(
            "SELECT id, body, state FROM requests WHERE id = ?", (consult_id,)
        ).fetchone()
        if row is None:
            raise UnknownConsult(consult_id)
        return self._load(row)

    def info(self, consult_id: str) -> CaseInfo:
        """This node's role in a stored consult, the other party, the signed request."""
        row = self._db.execute(
            "SELECT role, peer, wire FROM requests WHERE id = ?", (consult_id,)
        ).fetchone()
        if row is None:
            raise UnknownConsult(consult_id)
        return CaseInfo(Role(row[0]), row[1], None if row[2] is None else bytes(row[2]))

    def count_from(self, peer: str, state: State) -> int:
        """How many requests this node holds from ``peer`` (a node id) in ``state``."""
        row = self._db.execute(
            "SELECT COUNT(*) FROM requests WHERE role = 'consultant' AND peer = ? AND state = ?",
            (peer, state.value),
        ).fetchone()
        return int(row[0])

    def apply(self, consult_id: str, event: Event, now: int, actor: str = "") -> Transition:
        """Apply ``event`` and persist the new state and the transition atomically.

        The audit hook runs after the commit, so it never records a transition
        that a crash or a conflicting writer undid.
        """
        with self._transaction():
            transition = self._apply_locked(consult_id, event, now, actor)
        self._audit(consult_id, transition)
        return transition

    def advance(
        self,
        consult_id: str,
        target: State,
        now: int,
        actor: str = "",
        *,
        via: frozenset[Event] = STUDY_EVENTS,
    ) -> list[Transition]:
        """Bring the case to ``target`` by the events of the table that lead there
        (:func:`consult.requests.path_to`, only ``via`` events), one transaction; nothing
        when it is there already or cannot get there that way (the next step refuses)."""
        with self._transaction():
            events = path_to(self.state_of(consult_id), target, via)
            done = [self._apply_locked(consult_id, event, now, actor) for event in events]
        for transition in done:
            self._audit(consult_id, transition)
        return done

    def _apply_locked(self, consult_id: str, event: Event, now: int, actor: str) -> Transition:
        case = self.get(consult_id)
        case.audit = _no_audit
        transition = case.apply(event, now, actor)
        self._db.execute(
            "INSERT INTO transitions VALUES (?,?,?,?,?,?,?)",
            (
                consult_id,
                len(case.history),
                transition.at,
                transition.event.value,
                transition.source.value,
                transition.target.value,
                transition.actor,
            ),
        )
        self._db.execute(
            "UPDATE requests SET state = ?, updated_at = ? WHERE id = ?",
            (case.state.value, now, consult_id),
        )
        return transition

    def offer(self, consult_id: str, peers: Sequence[NodeId], now: int, actor: str = "") -> None:
        """Offer one of our requests to ``peers`` (first to accept gets it), atomically."""
        if not peers:
            raise LocalConsultError("offer a consult to at least one consultant")
        with self._transaction():
            self._db.executemany(
                "INSERT OR IGNORE INTO offers (consult_id, peer) VALUES (?,?)",
                [(consult_id, str(p)) for p in peers],
            )
            transition = self._apply_locked(consult_id, Event.OFFER, now, actor)
        self._audit(consult_id, transition)

    def offered(self, consult_id: str) -> list[NodeId]:
        rows = self._db.execute(
            "SELECT peer FROM offers WHERE consult_id = ? ORDER BY rowid", (consult_id,)
        ).fetchall()
        return [NodeId.parse(row[0]) for row in rows]

    def _offer_round(self, consult_id: str) -> OfferRound | None:
        rows = self._db.execute(
            "SELECT peer, declined FROM offers WHERE consult_id = ? ORDER BY rowid", (consult_id,)
        ).fetchall()
        if not rows:
            return None
        peer = self.info(consult_id).peer
        return OfferRound(
            consult_id,
            tuple(NodeId.parse(p) for p, _ in rows),
            NodeId.parse(peer) if peer else None,
            {NodeId.parse(p) for p, declined in rows if declined},
        )

    def answer_offer(
        self, consult_id: str, responder: NodeId, event: Event, now: int
    ) -> OfferAnswer | None:
        """Apply an offered consultant's accept or decline; None if the case has no offers.

        The first accept binds the case to that consultant and names the others
        to withdraw it from; a later accept changes nothing here and names its
        sender, who is told it was withdrawn. The case declines only once every
        consultant it was offered to has declined. One transaction, so two
        accepts arriving together cannot both win.
        """
        with self._transaction():
            offer = self._offer_round(consult_id)
            if offer is None:
                return None
            if responder not in offer.offered:
                raise LocalConsultError(
                    f"{responder.short()} may not {event.value} consult {consult_id[:8]}: "
                    "it was not offered to that node; response ignored"
                )
            transition = None
            withdraw: list[NodeId] = []
            if event is Event.DECLINE:
                offer.on_decline(responder)
                self._db.execute(
                    "UPDATE offers SET declined = 1 WHERE consult_id = ? AND peer = ?",
                    (consult_id, str(responder)),
                )
                if offer.all_declined and self.get(consult_id).state is State.OFFERED:
                    transition = self._apply_locked(consult_id, event, now, str(responder))
            elif event is Event.ACCEPT:
                if offer.winner is None and self.get(consult_id).state is not State.OFFERED:
                    withdraw = [responder]  # cancelled or expired before anyone accepted
                else:
                    won, withdraw = offer.on_accept(responder)
                    if won:
                        transition = self._apply_locked(consult_id, event, now, str(responder))
                        self._db.execute(
                            "UPDATE requests SET peer = ? WHERE id = ?",
                            (str(responder), consult_id),
                        )
            else:
                raise LocalConsultError(f"a consultant cannot {event.value} an offer")
        if transition is not None:
            self._audit(consult_id, transition)
        return OfferAnswer(transition, tuple(withdraw))

    def file_report(self, consult_id: str, wire: bytes, now: int) -> Report:
        """Verify a report that arrived for one of our requests, store it, mark the case reported.

        The report must be signed by the consultant the case was sent to (when
        known) and name this consult; state and report are committed together.
        """
        from consult.report import verify_report  # pydicom/highdicom: not for `consult list`

        info = self.info(consult_id)
        if info.role is not Role.REQUESTER:
            raise LocalConsultError(
                f"consult {consult_id[:8]} was not requested by this node: a report for it "
                "is not filed here"
            )
        report = verify_report(wire, consult_id=consult_id, consultant=info.peer_id)
        if report.study_uid != self.get(consult_id).request.study_uid:
            raise BadReport(
                f"the report for consult {consult_id[:8]} names another study than the one "
                "shared: it is not filed; ask the consultant to send it again"
            )
        with self._transaction():
            transition = self._apply_locked(consult_id, Event.REPORT, now, str(report.author))
            self._db.execute("INSERT INTO reports VALUES (?,?,?)", (consult_id, wire, now))
            self._track_ack(consult_id, report.critical, now)
        self._audit(consult_id, transition)
        return report

    def keep_sent_report(self, consult_id: str, wire: bytes, now: int, actor: str) -> Transition:
        """Consultant side: mark the case reported and keep the signed report as sent, so a
        peer review of it can be verified here later."""
        if self.info(consult_id).role is not Role.CONSULTANT:
            raise LocalConsultError(f"consult {consult_id[:8]} was not sent to this node")
        from consult.report import verify_report

        report = verify_report(wire, consult_id=consult_id)
        with self._transaction():
            transition = self._apply_locked(consult_id, Event.REPORT, now, actor)
            self._db.execute("INSERT INTO reports VALUES (?,?,?)", (consult_id, wire, now))
            self._track_ack(consult_id, report.critical, now)
        self._audit(consult_id, transition)
        return transition

    # -- addenda (consult.addenda): the only change a signed report takes ---------------
    def add_addendum(self, consult_id: str, wire: bytes, now: int) -> Addendum:
        """Verify an addendum against the report held here (its author, its exact bytes,
        the next number) and keep it. Both sides keep theirs: the consultant the ones it
        sent, the requester the ones it received."""
        report_wire = self.report_wire(consult_id)
        if report_wire is None:
            raise LocalConsultError(
                f"consult {consult_id[:8]} has no signed report on this node: "
                "an addendum amends a report, so it is not filed"
            )
        from consult.report import verify_report  # pydicom/highdicom: not for `consult list`

        info = self.info(consult_id)
        consultant = info.peer_id if info.role is Role.REQUESTER else None
        author = verify_report(report_wire, consult_id=consult_id, consultant=consultant).author
        with self._transaction():
            number = len(self.addenda_wires(consult_id)) + 1
            addendum = verify_addendum(
                wire, consult_id=consult_id, report_wire=report_wire, author=author, number=number
            )
            self._db.execute(
                "INSERT INTO addenda VALUES (?,?,?,?)", (consult_id, number, wire, now)
            )
        return addendum

    def addenda_wires(self, consult_id: str) -> list[bytes]:
        """The signed addenda of the consult's report, in order (verify with
        consult.addenda.verify_addendum)."""
        rows = self._db.execute(
            "SELECT wire FROM addenda WHERE consult_id = ? ORDER BY number", (consult_id,)
        )
        return [bytes(row[0]) for row in rows]

    # -- acknowledgement of reports (consult.alerts) ------------------------------------
    def _track_ack(self, consult_id: str, critical: bool, now: int) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO report_acks (consult_id, critical, reported_at) VALUES (?,?,?)",
            (consult_id, int(critical), now),
        )

    def acknowledge(
        self, consult_id: str, wire: bytes, by: str, now: int, actor: str
    ) -> tuple[Transition, ReportAck]:
        """Move a reported case to acknowledged and record who did it and when, atomically
        (``wire``: the signed acknowledgement as made here or received)."""
        with self._transaction():
            transition = self._apply_locked(consult_id, Event.ACKNOWLEDGE, now, actor)
            self._db.execute(
                "UPDATE report_acks SET acked_at = ?, acked_by = ?, ack_wire = ? "
                "WHERE consult_id = ?",
                (now, by, wire, consult_id),
            )
        self._audit(consult_id, transition)
        ack = self.report_ack(consult_id)
        if ack is None:
            raise LocalConsultError(f"consult {consult_id[:8]} has no report to acknowledge")
        return transition, ack

    def ack_wire(self, consult_id: str) -> bytes | None:
        row = self._db.execute(
            "SELECT ack_wire FROM report_acks WHERE consult_id = ?", (consult_id,)
        ).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    def set_steps(self, consult_id: str, steps: int) -> None:
        """Record the re-sends or escalations taken for a report (restart-safe)."""
        self._db.execute(
            "UPDATE report_acks SET steps = ? WHERE consult_id = ?", (steps, consult_id)
        )

    _ACK_SELECT = (
        "SELECT a.consult_id, r.role, r.priority, a.critical, a.reported_at, a.acked_at, "
        "a.acked_by, a.steps FROM report_acks a JOIN requests r ON r.id = a.consult_id"
    )

    @staticmethod
    def _ack_row(row: Sequence[object]) -> ReportAck:
        cid, role, prio, critical, reported, acked, by, steps = row
        return ReportAck(
            str(cid),
            Role(str(role)),
            Priority(str(prio)),
            bool(critical),
            int(str(reported)),
            None if acked is None else int(str(acked)),
            str(by),
            int(str(steps)),
        )

    def report_ack(self, consult_id: str) -> ReportAck | None:
        row = self._db.execute(self._ACK_SELECT + " WHERE a.consult_id = ?", (consult_id,))
        found = row.fetchone()
        return None if found is None else self._ack_row(found)

    def report_acks(self, *, unacknowledged: bool = False) -> list[ReportAck]:
        where = " WHERE a.acked_at IS NULL" if unacknowledged else ""
        rows = self._db.execute(self._ACK_SELECT + where + " ORDER BY a.reported_at")
        return [self._ack_row(r) for r in rows.fetchall()]

    def file_review(
        self, consult_id: str, wire: bytes, now: int, *, reviewer: NodeId | None = None
    ) -> PeerReview:
        """Verify a peer review against the report held for this consult and keep it.

        ``reviewer``, when given, is who must have signed it (the requester, on the
        consultant's node). One review per reviewer and consult: a second replaces none.
        """
        report = self.report_wire(consult_id)
        if report is None:
            raise LocalConsultError(
                f"consult {consult_id[:8]} has no report on this node: nothing to review"
            )
        from consult.report import verify_review

        review = verify_review(wire, report_wire=report)
        if review.consult_id != consult_id:
            raise BadReport(f"peer review is for consult {review.consult_id}, not {consult_id}")
        if reviewer is not None and review.reviewer != reviewer:
            raise BadReport(
                f"peer review of consult {consult_id[:8]} is signed by "
                f"{review.reviewer.short()}, not by the node that received the report"
            )
        try:
            self._db.execute(
                "INSERT INTO reviews VALUES (?,?,?,?)",
                (consult_id, str(review.reviewer), wire, now),
            )
        except sqlite3.IntegrityError as exc:
            raise LocalConsultError(
                f"{review.reviewer.short()} already reviewed consult {consult_id[:8]}"
            ) from exc
        return review

    def reviews(self, consult_id: str) -> list[PeerReview]:
        from consult.report import verify_review

        report = self.report_wire(consult_id)
        rows = self._db.execute(
            "SELECT wire FROM reviews WHERE consult_id = ? ORDER BY received_at", (consult_id,)
        ).fetchall()
        return [verify_review(bytes(r[0]), report_wire=report) for r in rows if report]

    def report_wire(self, consult_id: str) -> bytes | None:
        """The signed report as received (verify again with consult.report.verify_report)."""
        row = self._db.execute(
            "SELECT wire FROM reports WHERE consult_id = ?", (consult_id,)
        ).fetchone()
        return None if row is None else bytes(row[0])

    def parties(self, consult_id: str, own: str) -> frozenset[str]:
        """The node ids (text) entitled to a consult's live session: this node (``own``)
        and the other side (the requester, or the consultant who accepted)."""
        return frozenset({own, self.info(consult_id).peer} - {""})

    def approve_guest(self, consult_id: str, guest: str, approver: str) -> None:
        """Record that party ``approver`` agrees to ``guest`` joining the live session
        (at most MAX_GUESTS guests per approver and consult: the other party's approvals
        arrive as messages, and must not grow the database without end)."""
        self.info(consult_id)  # UnknownConsult if not here
        (count,) = self._db.execute(
            "SELECT COUNT(*) FROM live_guests WHERE consult_id = ? AND approver = ? AND guest != ?",
            (consult_id, approver, guest),
        ).fetchone()
        if count >= MAX_GUESTS:
            raise LocalConsultError(
                f"{MAX_GUESTS} guests are already approved for consult {consult_id[:8]} by "
                "that party: a live session holds far fewer people"
            )
        self._db.execute(
            "INSERT OR IGNORE INTO live_guests VALUES (?,?,?)", (consult_id, guest, approver)
        )
        self._db.execute(
            "DELETE FROM live_guest_refusals WHERE consult_id = ? AND guest = ? AND refuser = ?",
            (consult_id, guest, approver),
        )

    def guest_approvers(self, consult_id: str, guest: str) -> frozenset[str]:
        rows = self._db.execute(
            "SELECT approver FROM live_guests WHERE consult_id = ? AND guest = ?",
            (consult_id, guest),
        ).fetchall()
        return frozenset(str(r[0]) for r in rows)

    def refuse_guest(self, consult_id: str, guest: str, refuser: str) -> None:
        """Record that party ``refuser`` does not (or no longer) agree to ``guest``: its
        approval, if it gave one, is withdrawn (the guest is no longer admitted)."""
        self.info(consult_id)  # UnknownConsult if not here
        with self._transaction():
            self._db.execute(
                "DELETE FROM live_guests WHERE consult_id = ? AND guest = ? AND approver = ?",
                (consult_id, guest, refuser),
            )
            self._db.execute(
                "INSERT OR IGNORE INTO live_guest_refusals VALUES (?,?,?)",
                (consult_id, guest, refuser),
            )

    def guest_refusers(self, consult_id: str, guest: str) -> frozenset[str]:
        rows = self._db.execute(
            "SELECT refuser FROM live_guest_refusals WHERE consult_id = ? AND guest = ?",
            (consult_id, guest),
        ).fetchall()
        return frozenset(str(r[0]) for r in rows)

    def guests(self, consult_id: str | None = None) -> list[tuple[str, str]]:
        """(consult id, guest node id) of every guest proposed, approved or refused (of one
        consult, or of all), in a stable order."""
        rows = self._db.execute(
            "SELECT consult_id, guest FROM live_guests UNION "
            "SELECT consult_id, guest FROM live_guest_refusals ORDER BY 1, 2"
        ).fetchall()
        return [(str(c), str(g)) for c, g in rows if consult_id is None or c == consult_id]

    def state_of(self, consult_id: str) -> State:
        """The consult's state, read without loading its request (asked per live message)."""
        row = self._db.execute("SELECT state FROM requests WHERE id = ?", (consult_id,)).fetchone()
        if row is None:
            raise UnknownConsult(consult_id)
        return State(row[0])

    def cases(self, states: Iterable[State] | None = None) -> list[ConsultCase]:
        """Cases, most urgent first (STAT before urgent before routine), then oldest first."""
        rows = self._db.execute("SELECT id, body, state FROM requests").fetchall()
        wanted = None if states is None else {s.value for s in states}
        cases = []
        for row in rows:
            if wanted is not None and row[2] not in wanted:
                continue
            try:
                cases.append(self._load(row))
            except MalformedMessage:  # recorded before ids were checked (a path, say): never used
                continue
        cases.sort(key=lambda c: (_PRIORITY_ORDER[c.request.priority], c.request.created_at))
        return cases

    def expire_due(self, now: int) -> list[str]:
        """Expire every open request whose deadline has passed; return their ids."""
        expired = []
        for case in self.cases():
            if now > case.request.deadline and (case.state, Event.EXPIRE) in TRANSITIONS:
                self.apply(case.request.id, Event.EXPIRE, now)
                expired.append(case.request.id)
        return expired
