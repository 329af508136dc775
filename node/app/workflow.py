"""The clinical loop on a running node: share a study with a consult request, and take
the signed report back into the hospital's store and PACS.

Referring side: :func:`request_consult` (one chosen consultant) or
:func:`route_consult` (offered to several trusted, licensed, online
subspecialists found in the registries; the first to accept gets it, the
runtime withdraws it from the others) de-identifies the study (the pseudonym
map stays on this node, encrypted), records the case and sends the signed
request. When the report arrives (:func:`install` registers the handler) it is
verified against the case, re-linked to the real patient, turned into a DICOM
SR filed under the original study, stored, audited and pushed to the PACS.

Consultant side: :func:`fetch_study` pulls the shared study (one fetch per consult;
the requesting node serves one sender per consult and peer, a new fetch replacing the
old sender), and :func:`send_report` signs and sends the report (and keeps it). A
fetch cut short by a restart resumes by itself when the workflow is installed again
(:func:`unfinished_fetches`), from what its spool in ``data/transfers`` verified.

Quality control: :func:`send_review` lets a second reader on the requesting node
score the report (agree / minor / major discrepancy); the signed review is
verified against the exact report bytes, kept and audited on both nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from consult.addenda import MAX_ADDENDUM_WIRE, Addendum, report_digest
from consult.admission import GuestConsent
from consult.alerts import Acknowledgement
from consult.errors import ConsultError, IllegalTransition, LocalConsultError, MalformedMessage
from consult.report import (
    KeyImage,
    Mark,
    Measurement,
    PatientStudy,
    PeerReview,
    Report,
    Score,
    export_addendum_sr,
    export_key_images,
    export_sr,
    placeable,
    report_items,
    verify_report,
)
from consult.requests import (
    MAX_PRIORS,
    Candidate,
    ConsultRequest,
    ConsultResponse,
    Event,
    Priority,
    State,
    check_consult_id,
    rank_consultants,
    refusal,
)
from consult.shared import Annotation
from crypto import canonical
from crypto.envelope import SignedEnvelope
from crypto.identity import NodeId
from crypto.org import verify_certificate
from node.app import alerts as critical_alerts
from node.app import guests
from node.app.runtime import NodeRuntime, RuntimeError_
from node.app.transfers import Direction, Transfer
from node.core.audit import AuditKind
from node.core.config import NodeHome
from node.core.errors import NodeError
from node.core.ids import local_name
from node.dicom import pseudonyms as pair_pseudonyms
from node.dicom import sharing
from node.dicom.deid import PseudonymMap, PseudonymMapError
from node.dicom.net import send_to_pacs
from peer_transport import transfer as tr
from peer_transport.connection import ChannelLink, PeerConnection, RequestRefused
from peer_transport.errors import RemoteError, TransportError
from peer_transport.transfer.errors import TransferCancelled
from peer_transport.transfer.progress import Progress
from peer_transport.transfer.runner import (
    ProgressCallback,
    StudyReceiver,
    StudySender,
    receive_study,
    send_study,
)
from registry.client import SearchQuery
from registry.records import Availability, NodeRecord
from registry.trust import TrustState

log = logging.getLogger(__name__)

PSEUDONYM_KEY_PURPOSE = "radmesh-pseudonyms-v1"
REPORT_KIND = "consult.report"
# A study is served (and may be fetched again, e.g. after a crash) only while the case
# is in the consultant's hands.
SERVABLE = frozenset({State.ACCEPTED, State.TRANSFERRING, State.IN_REVIEW})
REVIEW_KIND = "consult.review"
ACK_KIND = "consult.ack"
FETCH_KIND = "consult.fetch"
LIVE_CONSENT_KIND = "live.consent"
# A fetch resumed at start that fails is tried again after each of these delays
# (seconds), then left to a person; its spool stays for that later attempt.
RESUME_RETRY_AFTER = (60.0, 300.0, 900.0)
WATCH_INTERVAL = 1.0  # seconds between checks that a consult being fetched is still ours


@dataclass
class _Serving:
    """Requesting side: the sender serving one consult's study to one peer."""

    task: asyncio.Task[None]
    sender: StudySender | None = None  # once the study is prepared


@dataclass
class _Fetch:
    """Consultant side: the one fetch running for a consult, and who watches it."""

    result: asyncio.Future[Progress]
    listeners: list[ProgressCallback] = field(default_factory=list)

    def progress(self, progress: Progress) -> None:
        for listener in list(self.listeners):
            listener(progress)


@dataclass
class _Desk:
    serving: dict[tuple[str, bytes], _Serving] = field(default_factory=dict)
    fetching: dict[str, _Fetch] = field(default_factory=dict)


_DESKS: weakref.WeakKeyDictionary[NodeRuntime, _Desk] = weakref.WeakKeyDictionary()


def _desk(rt: NodeRuntime) -> _Desk:
    desk = _DESKS.get(rt)
    if desk is None:
        desk = _DESKS[rt] = _Desk()
    return desk


@dataclass(frozen=True)
class Share:
    """A study as it leaves this node for one consult (de-identified unless stated)."""

    original_study_uid: str
    shared_study_uid: str
    deidentified: bool


def pseudonym_map_path(home: NodeHome, consult_id: str) -> Path:
    """Where a consult's pseudonym map lives in a home (also for a request made offline)."""
    return home.data_dir / "pseudonyms" / f"{local_name(consult_id)}.map"


def _map_path(rt: NodeRuntime, consult_id: str) -> Path:
    return pseudonym_map_path(rt.home, consult_id)


def _map_key(rt: NodeRuntime) -> bytes:
    return rt.identity.derive_key(PSEUDONYM_KEY_PURPOSE)


def share_of(rt: NodeRuntime, consult_id: str, prior: str = "") -> Share:
    """What a consult of ours shared, from the database and the pseudonym map (restart-safe):
    its study, or the ``prior`` (a shared UID the signed request lists)."""
    request = rt.consults.get(consult_id).request
    if prior and prior not in request.priors:
        raise RequestRefused("not-shared", "this study was not shared with your node")
    shared_uid = prior or request.study_uid
    path = _map_path(rt, consult_id)
    if not path.exists():
        if request.deidentified:
            # Recorded without a pseudonym map (e.g. `consult request --out`): never send
            # the identified study under a request that promises a de-identified one.
            raise RequestRefused(
                "no-pseudonyms",
                f"consult {consult_id[:8]} has no pseudonym map on the requesting node: "
                "ask the requester to send the request again from its node",
            )
        return Share(shared_uid, shared_uid, False)
    original = PseudonymMap.load(path, _map_key(rt)).relink_uid(shared_uid)
    return Share(original, shared_uid, True)


@dataclass(frozen=True)
class UidMapping:
    """The UIDs of one consult's study as this node stores them and as the consult shares
    them; a UID outside the share passes through unchanged both ways."""

    shared: Mapping[str, str] = field(default_factory=dict)  # original -> pseudonym
    local: Mapping[str, str] = field(default_factory=dict)  # pseudonym -> original

    def to_shared(self, uid: str) -> str:
        return self.shared.get(uid, uid)

    def from_shared(self, uid: str) -> str:
        return self.local.get(uid, uid)


