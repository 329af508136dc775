"""What the TUI needs from a node: the ``NodeFacade`` protocol and its plain value types.

The app only talks to this protocol. :mod:`tui.node_facade` implements it over the
running node (store, directory, consult requests, transfers); :mod:`tui.memory` in
memory for tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from tui.imaging import Window
from tui.session import SessionView


@dataclass(frozen=True)
class NodeStatus:
    node_id: str
    display_name: str
    institution: str
    # (what, state, ok) lines: registries, mDNS, DICOM listener, TURN.
    lines: tuple[tuple[str, str, bool], ...] = ()


@dataclass(frozen=True)
class StudyInfo:
    study_uid: str
    patient: str  # pseudonymised label: never the real name on a shared screen
    date: str
    description: str
    modalities: str
    series_count: int
    instance_count: int
    # As the store holds them: de-identified on a consultant's node (sex and age are kept by
    # the share's options or not at all). DICOM text: shown through tui.safe_text only.
    patient_age: str = ""  # PatientAge as written, e.g. "045Y"
    patient_sex: str = ""  # M | F | O | ""
    accession: str = ""


@dataclass(frozen=True)
class SeriesInfo:
    series_uid: str
    study_uid: str
    number: int
    modality: str
    description: str
    instance_count: int


@dataclass(frozen=True)
class InstanceRef:
    sop_uid: str
    series_uid: str
    number: int
    present: bool = True  # False while the study is still streaming in
    frames: int = 1  # frames in a multi-frame instance, when known before loading it
    location: float | None = None  # mm along the slice normal (tui.linking), when known


@dataclass(frozen=True)
class Frame:
    pixels: npt.NDArray[Any]  # stored values, 2-D
    slope: float = 1.0
    intercept: float = 0.0
    spacing: tuple[float, float] = (1.0, 1.0)  # row_mm, col_mm
    has_spacing: bool = False
    origin: tuple[float, float, float] | None = None
    orientation: tuple[float, ...] | None = None
    window: Window | None = None  # from the file, when it has one
    frames: int = 1  # how many frames the instance holds (NumberOfFrames)
    slice_location: float | None = None  # SliceLocation, mm
    slice_thickness: float | None = None  # SliceThickness, mm

    def modality(self) -> npt.NDArray[np.float32]:
        from tui.imaging import modality_lut

        return modality_lut(self.pixels, self.slope, self.intercept)


@dataclass(frozen=True)
class ConsultItem:
    consult_id: str
    incoming: bool
    title: str
    peer: str
    priority: str  # stat | urgent | routine
    state: str
    deadline: float  # seconds since the epoch
    study_uid: str = ""
    # The peer's published name and this node's trust in its key: anyone can publish any
    # name, so it is only ever shown next to the short id (``peer``) and the trust state.
    peer_name: str = ""
    peer_trust: str = ""
    critical: bool = False  # the report is a critical result
    ack_overdue: bool = False  # reported, and not acknowledged in time
    # The requesting (or consulted) peer's published institution: a claim, like its name.
    peer_institution: str = ""
    # The study as this node holds it ("" / 0 while it is not here yet).
    modality: str = ""
    images: int = 0
    patient_age: str = ""
    patient_sex: str = ""


@dataclass(frozen=True)
class CriticalAlert:
    """A critical result received here and not acknowledged yet (the Home banner)."""

    consult_id: str
    level: int  # escalations so far (0: just arrived)
    since: float  # when it arrived, seconds since the epoch


@dataclass(frozen=True)
class PeerInfo:
    node_id: str
    name: str
    institution: str
    subspecialties: tuple[str, ...] = ()
    jurisdictions: tuple[str, ...] = ()
    online: bool = False
    trust: str = "unverified"  # verified | organisation | unverified

    def matches(self, query: str) -> bool:
        q = query.casefold().strip()
        if not q:
            return True
        hay = " ".join(
            [self.name, self.institution, *self.subspecialties, *self.jurisdictions, self.trust]
            + (["online"] if self.online else ["offline"])
        ).casefold()
        return all(word in hay for word in q.split())


@dataclass(frozen=True)
class TransferInfo:
    transfer_id: str
    peer: str
    label: str  # names the consult, never the patient
    done_bytes: int
    total_bytes: int
    direction: str = "in"  # in | out
    state: str = "running"  # offered (starting) | running | paused | complete | failed
    done_instances: int = 0
    total_instances: int = 0
    rate: float = 0.0  # bytes per second
    eta: float | None = None  # seconds


PRIORITIES = ("stat", "urgent", "routine")


@dataclass(frozen=True)
class ConsultForm:
    """What the share form collects; the node checks it again before sending."""

    study_uid: str
    peer_node_id: str
    question: str
    priority: str  # one of PRIORITIES
    subspecialty: str
    deadline_hours: float
    jurisdiction: str = ""  # the patient's country; empty: this node's country
    burned_in_checked: bool = False  # a person checked the pixels for burned-in text (audited)
    with_priors: bool = False  # send the patient's earlier studies held on this node too


@dataclass(frozen=True)
class GuestProposal:
    """A guest the other party of a consult proposed for its live session, waiting for this
    node's answer. ``title`` and ``guest_name`` are peer-written: shown as plain text."""

    consult_id: str
    title: str
    guest: str  # the guest's full node id
    guest_name: str
    guest_trust: str  # this node's trust in the guest's key
    proposed_by: str  # the proposing party's short id