def uid_mapping(rt: NodeRuntime, consult_id: str) -> UidMapping:
    """How this node's UIDs appear in a consult's live session.

    Only the requesting node of a de-identified share translates: every UID the share
    issued, and every UID of the original study in the store (pseudonyms are keyed and
    deterministic, so an instance not sent yet maps as it will be sent). The consultant
    and an identified share see the study under the UIDs the session uses.
    """
    path = _map_path(rt, consult_id)
    role, _, _ = rt.consults.info(consult_id)
    if role != "requester" or not path.exists():
        return UidMapping()
    pseudonyms = PseudonymMap.load(path, _map_key(rt))
    study = pseudonyms.relink_uid(rt.consults.get(consult_id).request.study_uid)
    for row in rt.store.instances(study):
        pseudonyms.pseudo_uid(row.series_uid)
        pseudonyms.pseudo_uid(row.sop_instance_uid)
    shared = dict(pseudonyms.uids)
    return UidMapping(shared, {pseudo: uid for uid, pseudo in shared.items()})


async def consultant_key(rt: NodeRuntime, consult_id: str) -> bytes | None:
    """Requesting side: the public key of the consultant who accepted the consult (None
    before anyone did, or if its address is not known here)."""
    role, peer, _ = rt.consults.info(consult_id)
    if role != "requester" or not peer:
        return None
    found = await rt.directory.resolve(NodeId.parse(peer), rt.now())
    return found.record.public_key if found is not None else None


@dataclass(frozen=True)
class Terms:
    """What a consult asks for, as the requester states it (the request adds ids and times)."""

    question: str
    priority: Priority
    subspecialty: str
    jurisdiction: str
    language: str = "en"
    deadline_seconds: int = 3600
    deidentify: bool = True
    burned_in_checked: bool = False  # a person checked the pixels (audited when it mattered)
    black_out_top: int = 0  # Clean Pixel Data: rows blacked out atop burned-in candidates
    # Earlier studies of the same patient in this node's store, sent after the study
    # (the same pseudonymous patient and date shift: one pseudonym map per consult).
    priors: tuple[str, ...] = ()


async def _new_request(
    rt: NodeRuntime, study_uid: str, terms: Terms
) -> tuple[ConsultRequest, PseudonymMap | None]:
    if not rt.store.instances(study_uid):
        raise RuntimeError_(f"study {study_uid} has no instances in this node's store")
    _check_priors(rt, study_uid, terms.priors)
    pseudonyms = PseudonymMap() if terms.deidentify else None
    now = rt.now()
    request = ConsultRequest.new(
        requester=rt.identity.node_id,
        study_uid=pseudonyms.pseudo_uid(study_uid) if pseudonyms is not None else study_uid,
        question=terms.question,
        priority=terms.priority,
        subspecialty=terms.subspecialty,
        jurisdiction=terms.jurisdiction,
        language=terms.language,
        deadline=now + terms.deadline_seconds,
        now=now,
        deidentified=terms.deidentify,
        priors=tuple(
            pseudonyms.pseudo_uid(uid) if pseudonyms is not None else uid for uid in terms.priors
        ),
    )
    if pseudonyms is not None:
        sharing.check_free_text(rt.store, study_uid, terms.question, "clinical question")
        checked = True
        for uid in (study_uid, *terms.priors):
            # reads every instance's header: off the event loop
            checked &= await asyncio.to_thread(
                sharing.confirm_burned_in,
                rt.store,
                rt.audit,
                uid,
                terms.burned_in_checked,
                now=rt.clock(),
                consult=request.id,
                black_out_top=terms.black_out_top,
            )
        pseudonyms.burned_in_checked = checked
        pseudonyms.black_out_top = terms.black_out_top
    return request, pseudonyms


def priors_in_store(rt: NodeRuntime, study_uid: str) -> tuple[str, ...]:
    """Earlier studies of the study's patient (same Patient ID) held here, most recent
    first, as many as a consult takes."""
    study = rt.store.study(study_uid)
    earlier = [
        row
        for row in rt.store.studies()
        if row.patient_id == study.patient_id
        and row.study_uid != study_uid
        and row.study_date <= study.study_date
    ]
    earlier.sort(key=lambda row: row.study_date, reverse=True)
    return tuple(row.study_uid for row in earlier[:MAX_PRIORS])


def _check_priors(rt: NodeRuntime, study_uid: str, priors: tuple[str, ...]) -> None:
    """Priors are other studies of the same patient held here (a wrong one would send
    another patient's images under this patient's pseudonym)."""
    patient = rt.store.study(study_uid).patient_id
    for uid in priors:
        if uid == study_uid or not rt.store.instances(uid):
            raise RuntimeError_(
                f"prior study {uid[:64]} is not in this node's store (or is the study itself): "
                "retrieve it first (`radmesh dicom retrieve`) or leave it out"
            )
        if rt.store.study(uid).patient_id != patient:
            raise RuntimeError_(
                f"prior study {uid[:64]} is of another patient (its Patient ID differs): "
                "only the same patient's earlier studies go with a consult"
            )


async def _offer(
    rt: NodeRuntime,
    request: ConsultRequest,
    pseudonyms: PseudonymMap | None,
    original_uid: str,
    consultants: list[bytes],
) -> tuple[Share, dict[NodeId, str]]:
    """Record the request, offer it to ``consultants`` and send it to each of them.

    Returns how each was reached; one unreachable consultant does not stop the
    others (its copy waits in a registry mailbox when one took it).
    """
    if pseudonyms is not None:
        pseudonyms.persist(_map_path(rt, request.id), _map_key(rt))
    wire = request.to_wire(rt.identity)
    now = rt.now()
    peers = [NodeId.from_public_key(key) for key in consultants]
    rt.consults.add(request, role="requester", now=now, wire=wire)
    rt.consults.offer(request.id, peers, now, str(rt.identity.node_id))
    sent: dict[NodeId, str] = {}
    for key, peer in zip(consultants, peers, strict=True):
        rt.audit.append(
            AuditKind.SHARE,
            now=rt.clock(),
            study_uid=original_uid,
            peer=str(peer),
            details={"consult": request.id, "deidentified": str(pseudonyms is not None)},
        )
        try:
            sent[peer] = await rt.send_message(key, "consult.request", wire)
        except RuntimeError_ as exc:
            sent[peer] = f"not sent: {exc}"
    return Share(original_uid, request.study_uid, pseudonyms is not None), sent


async def request_consult(
    rt: NodeRuntime,
    consultant: bytes,
    study_uid: str,
    terms: Terms,
) -> tuple[ConsultRequest, Share, str]:
    """Record and send a consult request to one chosen consultant; returns
    (request, share, how sent).

    The study is de-identified when the consultant fetches it; the pseudonym map
    (with its secret, so every instance maps the same way) is made now and stays
    here, encrypted.
    """
    request, pseudonyms = await _new_request(rt, study_uid, terms)
    share, sent = await _offer(rt, request, pseudonyms, study_uid, [consultant])
    how = next(iter(sent.values()))
    if how.startswith("not sent: "):
        raise RuntimeError_(how.removeprefix("not sent: "))
    return request, share, how


def _candidate(rt: NodeRuntime, record: NodeRecord, now: int) -> Candidate | None:
    """A registry record as a routing candidate, or None if its key is not trusted here.

    Subspecialties and licences come from the organisation certificate when one
    we trust vouches for the node, else from the node's own record (its key was
    verified by a person).
    """
    key, cert = record.public_key, record.org_certificate
    state = rt.trust.state(key, now, cert)
    if state not in (TrustState.VERIFIED, TrustState.TRUSTED_BY_ORG):
        return None
    subspecialties, jurisdictions = record.subspecialties, record.jurisdictions
    if state is TrustState.TRUSTED_BY_ORG:
        # The certificate that made it trusted: the record's, else the one kept earlier
        # (a record without it must not claim what no organisation attested).
        attested = verify_certificate(
            cert if cert is not None else (rt.trust.certificate(key) or b""),
            trusted_orgs=rt.trust.trusted_orgs(),
            now=now,
            revocations=rt.trust.revocation_lists(),
            node_key=key,
        )
        subspecialties, jurisdictions = attested.subspecialties, attested.jurisdictions
    return Candidate(
        record.node_id,
        record.display_name,
        subspecialties,
        jurisdictions,
        record.languages,
        online=record.availability is Availability.ONLINE,  # ranked before on-call ones
        available=record.availability is not Availability.AWAY,
    )


async def find_consultants(rt: NodeRuntime, request: ConsultRequest) -> list[NodeRecord]:
    """Trusted consultants online or on call now with the wanted subspecialty and a licence for the
    request's jurisdiction, from every registry and the LAN, best first."""
    now = rt.now()
    query = SearchQuery(request.subspecialty, request.jurisdiction, online=True, on_call=True)
    records = {p.record.node_id: p.record for p in await rt.directory.search(query, now)}
    candidates = [c for r in records.values() if (c := _candidate(rt, r, now)) is not None]
    return [records[c.node_id] for c in rank_consultants(request, candidates)]


async def route_consult(
    rt: NodeRuntime,
    study_uid: str,
    terms: Terms,
    *,
    max_offers: int = 3,
) -> tuple[ConsultRequest, Share, dict[NodeId, str]]:
    """Offer a consult to up to ``max_offers`` matching trusted consultants; the first to
    accept gets it and the others are told it is withdrawn (see the response handler).

    Returns (request, share, how each offered consultant was reached).
    """
    request, pseudonyms = await _new_request(rt, study_uid, terms)
    ranked = await find_consultants(rt, request)
    if max_offers < 1:
        raise LocalConsultError("offer a consult to at least one consultant (--max-offers)")
    if not ranked:
        raise LocalConsultError(
            f"no trusted consultant online with subspecialty {request.subspecialty!r} and a "
            f"licence for {request.jurisdiction}: verify more peers (`radmesh peers`), widen "
            "the subspecialty, or send it to a chosen peer with --to"
        )
    chosen = [r.public_key for r in ranked[:max_offers]]
    share, sent = await _offer(rt, request, pseudonyms, study_uid, chosen)
    return request, share, sent


def _signed_consult_id(wire: bytes, what: str = "report") -> str:
    body = canonical.decode(SignedEnvelope.from_wire(wire).payload)
    consult_id = body.get("consult") if isinstance(body, dict) else None
    if not isinstance(consult_id, str):
        raise LocalConsultError(f"{what} does not name its consult")
    return check_consult_id(consult_id, what)  # a whole id: never resolved as a prefix


def _patient_of(rt: NodeRuntime, study_uid: str) -> PatientStudy:
    row = rt.store.study(study_uid)
    return PatientStudy(
        patient_name=row.patient_name,
        patient_id=row.patient_id,
        patient_birth_date=row.patient_birth_date,
        patient_sex=row.patient_sex,
        accession_number=row.accession_number,
        study_date=row.study_date,
        study_time=row.study_time,
    )


def _key_images_document(
    rt: NodeRuntime,
    report: Report,
    relink: Callable[[str], str],
    patient: PatientStudy,
    sender: NodeId,
) -> list[bytes]:
    """The report's key images as a KOS filed beside the SR (none when it has none)."""
    kos = export_key_images(
        report, relink_uid=relink, patient=patient, institution=rt.config.institution
    )
    if kos is None:
        return []
    rt.store.add_bytes(kos, source=f"report:{sender}")
    return [kos]


def _placeable(rt: NodeRuntime, report: Report, relink: Callable[[str], str]) -> Report:
    """The report without image references the pseudonym map cannot re-link (said so)."""

    def known(uid: str) -> bool:
        try:
            relink(uid)
        except PseudonymMapError:
            return False
        return True

    kept, dropped = placeable(report, known)
    if dropped:
        rt.notify(
            f"The report of consult {report.consult_id[:8]} names {dropped} image(s) that are "
            "not in the study shared: the SR leaves those references out"
        )
    return kept


async def _on_report(sender: NodeId, kind: str, wire: bytes, rt: NodeRuntime) -> None:
    consult_id = rt.consults.resolve(_signed_consult_id(wire))
    if rt.consults.report_wire(consult_id) is not None:
        await _on_report_again(sender, consult_id, wire, rt)
        return
    case = rt.consults.get(consult_id)
    # The requester's copy moves to review once the consultant had the study.
    if case.state is State.ACCEPTED:
        rt.consults.apply(consult_id, Event.BEGIN_REVIEW, rt.now(), str(sender))
    elif case.state is State.TRANSFERRING:
        rt.consults.apply(consult_id, Event.TRANSFER_DONE, rt.now(), str(sender))
    report = rt.consults.file_report(consult_id, wire, rt.now())
    alerts = critical_alerts.alerts_of(rt)
    if report.critical and alerts is not None:  # first, before the SR export and PACS push
        alerts.raise_alert(consult_id)
    map_path = _map_path(rt, consult_id)
    pseudonyms = PseudonymMap.load(map_path, _map_key(rt)) if map_path.exists() else None
    relink: Callable[[str], str] = (
        pseudonyms.relink_uid if pseudonyms is not None else (lambda uid: uid)
    )
    original_study = relink(report.study_uid)
    patient = _patient_of(rt, original_study)
    report = _placeable(rt, report, relink)
    sr = export_sr(report, relink_uid=relink, patient=patient, institution=rt.config.institution)
    stored = rt.store.add_bytes(sr, source=f"report:{sender}")
    documents = [sr, *_key_images_document(rt, report, relink, patient, sender)]
    rt.audit.append(
        AuditKind.REPORT,
        now=rt.clock(),
        study_uid=original_study,
        peer=str(sender),
        details={"consult": consult_id, "sr": stored.sop_instance_uid},
    )
    rt.reports[consult_id] = stored.sop_instance_uid
    rt.notify(f"Report for consult {consult_id[:8]} from {sender.short()} filed as DICOM SR")
    dicom = rt.config.dicom
    if dicom.pacs_host and dicom.pacs_port:
        result = await asyncio.to_thread(
            send_to_pacs,
            documents,
            dicom.pacs_host,
            dicom.pacs_port,
            dicom.pacs_ae_title,
            dicom.ae_title,
        )
        rt.audit.append(
            AuditKind.EXPORT,
            now=rt.clock(),
            study_uid=original_study,
            details={"to": f"pacs:{dicom.pacs_ae_title}", "ok": str(result.ok)},
        )
        rt.notify(
            f"Report SR sent to the PACS ({dicom.pacs_ae_title})"
            if result.ok
            else f"Report SR NOT accepted by the PACS: {result.failed}"
        )