@dataclass(frozen=True)
class ReportSection:
    """One headed part of a received report as the node laid it out (consult.report_text).
    Every line is peer text: shown through tui.safe_text, never as markup."""

    heading: str
    lines: tuple[str, ...]


class ActionError(Exception):
    """A worklist or share action that could not be done; the text says what to do."""


class NodeFacade(Protocol):
    def status(self) -> NodeStatus: ...
    def studies(self) -> list[StudyInfo]: ...
    def series(self, study_uid: str) -> list[SeriesInfo]: ...
    def instances(self, series_uid: str) -> list[InstanceRef]: ...

    def load_frame(self, sop_uid: str, frame: int = 0) -> Frame | None:
        """The pixels, or None while that instance has not arrived yet. May block on disk."""
        ...

    def request_first(self, sop_uid: str) -> None:
        """Ask the transfer to send this instance next (the one on screen)."""
        ...

    def consults(self) -> list[ConsultItem]: ...
    def peers(self) -> list[PeerInfo]: ...
    def transfers(self) -> list[TransferInfo]: ...
    def notifications(self) -> list[str]: ...
    def safety_number(self, peer_node_id: str) -> str: ...
    def mark_verified(self, peer_node_id: str) -> None: ...
    def open_session(self, study_uid: str) -> SessionView | None: ...

    def record_view(self, study_uid: str, live: bool) -> None:
        """Audit that this study was opened in the viewer (no patient data in the record)."""
        ...

    # Worklist and sharing. Each returns what to tell the user or raises ActionError.
    async def respond(self, consult_id: str, accept: bool, reason: str = "") -> str: ...

    def fetch(self, consult_id: str) -> str:
        """Start pulling the consult's study in the background (see transfers())."""
        ...

    def pause_transfer(self, consult_id: str) -> str:
        """Pause the consult's incoming study, or go on if it is paused."""
        ...

    def cancel_transfer(self, consult_id: str) -> str:
        """Stop the consult's incoming study (what arrived stays; f fetches the rest)."""
        ...

    async def withdraw(self, consult_id: str) -> str: ...
    async def request_consult(self, form: ConsultForm) -> str: ...

    async def cycle_availability(self) -> str:
        """Online → on call → away → online, published at once."""
        ...

    # Guests of a live session (node.app.guests): a party proposes a trusted peer, the other
    # party approves or refuses it; once both approved it is invited.
    async def propose_guest(self, consult_id: str, peer_node_id: str) -> str: ...

    def guest_proposals(self) -> list[GuestProposal]:
        """Proposals from the other party waiting for this node's answer."""
        ...

    async def answer_guest(self, consult_id: str, guest_node_id: str, approve: bool) -> str: ...

    def critical_alerts(self) -> list[CriticalAlert]: ...

    async def acknowledge(self, consult_id: str, by: str) -> str:
        """Acknowledge the report received for an outbox consult, by a named person."""
        ...

    def report(self, consult_id: str) -> list[ReportSection] | None:
        """The consult's signed report checked again now, with its signature state,
        acknowledgement and addenda; None when this node holds no report for it."""
        ...

    async def add_addendum(self, consult_id: str, text: str) -> str:
        """Consultant side: sign and send an addendum to the report this node signed (a
        signed report is final: this is the only way to amend it)."""
        ...