def report_items_of(
    rt: NodeRuntime, consult_id: str, annotations: Iterable[Annotation]
) -> tuple[tuple[Measurement, ...], tuple[Mark, ...]]:
    """Consultant side: a session's annotations as report measurements and marks, each on
    the image it was drawn on (series and SOP class from this node's copy of the study)."""
    study_uid = rt.consults.get(rt.consults.resolve(consult_id)).request.study_uid
    rows = {row.sop_instance_uid: row for row in rt.store.instances(study_uid)}

    def image_of(sop_uid: str, frame: int) -> KeyImage | None:
        row = rows.get(sop_uid)
        if row is None or frame >= max(row.frames, 1):
            return None
        number = frame + 1 if row.frames > 1 else None  # DICOM frames count from 1
        return KeyImage(row.series_uid, row.sop_class_uid, sop_uid, number, row.instance_number)

    return report_items(annotations, image_of)


async def send_report(
    rt: NodeRuntime,
    consult_id: str,
    *,
    text: str,
    impression: str,
    measurements: tuple[Measurement, ...] = (),
    key_images: tuple[KeyImage, ...] = (),
    marks: tuple[Mark, ...] = (),
    critical: bool = False,
) -> Report:
    """Consultant side: sign the report and send it to the requesting node (a critical
    one is re-sent on a timer until acknowledged: :mod:`node.app.alerts`)."""
    consult_id = rt.consults.resolve(consult_id)
    if rt.consults.report_wire(consult_id) is not None:  # signed is final
        raise LocalConsultError(
            f"consult {consult_id[:8]} already has a signed report: it cannot be changed or "
            'replaced; amend it with `radmesh consult addendum ID --text "..."`'
        )
    case = rt.consults.get(consult_id)
    if case.state is State.ACCEPTED:
        rt.consults.apply(consult_id, Event.BEGIN_REVIEW, rt.now(), str(rt.identity.node_id))
    report = Report(
        consult_id=consult_id,
        study_uid=case.request.study_uid,
        author=rt.identity.node_id,
        author_name=rt.config.display_name,
        text=text,
        impression=impression,
        measurements=measurements,
        key_images=key_images,
        finalised_at=rt.now(),
        marks=marks,
        author_institution=rt.config.institution,
        critical=critical,
    )
    wire = report.sign(rt.identity)
    rt.consults.keep_sent_report(consult_id, wire, rt.now(), str(rt.identity.node_id))
    try:
        await rt.send_message(requester_key(rt, consult_id), REPORT_KIND, wire)
    except RuntimeError_ as exc:
        if not critical:
            raise
        raise RuntimeError_(
            f"{exc} The critical report is kept and sent again every "
            f"{rt.config.alerts.critical_repeat_minutes} min until it is acknowledged; "
            "phone the referring team now"
        ) from exc
    return report


def _audit_review(rt: NodeRuntime, review: PeerReview, peer: NodeId) -> None:
    rt.audit.append(
        AuditKind.CONSULT,
        now=rt.clock(),
        peer=str(peer),
        details={
            "consult": review.consult_id,
            "event": "review",
            "score": review.score.value,
            "reviewer": str(review.reviewer),
        },
    )


async def send_review(rt: NodeRuntime, consult_id: str, score: Score, comment: str = "") -> str:
    """Requesting side, the QA step: a second reader here scores the received report; the
    signed review is kept and audited here and sent to the report's author. Returns how."""
    consult_id = rt.consults.resolve(consult_id)
    role, _, _ = rt.consults.info(consult_id)
    report = rt.consults.report_wire(consult_id)
    if role != "requester" or report is None:
        raise LocalConsultError(
            f"consult {consult_id[:8]} has no report received by this node: only the "
            "requesting node reviews the report it got back"
        )
    review = PeerReview(
        consult_id,
        PeerReview.digest(report),
        rt.identity.node_id,
        score,
        comment,
        rt.now(),
    )
    wire = review.sign(rt.identity)
    rt.consults.file_review(consult_id, wire, rt.now(), reviewer=rt.identity.node_id)
    author = _signer(report)
    _audit_review(rt, review, NodeId.from_public_key(author))
    return await rt.send_message(author, REVIEW_KIND, wire)


async def _on_review(sender: NodeId, wire: bytes, rt: NodeRuntime) -> None:
    """Consultant side: a review of a report we sent, from the node we sent it to."""
    consult_id = rt.consults.resolve(_signed_consult_id(wire, "review"))
    role, peer, _ = rt.consults.info(consult_id)
    if role != "consultant" or NodeId.parse(peer) != sender:
        raise LocalConsultError(
            f"a review of consult {consult_id[:8]} from {sender.short()}, who did not ask "
            "for it: ignored"
        )
    review = rt.consults.file_review(consult_id, wire, rt.now(), reviewer=sender)
    _audit_review(rt, review, sender)
    rt.notify(
        f"{sender.short()} reviewed your report on consult {consult_id[:8]}: "
        f"{review.score.value.replace('_', ' ')}"
    )


async def _on_report_again(sender: NodeId, consult_id: str, wire: bytes, rt: NodeRuntime) -> None:
    """A report already filed here came again (the consultant's node re-sends a critical
    result until it hears the acknowledgement): answer with the acknowledgement if one
    was made; never file it twice."""
    if wire != rt.consults.report_wire(consult_id):
        raise LocalConsultError(
            f"a second, different report for consult {consult_id[:8]} from {sender.short()} "
            "was not filed: ask the consultant to call"
        )
    ack = rt.consults.ack_wire(consult_id)
    if ack is not None:
        await rt.send_message(_signer(wire), ACK_KIND, ack)
    else:
        rt.notify(f"The critical result on consult {consult_id[:8]} came again: acknowledge it")


async def acknowledge(rt: NodeRuntime, consult_id: str, by: str = "") -> tuple[str, int]:
    """Requesting side: acknowledge receipt of the report (by a named person: required for
    a critical result), record the time to acknowledgement, tell the report's author.

    Returns (how the author was told, seconds from arrival to acknowledgement).
    """
    consult_id = rt.consults.resolve(consult_id)
    role, _, _ = rt.consults.info(consult_id)
    report_wire = rt.consults.report_wire(consult_id)
    row = rt.consults.report_ack(consult_id)
    if role != "requester" or report_wire is None or row is None:
        raise LocalConsultError(
            f"consult {consult_id[:8]} has no report received by this node: only the "
            "requesting node acknowledges the report it got back"
        )
    by = " ".join(by.split())
    if row.critical and not by:
        raise LocalConsultError(
            f"consult {consult_id[:8]} is a critical result: say who takes it on, "
            f'with --by "Dr Name"'
        )
    now = rt.now()
    ack = Acknowledgement(consult_id, rt.identity.node_id, Acknowledgement.digest(report_wire),
                          by, now)  # fmt: skip
    wire = ack.to_wire(rt.identity)
    _, done = rt.consults.acknowledge(consult_id, wire, by, now, str(rt.identity.node_id))
    seconds = done.time_to_ack or 0
    rt.audit.append(
        AuditKind.CONSULT,
        now=rt.clock(),
        details={"consult": consult_id, "event": "report-acknowledged", "by": by,
                 "critical": row.critical, "time_to_ack_s": seconds},
    )  # fmt: skip
    try:
        how = await rt.send_message(_signer(report_wire), ACK_KIND, wire)
    except NodeError as exc:  # kept here; sent again when the report is re-sent
        how = f"not sent now ({exc})"
    return how, seconds


async def _on_ack(sender: NodeId, wire: bytes, rt: NodeRuntime) -> None:
    """Consultant side: the requesting node acknowledged the report we sent."""
    ack = Acknowledgement.from_wire(wire)
    consult_id = rt.consults.resolve(ack.consult_id)
    role, _, _ = rt.consults.info(consult_id)
    report = rt.consults.report_wire(consult_id)
    if role != "consultant" or sender != ack.requester or report is None:
        raise LocalConsultError(f"an acknowledgement from {sender.short()} was ignored")
    if ack.requester != NodeId.from_public_key(requester_key(rt, consult_id)):
        raise LocalConsultError(
            f"consult {consult_id[:8]} was acknowledged by {sender.short()}, who did not ask "
            "for it: ignored"
        )
    if ack.report_sha256 != Acknowledgement.digest(report):
        raise LocalConsultError(f"an acknowledgement of another report of {consult_id[:8]}")
    if rt.consults.get(consult_id).state is State.ACKNOWLEDGED:
        return  # a repeat, answering a re-sent report
    _, done = rt.consults.acknowledge(consult_id, wire, ack.by, rt.now(), str(sender))
    rt.audit.append(
        AuditKind.CONSULT,
        now=rt.clock(),
        peer=str(sender),
        details={"consult": consult_id, "event": "report-acknowledged", "by": ack.by,
                 "critical": done.critical, "time_to_ack_s": done.time_to_ack or 0},
    )  # fmt: skip
    rt.notify(
        f"Report on consult {consult_id[:8]} acknowledged"
        + (f" by {ack.by}" if ack.by else "")
        + f" after {(done.time_to_ack or 0) // 60} min"
    )


async def resend_report(rt: NodeRuntime, consult_id: str) -> str:
    """Consultant side: send the kept signed report again (a critical result not yet
    acknowledged)."""
    wire = rt.consults.report_wire(consult_id)
    if wire is None:
        raise LocalConsultError(f"consult {consult_id[:8]} has no report sent from this node")
    how = await rt.send_message(requester_key(rt, consult_id), REPORT_KIND, wire)
    await resend_addenda(rt, consult_id)
    return how


def requester_key(rt: NodeRuntime, consult_id: str) -> bytes:
    """The requesting node's public key: the signer of the request we received."""
    _, _, wire = rt.consults.info(consult_id)
    if wire is None:
        raise RuntimeError_(f"consult {consult_id[:8]} has no signed request on this node")
    return _signer(wire)


async def respond(rt: NodeRuntime, consult_id: str, event: Event, reason: str = "") -> State:
    """Consultant side: accept or decline a request and tell the requesting node."""
    consult_id = rt.consults.resolve(consult_id)
    role, _, _ = rt.consults.info(consult_id)
    if role != "consultant":
        raise LocalConsultError(f"consult {consult_id[:8]} was not sent to this node")
    transition = rt.consults.apply(consult_id, event, rt.now(), str(rt.identity.node_id))
    response = ConsultResponse(consult_id, rt.identity.node_id, event, rt.now(), reason)
    await rt.send_message(
        requester_key(rt, consult_id), "consult.response", response.to_wire(rt.identity)
    )
    return transition.target


async def withdraw(
    rt: NodeRuntime, consult_id: str, reason: str = "withdrawn by the requester"
) -> list[NodeId]:
    """Requester side: withdraw a request and tell every consultant it went to.

    Returns the consultants that could not be told now (their copy expires at the
    deadline; a later accept from them is answered with a withdrawal).
    """
    consult_id = rt.consults.resolve(consult_id)
    role, peer, _ = rt.consults.info(consult_id)
    if role != "requester":
        raise LocalConsultError(
            f"consult {consult_id[:8]} was sent to this node; only the requesting node withdraws it"
        )
    rt.consults.apply(consult_id, Event.WITHDRAW, rt.now(), str(rt.identity.node_id))
    _stop_serving(rt, consult_id, "the consult was withdrawn by the requester", tell=True)
    rt.live_hub().recheck(consult_id)  # nobody stays in its live session
    told = {NodeId.parse(peer)} if peer else set()
    told.update(rt.consults.offered(consult_id))
    return [p for p in told if not await rt.send_withdrawal(consult_id, p, reason)]


async def approve_live_guest(rt: NodeRuntime, consult_id: str, guest: bytes) -> str:
    """Either party: agree that ``guest`` (a public key) joins the consult's live session,
    and tell the other party. A guest is admitted once both parties agreed (one of them
    then invites it); see :mod:`consult.admission`. Returns how the other party was told."""
    consult_id = rt.consults.resolve(consult_id)
    guest_id = NodeId.from_public_key(guest)
    rt.consults.approve_guest(consult_id, str(guest_id), str(rt.identity.node_id))
    rt.audit.append(
        AuditKind.CONSULT,
        now=rt.clock(),
        peer=str(guest_id),
        details={"consult": consult_id, "event": "live-guest-approved"},
    )
    role, peer, _ = rt.consults.info(consult_id)
    if not peer:
        return "no other party yet"
    other = (
        requester_key(rt, consult_id)
        if role == "consultant"
        else await consultant_key(rt, consult_id)
    )
    if other is None:
        raise RuntimeError_(f"the other party of consult {consult_id[:8]} cannot be reached now")
    return await rt.send_message(
        other, LIVE_CONSENT_KIND, GuestConsent(consult_id, guest).to_wire()
    )


async def _on_live_consent(sender: NodeId, wire: bytes, rt: NodeRuntime) -> None:
    consent = GuestConsent.from_wire(wire)
    role, peer, _ = rt.consults.info(consent.consult_id)
    if not peer or NodeId.parse(peer) != sender:
        raise RuntimeError_(
            f"a guest approval for consult {consent.consult_id[:8]} from {sender.short()}, "
            "who is not its other party, was ignored"
        )
    # Checked per message like every other kind: a party revoked since does not approve.
    key = (
        requester_key(rt, consent.consult_id)
        if role == "consultant"
        else await consultant_key(rt, consent.consult_id)
    )
    if (
        key is None
        or NodeId.from_public_key(key) != sender
        or not rt.trust.is_trusted(key, rt.now())
    ):
        raise RuntimeError_(
            f"a guest approval for consult {consent.consult_id[:8]} from {sender.short()}, "
            "not trusted by this node, was ignored"
        )
    guest = NodeId.from_public_key(consent.guest)
    rt.consults.approve_guest(consent.consult_id, str(guest), str(sender))
    rt.audit.append(
        AuditKind.CONSULT,
        now=rt.clock(),
        peer=str(guest),
        details={"consult": consent.consult_id, "event": "live-guest-approved", "by": str(sender)},
    )
    rt.notify(
        f"{sender.short()} approved {guest.short()} as a guest of the live session on "
        f"consult {consent.consult_id[:8]}"
    )
    guests.after_consent(rt, consent.consult_id, consent.guest, sender)  # ask, or invite


def install(rt: NodeRuntime, *, resume: bool = True) -> None:
    """Register the workflow's message handlers on a started runtime, and (``resume``)
    resume in the background the fetches a restart cut short (:func:`unfinished_fetches`);
    a node brought up for one command does not: it would stop them seconds later."""

    async def on_report(sender: NodeId, kind: str, wire: bytes) -> None:
        if not rt.trust.is_trusted(_signer(wire), rt.now()):
            raise RuntimeError_(f"report from untrusted {sender.short()} ignored")
        try:
            await _on_report(sender, kind, wire, rt)
        except ConsultError as exc:
            rt.notify(f"A report from {sender.short()} was refused: {exc}")
            raise

    rt.handlers[REPORT_KIND] = on_report

    async def on_review(sender: NodeId, kind: str, wire: bytes) -> None:
        if not rt.trust.is_trusted(_signer(wire), rt.now()):
            raise RuntimeError_(f"review from untrusted {sender.short()} ignored")
        try:
            await _on_review(sender, wire, rt)
        except ConsultError as exc:
            rt.notify(f"A review from {sender.short()} was refused: {exc}")
            raise

    rt.handlers[REVIEW_KIND] = on_review

    async def on_live_consent(sender: NodeId, kind: str, wire: bytes) -> None:
        await _on_live_consent(sender, wire, rt)

    rt.handlers[LIVE_CONSENT_KIND] = on_live_consent
    guests.install(rt)  # live.refuse: the other party refused a guest

    async def on_ack(sender: NodeId, kind: str, wire: bytes) -> None:
        if not rt.trust.is_trusted(_signer(wire), rt.now()):
            raise RuntimeError_(f"acknowledgement from untrusted {sender.short()} ignored")
        await _on_ack(sender, wire, rt)

    rt.handlers[ACK_KIND] = on_ack
    install_addenda(rt)
    critical_alerts.start(rt, lambda consult_id: resend_report(rt, consult_id), timer=resume)

    async def on_fetch(conn: PeerConnection, body: bytes) -> bytes:
        if not rt.trust.is_trusted(conn.peer, rt.now()):  # checked per request, not per link
            raise RequestRefused("not-trusted", "this node no longer trusts your node")
        # "<consult id>" for its study, "<consult id>\n<prior's shared UID>" for a prior
        named, _, prior = body.decode(errors="replace").partition("\n")
        try:  # the peer names a whole consult id, never a prefix of one
            consult_id = rt.consults.resolve(check_consult_id(named))
        except ConsultError as exc:
            raise RequestRefused("not-shared", "this study was not shared with your node") from exc
        role, peer, _ = rt.consults.info(consult_id)
        if role != "requester" or not peer or NodeId.parse(peer) != conn.peer_id:
            raise RequestRefused("not-shared", "this study was not shared with your node")
        case = rt.consults.get(consult_id)
        if case.state not in SERVABLE:
            raise RequestRefused(
                "not-servable", f"consult {consult_id[:8]} is {case.state.value}, not accepted"
            )
        if case.state is State.ACCEPTED:
            rt.consults.apply(consult_id, Event.START_TRANSFER, rt.now(), peer)
        _start_serving(rt, conn, consult_id, share_of(rt, consult_id, prior))
        return b"ok"

    rt.transport.handle(FETCH_KIND, on_fetch)
    for consult_id in unfinished_fetches(rt) if resume else ():
        rt.spawn(_resume(rt, consult_id))


def _deidentifier(rt: NodeRuntime, consult_id: str) -> Callable[[Iterable[bytes]], Iterator[bytes]]:
    _, consultant, _ = rt.consults.info(consult_id)  # here: prepare runs in another thread

    def prepare(files: Iterable[bytes]) -> Iterator[bytes]:
        # One file at a time (send_study streams); one context keeps the pseudonyms
        # consistent, and the map is saved once every instance UID is in it.
        path = _map_path(rt, consult_id)
        pseudonyms = PseudonymMap.load(path, _map_key(rt))
        if consultant:  # the same patient to the same consultant: the same pseudonym
            pair_pseudonyms.bind_to_consultant(
                pseudonyms,
                rt.home.data_dir,
                rt.identity.derive_key(pair_pseudonyms.LINKAGE_KEY_PURPOSE),
                consultant,
            )
        options = sharing.options_of(rt.config.sharing)
        yield from sharing.deidentifier(pseudonyms, path, _map_key(rt), options)(files)

    return prepare


def _start_serving(rt: NodeRuntime, conn: PeerConnection, consult_id: str, share: Share) -> None:
    """Serve the study to ``conn``'s peer, replacing a sender already serving it this
    consult (the peer fetched again: restarted, or asked twice).

    Replacing rather than re-attaching the old sender: the manifest and its transfer
    id derive from the content (de-identification is keyed and deterministic), so a
    new sender offers the same transfer and the peer resumes from its spool; and the
    old sender may be bound to a connection that is gone. The cost is preparing the
    study again.
    """
    _stop_serving(rt, consult_id, "replaced by a new fetch from the peer", peer=conn.peer)
    desk, key = _desk(rt), (consult_id, conn.peer)
    serving = _Serving(asyncio.ensure_future(_serve(rt, conn, consult_id, share)))
    desk.serving[key] = serving
    serving.task.add_done_callback(
        lambda _t: desk.serving.pop(key) if desk.serving.get(key) is serving else None
    )
    rt.spawn(serving.task)


def _stop_serving(
    rt: NodeRuntime, consult_id: str, reason: str, *, peer: bytes | None = None, tell: bool = False
) -> None:
    """End the senders of a consult's study (to ``peer`` only, if given); ``tell`` the
    receiving peer its transfer is cancelled (a withdrawal), so it stops asking."""
    desk = _desk(rt)
    for key, serving in list(desk.serving.items()):
        if key[0] != consult_id or peer not in (None, key[1]):
            continue
        del desk.serving[key]
        serving.task.cancel(reason)
        sender = serving.sender
        if tell and sender is not None:
            cancel = tr.Cancel(sender.study.manifest.transfer_id, reason)
            rt.spawn(_tell(sender, cancel))


async def _tell(sender: StudySender, cancel: tr.Cancel) -> None:
    with contextlib.suppress(TransportError):
        await sender.link.send_control(tr.to_wire(cancel))


async def _serve(rt: NodeRuntime, conn: PeerConnection, consult_id: str, share: Share) -> None:
    def on_sender(sender: StudySender) -> None:
        tracked.attach_sender(sender)
        serving = _desk(rt).serving.get((consult_id, conn.peer))
        if serving is not None:
            serving.sender = sender

    try:
        with rt.transfers.track(consult_id, Direction.OUT, conn.peer_id.short()) as tracked:
            await send_study(
                ChannelLink(conn),
                rt.store,
                share.original_study_uid,
                rt.identity,
                peer=str(conn.peer_id),
                audit=rt.audit,
                prepare=_deidentifier(rt, consult_id) if share.deidentified else None,
                on_sender=on_sender,
                spool_dir=rt.home.data_dir / "outgoing",
            )
    except (NodeError, TransportError) as exc:
        rt.notify(f"Sending the study for consult {consult_id[:8]} failed: {exc}")


def _spool_of(rt: NodeRuntime, consult_id: str) -> Path:
    # Named by a hash: a consult id came from a peer, and a peer's string is never a path.
    return rt.home.data_dir / "transfers" / f"consult-{local_name(consult_id)}"


def _still_ours(rt: NodeRuntime, consult_id: str) -> bool:
    """Consultant side: the consult is ours and its study may still be fetched."""
    try:
        role, _, _ = rt.consults.info(consult_id)
        return role == "consultant" and rt.consults.get(consult_id).state in SERVABLE
    except ConsultError:
        return False


async def fetch_study(
    rt: NodeRuntime, consult_id: str, on_progress: ProgressCallback | None = None
) -> Progress:
    """Consultant side: pull the shared study of an accepted consult into this node's store.

    One fetch per consult runs, in the runtime's background tasks: a second call while
    one runs (a second `f`, a command during an automatic resume) waits for the same
    fetch and gets its progress too. What was verified stays in the consult's spool
    until the study is complete, for the next attempt.
    """
    consult_id = rt.consults.resolve(consult_id)
    desk = _desk(rt)
    fetch = desk.fetching.get(consult_id)
    if fetch is None:
        state = rt.consults.get(consult_id).state
        if state not in SERVABLE:
            raise IllegalTransition(  # in the user's words, with the command to run
                state.value,
                Event.START_TRANSFER.value,
                refusal(state, Event.START_TRANSFER, consult_id[:8]),
            )
        requester_key(rt, consult_id)  # raises now for a consult with no signed request
        fetch = desk.fetching[consult_id] = _Fetch(asyncio.get_running_loop().create_future())
        fetch.result.add_done_callback(_retrieved)
        rt.spawn(_fetch(rt, consult_id, fetch))
    if on_progress is not None:
        fetch.listeners.append(on_progress)
    try:
        return await asyncio.shield(fetch.result)
    finally:
        if on_progress in fetch.listeners:
            fetch.listeners.remove(on_progress)


def _retrieved(result: asyncio.Future[Progress]) -> None:
    if not result.cancelled():
        result.exception()  # every waiter may be gone: no "never retrieved" warning


async def _fetch(rt: NodeRuntime, consult_id: str, fetch: _Fetch) -> None:
    try:
        fetch.result.set_result(await _pull(rt, consult_id, fetch.progress))
        shutil.rmtree(_spool_of(rt, consult_id), ignore_errors=True)  # emptied by then
    except Exception as exc:  # for the waiters, whatever it was
        fetch.result.set_exception(exc)
        # Withdrawn, or cancelled by the user: not resumed at the next start. What was
        # stored stays, so a new fetch brings only the rest.
        if isinstance(exc, TransferCancelled) or not _still_ours(rt, consult_id):
            shutil.rmtree(_spool_of(rt, consult_id), ignore_errors=True)
    finally:
        _desk(rt).fetching.pop(consult_id, None)
        fetch.result.cancel()  # no-op once set; wakes the waiters if the node stopped


async def _pull(rt: NodeRuntime, consult_id: str, on_progress: ProgressCallback) -> Progress:
    requester = requester_key(rt, consult_id)
    with rt.transfers.track(
        consult_id, Direction.IN, NodeId.from_public_key(requester).short()
    ) as tracked:
        conn = await rt.transport.connect(requester)
        if rt.consults.get(consult_id).state is State.ACCEPTED:
            rt.consults.apply(consult_id, Event.START_TRANSFER, rt.now(), str(rt.identity.node_id))
        # the study as this consult shares it: another consult's transfer with the same node
        # may run on this connection meanwhile
        study = rt.consults.get(consult_id).request.study_uid
        progress = await _receive(rt, consult_id, conn, study, on_progress, tracked)
        _report_conflicts(rt, consult_id, tracked.receiver)
    for prior in rt.consults.get(consult_id).request.priors:  # after the study itself
        await _pull_prior(rt, consult_id, prior, requester, on_progress)
    if rt.consults.get(consult_id).state is State.TRANSFERRING:
        rt.consults.apply(consult_id, Event.TRANSFER_DONE, rt.now(), str(rt.identity.node_id))
    return progress


async def _pull_prior(
    rt: NodeRuntime,
    consult_id: str,
    prior: str,
    requester: bytes,
    on_progress: ProgressCallback,
) -> None:
    """One prior study of the consult, pulled as its study was (in a spool of its own)."""
    with rt.transfers.track(
        consult_id, Direction.IN, NodeId.from_public_key(requester).short()
    ) as tracked:
        conn = await rt.transport.connect(requester)
        await _receive(rt, consult_id, conn, prior, on_progress, tracked)
        shutil.rmtree(_spool_of(rt, f"{consult_id}/{prior}"), ignore_errors=True)
        _report_conflicts(rt, consult_id, tracked.receiver)


async def _receive(
    rt: NodeRuntime,
    consult_id: str,
    conn: PeerConnection,
    study: str,
    on_progress: ProgressCallback,
    tracked: Transfer,
) -> Progress:
    """Ask the requester for ``study`` of the consult (its own, or a prior it lists) and
    receive it into the store, stopping if the consult stops being ours."""
    prior = study != rt.consults.get(consult_id).request.study_uid
    receiving = asyncio.ensure_future(
        receive_study(
            ChannelLink(conn),
            rt.store,
            _spool_of(rt, f"{consult_id}/{study}" if prior else consult_id),
            peer=str(conn.peer_id),
            audit=rt.audit,
            on_progress=on_progress,
            on_receiver=tracked.attach_receiver,
            sender_key=conn.peer,
            expect_study=study,
            spool_key=_spool_key(rt),
        )
    )
    try:
        await conn.request(
            FETCH_KIND, f"{consult_id}\n{study}".encode() if prior else consult_id.encode()
        )
        while not (await asyncio.wait({receiving}, timeout=WATCH_INTERVAL))[0]:
            if not _still_ours(rt, consult_id):
                raise LocalConsultError(
                    f"consult {consult_id[:8]} was withdrawn: its study is no longer fetched"
                )
        return receiving.result()
    finally:
        receiving.cancel()


def _report_conflicts(rt: NodeRuntime, consult_id: str, receiver: StudyReceiver | None) -> None:
    if receiver is not None and receiver.conflicts:
        rt.notify(
            f"{len(receiver.conflicts)} image(s) of consult {consult_id[:8]} were not stored: "
            "this node already holds instances with the same UIDs and other bytes (kept its "
            "own). Ask the requesting node to check the study."
        )


def unfinished_fetches(rt: NodeRuntime) -> list[str]:
    """Consults whose study this node was fetching when it stopped (spool kept in
    ``data/transfers/consult-<hash of its id>``). A consult's spool that has nothing left to
    resume, or whose consult is no longer in this node's hands (withdrawn, reported), is
    removed; other spools there (``radmesh fetch``) are left alone."""
    found = []
    for case in rt.consults.cases():
        consult_id, spool = case.request.id, _spool_of(rt, case.request.id)
        role, _, _ = rt.consults.info(consult_id)
        if role != "consultant" or consult_id in _desk(rt).fetching or not spool.is_dir():
            continue
        if _still_ours(rt, consult_id) and _unfinished(rt, consult_id, spool):
            found.append(consult_id)
        else:
            shutil.rmtree(spool, ignore_errors=True)
    return sorted(found)


def _unfinished(rt: NodeRuntime, consult_id: str, spool: Path) -> bool:
    """A fetch began (the case moved to transferring) or its spool holds a transfer
    the requesting node signed and this node has not finished."""
    if rt.consults.get(consult_id).state is State.TRANSFERRING:
        return True
    _, _, wire = rt.consults.info(consult_id)
    return (
        wire is not None
        and tr.resume_request(tr.Spool(spool, _spool_key(rt)), _signer(wire)) is not None
    )


def _spool_key(rt: NodeRuntime) -> bytes:
    return rt.identity.derive_key(tr.SPOOL_KEY_PURPOSE)


async def _resume(rt: NodeRuntime, consult_id: str) -> None:
    """Fetch again, in the background, a study a restart cut short; retried a few times
    (:data:`RESUME_RETRY_AFTER`), then left to a person with the spool kept."""
    short = consult_id[:8]
    rt.notify(f"Resuming the study of consult {short}")
    for delay in (*RESUME_RETRY_AFTER, None):
        try:
            done = await fetch_study(rt, consult_id)
        except RemoteError as exc:  # the requesting node refused: retrying will not help
            rt.notify(f"Resuming the study of consult {short} was refused by its sender: {exc}")
            return
        except (ConsultError, NodeError, TransportError) as exc:
            if not _still_ours(rt, consult_id):
                rt.notify(f"The study of consult {short} is no longer fetched: {exc}")
                return
            if delay is None:
                rt.notify(
                    f"Resuming the study of consult {short} failed again ({exc}); what arrived "
                    f"is kept: fetch it again (f, or `radmesh consult fetch {short}`) once "
                    "the requesting node is online"
                )
                return
            rt.notify(
                f"Resuming the study of consult {short} failed ({exc}); "
                f"trying again in {delay / 60:.0f} min"
            )
            await asyncio.sleep(delay)
        else:
            rt.notify(f"Study of consult {short} received: {done.instances_done} images")
            return


def _signer(wire: bytes) -> bytes:
    return SignedEnvelope.from_wire(wire).signer


# --- addenda: the only way to amend a signed report (consult.addenda) ----------------------

ADDENDUM_KIND = "consult.addendum"


async def send_addendum(rt: NodeRuntime, consult_id: str, text: str) -> tuple[Addendum, str]:
    """Consultant side: sign an addendum to the report this node signed for the consult,
    keep it, and send it to the requesting node after the earlier ones (all are sent again
    when the report is re-sent). Returns the addendum and how it was delivered."""
    consult_id = rt.consults.resolve(consult_id)
    role, _, _ = rt.consults.info(consult_id)
    report_wire = rt.consults.report_wire(consult_id)
    if role != "consultant" or report_wire is None:
        raise LocalConsultError(
            f"consult {consult_id[:8]} has no report signed by this node: only the consultant "
            "who signed the report adds an addendum to it"
        )
    addendum = Addendum(
        consult_id=consult_id,
        report_sha256=report_digest(report_wire),
        number=len(rt.consults.addenda_wires(consult_id)) + 1,
        author=rt.identity.node_id,
        author_name=rt.config.display_name,
        text=text.strip(),
        at=rt.now(),
    )
    wire = addendum.to_wire(rt.identity)
    rt.consults.add_addendum(consult_id, wire, rt.now())
    rt.audit.append(
        AuditKind.CONSULT,
        now=rt.clock(),
        details={"consult": consult_id, "event": "addendum-signed", "number": addendum.number},
    )
    try:  # the earlier ones first (the hospital files each once, in order): one lost before
        for earlier in rt.consults.addenda_wires(consult_id)[:-1]:  # is not a gap for ever
            await rt.send_message(requester_key(rt, consult_id), ADDENDUM_KIND, earlier)
        how = await rt.send_message(requester_key(rt, consult_id), ADDENDUM_KIND, wire)
    except NodeError as exc:  # kept here; sent again with the report and the next addendum
        how = f"not sent now ({exc}); it is kept and sent again with the next one"
    return addendum, how


async def resend_addenda(rt: NodeRuntime, consult_id: str) -> None:
    """Consultant side: send the kept addenda again, in order (after the report)."""
    for wire in rt.consults.addenda_wires(consult_id):
        await rt.send_message(requester_key(rt, consult_id), ADDENDUM_KIND, wire)


async def _on_addendum(sender: NodeId, wire: bytes, rt: NodeRuntime) -> None:
    """Requesting side: verify an addendum against the report filed here (signed by the
    consultant who wrote it, amending exactly it, the next number), keep it, file it as a
    new SR naming the report's SR as predecessor, re-linked to the real patient."""
    if len(wire) > MAX_ADDENDUM_WIRE:  # before anything of it is decoded
        raise MalformedMessage(f"addendum is {len(wire)} bytes, limit {MAX_ADDENDUM_WIRE}")
    consult_id = rt.consults.resolve(_signed_consult_id(wire, "addendum"))
    role, _, _ = rt.consults.info(consult_id)
    if role != "requester":
        raise LocalConsultError(f"an addendum for consult {consult_id[:8]} was ignored")
    if wire in rt.consults.addenda_wires(consult_id):
        return  # a repeat (sent again with the report): filed once
    addendum = rt.consults.add_addendum(consult_id, wire, rt.now())
    report = verify_report(rt.consults.report_wire(consult_id) or b"", consult_id=consult_id)
    map_path = _map_path(rt, consult_id)
    pseudonyms = PseudonymMap.load(map_path, _map_key(rt)) if map_path.exists() else None
    relink: Callable[[str], str] = (
        pseudonyms.relink_uid if pseudonyms is not None else (lambda uid: uid)
    )
    original_study = relink(report.study_uid)
    sr = export_addendum_sr(
        report,
        addendum,
        relink_uid=relink,
        patient=_patient_of(rt, original_study),
        institution=rt.config.institution,
    )
    stored = rt.store.add_bytes(sr, source=f"report:{sender}")
    rt.audit.append(
        AuditKind.REPORT,
        now=rt.clock(),
        study_uid=original_study,
        peer=str(addendum.author),
        details={"consult": consult_id, "addendum": addendum.number, "sr": stored.sop_instance_uid},
    )
    rt.notify(
        f"Addendum {addendum.number} to the report of consult {consult_id[:8]} from "
        f"{addendum.author.short()} filed as DICOM SR"
    )
    dicom = rt.config.dicom
    if dicom.pacs_host and dicom.pacs_port:
        result = await asyncio.to_thread(
            send_to_pacs, [sr], dicom.pacs_host, dicom.pacs_port, dicom.pacs_ae_title,
            dicom.ae_title,
        )  # fmt: skip
        rt.audit.append(
            AuditKind.EXPORT,
            now=rt.clock(),
            study_uid=original_study,
            details={"to": f"pacs:{dicom.pacs_ae_title}", "ok": str(result.ok)},
        )
        rt.notify(
            "Addendum SR sent to the PACS"
            if result.ok
            else f"Addendum SR NOT accepted by the PACS: {result.failed}"
        )


def install_addenda(rt: NodeRuntime) -> None:
    """Register the addendum handler (:func:`install` calls this)."""

    async def on_addendum(sender: NodeId, kind: str, wire: bytes) -> None:
        if not rt.trust.is_trusted(_signer(wire), rt.now()):
            raise RuntimeError_(f"addendum from untrusted {sender.short()} ignored")
        try:
            await _on_addendum(sender, wire, rt)
        except ConsultError as exc:
            rt.notify(f"An addendum from {sender.short()} was refused: {exc}")
            raise

    rt.handlers[ADDENDUM_KIND] = on_addendum
