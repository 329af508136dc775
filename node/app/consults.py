"""The clinical loop on a running node: a consult asked, answered, its study moved and its
report brought home. :class:`ConsultService` is that loop for one node; the runtime
builds it and registers its message handlers before it takes any message in.

Referring side: :meth:`ConsultService.request_consult` (one chosen consultant) or
:meth:`ConsultService.route_consult` (offered to several trusted, licensed, online
subspecialists found in the registries; the first to accept gets it, the runtime
withdraws it from the others) de-identifies the study (the pseudonym map stays on this
node, encrypted), records the case and sends the signed request. Consultant side:
:meth:`ConsultService.respond` accepts or declines. Requests and responses from peers
come in through :meth:`ConsultService.on_consult_message` (a request from a key not
trusted yet lands in the first-contact inbox, a few per key).

The service owns two desks: :attr:`ConsultService.studies` serves and fetches the
study (:mod:`node.app.studies`), :attr:`ConsultService.reports` signs, files,
acknowledges, reviews and amends reports (:mod:`node.app.reports`). What they share
about a case is in :mod:`node.app.cases`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from consult.admission import GuestConsent
from consult.errors import LocalConsultError
from consult.intake import Intake, take_in
from consult.requests import (
    MAX_PRIORS,
    Candidate,
    ConsultRequest,
    ConsultResponse,
    Event,
    Priority,
    Role,
    State,
    rank_consultants,
)
from crypto.envelope import SignedEnvelope
from crypto.errors import CryptoError
from crypto.identity import NodeId
from crypto.org import verify_certificate
from node.app import cases
from node.app.cases import Share, UidMapping
from node.app.errors import RuntimeError_
from node.app.reports import ReportDesk
from node.app.studies import FETCH_KIND, StudyDesk
from node.core.audit import AuditKind
from node.core.errors import NodeError
from node.dicom import sharing
from node.dicom.deid import PseudonymMap
from registry.client import SearchQuery
from registry.errors import TrustError
from registry.records import Availability, NodeRecord
from registry.trust import TrustState

if TYPE_CHECKING:
    from node.app.runtime import NodeRuntime

log = logging.getLogger(__name__)

LIVE_CONSENT_KIND = "live.consent"
MAX_STRANGER_REQUESTS = 3  # requests from one untrusted key waiting for a person


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


class ConsultService:
    """One node's consults: requests and answers here, studies in :attr:`studies`, reports
    in :attr:`reports`."""

    def __init__(self, rt: NodeRuntime) -> None:
        self.rt = rt
        self.studies = StudyDesk(rt)
        self.reports = ReportDesk(rt)

    def install(self) -> None:
        """Register the handlers of every consult message (before the node takes any in)."""
        self.rt.handlers["consult.request"] = self.on_consult_message
        self.rt.handlers["consult.response"] = self.on_consult_message
        self.reports.install()

        async def on_live_consent(sender: NodeId, kind: str, wire: bytes) -> None:
            await self.on_live_consent(sender, wire)

        self.rt.handlers[LIVE_CONSENT_KIND] = on_live_consent

    def serve(self) -> None:
        """Answer fetch requests on the transport (once it runs)."""
        self.rt.transport.handle(FETCH_KIND, self.studies.on_fetch)

    # -- the case as this node sees it ----------------------------------------------------
    def share_of(self, consult_id: str) -> Share:
        return cases.share_of(self.rt, consult_id)

    def uid_mapping(self, consult_id: str) -> UidMapping:
        return cases.uid_mapping(self.rt, consult_id)

    def requester_key(self, consult_id: str) -> bytes:
        return cases.requester_key(self.rt, consult_id)

    async def consultant_key(self, consult_id: str) -> bytes | None:
        return await cases.consultant_key(self.rt, consult_id)

    # -- referring side -------------------------------------------------------------------
    async def request_consult(
        self, consultant: bytes, study_uid: str, terms: Terms
    ) -> tuple[ConsultRequest, Share, str]:
        """Record and send a consult request to one chosen consultant; returns
        (request, share, how sent).

        The study is de-identified when the consultant fetches it; the pseudonym map
        (with its secret, so every instance maps the same way) is made now and stays
        here, encrypted.
        """
        request, pseudonyms = await self._new_request(study_uid, terms)
        share, sent = await self._offer(request, pseudonyms, study_uid, [consultant])
        how = next(iter(sent.values()))
        if how.startswith("not sent: "):
            raise RuntimeError_(how.removeprefix("not sent: "))
        return request, share, how

    async def route_consult(
        self, study_uid: str, terms: Terms, *, max_offers: int = 3
    ) -> tuple[ConsultRequest, Share, dict[NodeId, str]]:
        """Offer a consult to up to ``max_offers`` matching trusted consultants; the first to
        accept gets it and the others are told it is withdrawn (see the response handler).

        Returns (request, share, how each offered consultant was reached).
        """
        request, pseudonyms = await self._new_request(study_uid, terms)
        ranked = await self.find_consultants(request)
        if max_offers < 1:
            raise LocalConsultError("offer a consult to at least one consultant (--max-offers)")
        if not ranked:
            raise LocalConsultError(
                f"no trusted consultant online with subspecialty {request.subspecialty!r} and a "
                f"licence for {request.jurisdiction}: verify more peers (`radmesh peers`), widen "
                "the subspecialty, or send it to a chosen peer with --to"
            )
        chosen = [r.public_key for r in ranked[:max_offers]]
        share, sent = await self._offer(request, pseudonyms, study_uid, chosen)
        return request, share, sent

    async def find_consultants(self, request: ConsultRequest) -> list[NodeRecord]:
        """Trusted consultants online or on call now with the wanted subspecialty and a
        licence for the request's jurisdiction, from every registry and the LAN, best first."""
        rt = self.rt
        now = rt.now()
        query = SearchQuery(request.subspecialty, request.jurisdiction, online=True, on_call=True)
        records = {p.record.node_id: p.record for p in await rt.directory.search(query, now)}
        candidates = [c for r in records.values() if (c := self.candidate(r, now)) is not None]
        return [records[c.node_id] for c in rank_consultants(request, candidates)]

    def candidate(self, record: NodeRecord, now: int) -> Candidate | None:
        """A registry record as a routing candidate, or None if its key is not trusted here.

        Subspecialties and licences come from the organisation certificate when one
        we trust vouches for the node, else from the node's own record (its key was
        verified by a person).
        """
        trust = self.rt.trust
        key, cert = record.public_key, record.org_certificate
        state = trust.state(key, now, cert)
        if state not in (TrustState.VERIFIED, TrustState.TRUSTED_BY_ORG):
            return None
        subspecialties, jurisdictions = record.subspecialties, record.jurisdictions
        if state is TrustState.TRUSTED_BY_ORG:
            # The certificate that made it trusted: the record's, else the one kept earlier
            # (a record without it must not claim what no organisation attested).
            attested = verify_certificate(
                cert if cert is not None else (trust.certificate(key) or b""),
                trusted_orgs=trust.trusted_orgs(),
                now=now,
                revocations=trust.revocation_lists(),
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

    async def _new_request(
        self, study_uid: str, terms: Terms
    ) -> tuple[ConsultRequest, PseudonymMap | None]:
        rt = self.rt
        if not rt.store.instances(study_uid):
            raise RuntimeError_(f"study {study_uid} has no instances in this node's store")
        self._check_priors(study_uid, terms.priors)
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
                pseudonyms.pseudo_uid(uid) if pseudonyms is not None else uid
                for uid in terms.priors
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

    def priors_in_store(self, study_uid: str) -> tuple[str, ...]:
        """Earlier studies of the study's patient (same Patient ID) held here, most recent
        first, as many as a consult takes."""
        store = self.rt.store
        study = store.study(study_uid)
        earlier = [
            row
            for row in store.studies()
            if row.patient_id == study.patient_id
            and row.study_uid != study_uid
            and row.study_date <= study.study_date
        ]
        earlier.sort(key=lambda row: row.study_date, reverse=True)
        return tuple(row.study_uid for row in earlier[:MAX_PRIORS])

    def _check_priors(self, study_uid: str, priors: tuple[str, ...]) -> None:
        """Priors are other studies of the same patient held here (a wrong one would send
        another patient's images under this patient's pseudonym)."""
        store = self.rt.store
        patient = store.study(study_uid).patient_id
        for uid in priors:
            if uid == study_uid or not store.instances(uid):
                raise RuntimeError_(
                    f"prior study {uid[:64]} is not in this node's store (or is the study "
                    "itself): retrieve it first (`radmesh dicom retrieve`) or leave it out"
                )
            if store.study(uid).patient_id != patient:
                raise RuntimeError_(
                    f"prior study {uid[:64]} is of another patient (its Patient ID differs): "
                    "only the same patient's earlier studies go with a consult"
                )

    async def _offer(
        self,
        request: ConsultRequest,
        pseudonyms: PseudonymMap | None,
        original_uid: str,
        consultants: list[bytes],
    ) -> tuple[Share, dict[NodeId, str]]:
        """Record the request, offer it to ``consultants`` and send it to each of them.

        Returns how each was reached; one unreachable consultant does not stop the
        others (its copy waits in a registry mailbox when one took it).
        """
        rt = self.rt
        if pseudonyms is not None:
            pseudonyms.persist(cases.map_path(rt, request.id), cases.map_key(rt))
        wire = request.to_wire(rt.identity)
        now = rt.now()
        peers = [NodeId.from_public_key(key) for key in consultants]
        rt.consults.add(request, role=Role.REQUESTER, now=now, wire=wire)
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

    async def withdraw(
        self, consult_id: str, reason: str = "withdrawn by the requester"
    ) -> list[NodeId]:
        """Withdraw a request and tell every consultant it went to.

        Returns the consultants that could not be told now (their copy expires at the
        deadline; a later accept from them is answered with a withdrawal).
        """
        rt = self.rt
        consult_id = rt.consults.resolve(consult_id)
        info = rt.consults.info(consult_id)
        if info.role is not Role.REQUESTER:
            raise LocalConsultError(
                f"consult {consult_id[:8]} was sent to this node; only the requesting node "
                "withdraws it"
            )
        rt.consults.apply(consult_id, Event.WITHDRAW, rt.now(), str(rt.identity.node_id))
        self.studies.stop_serving(
            consult_id, "the consult was withdrawn by the requester", tell=True
        )
        rt.live_hub().recheck(consult_id)  # nobody stays in its live session
        told = {info.peer_id} if info.peer_id is not None else set()
        told.update(rt.consults.offered(consult_id))
        return [p for p in told if not await self.send_withdrawal(consult_id, p, reason)]

    # -- requests and responses from peers ------------------------------------------------
    async def on_consult_message(self, sender: NodeId, kind: str, wire: bytes) -> None:
        """A signed request or response: from a trusted node, or (a request only) a first
        contact that lands in the inbox for a person, within a small budget per key."""
        rt = self.rt
        public_key = _sender_key(sender, wire)
        if public_key is not None and rt.trust.state(public_key, rt.now()) is (TrustState.REVOKED):
            raise RuntimeError_(f"{sender.short()} was revoked: {kind} ignored")
        trusted = public_key is not None and rt.trust.is_trusted(public_key, rt.now())
        if not trusted and public_key is not None:
            await rt.learn_certificate(sender)  # an organisation may vouch for it
            trusted = rt.trust.is_trusted(public_key, rt.now())
        if not trusted and kind != "consult.request":
            raise RuntimeError_(f"{sender.short()} is not trusted: {kind} ignored")
        if not trusted and self._stranger_has_enough(sender):
            return
        if not trusted and public_key is not None:
            # First contact: a request may land in the inbox, nothing is shared back.
            try:
                rt.trust.first_contact(public_key, rt.now(), summary="consult request")
            except TrustError:  # the inbox is full: drop quietly, a person reviews it
                rt.strangers.dropped += 1
                log.debug("contact inbox full: a request from %s was dropped", sender.short())
                return
        intake: Intake = take_in(rt.consults, wire, rt.now(), sender=sender)
        rt.notify(intake.summary)
        rt.recheck_live(intake.consult_id)  # withdrawn: nobody stays in its live session
        for peer in intake.withdraw:
            rt.spawn(self._withdraw(intake.consult_id, peer))

    def _stranger_has_enough(self, sender: NodeId) -> bool:
        """An untrusted key may have only a few requests waiting for a person here."""
        rt = self.rt
        if rt.consults.count_from(str(sender), State.REQUESTED) < MAX_STRANGER_REQUESTS:
            return False
        rt.strangers.dropped += 1
        log.debug("%s already has requests waiting: another one dropped", sender.short())
        return True

    async def _withdraw(self, consult_id: str, peer: NodeId) -> None:
        """Tell an offered consultant the case is no longer theirs (someone accepted first)."""
        await self.send_withdrawal(consult_id, peer, "accepted by another")

    async def send_withdrawal(self, consult_id: str, peer: NodeId, reason: str) -> bool:
        """Send a signed WITHDRAW of ``consult_id`` to ``peer`` (an offered consultant: the
        case is no longer theirs); False if it could not go."""
        rt = self.rt
        found = await rt.directory.resolve(peer, rt.now())
        if found is None:
            log.warning("cannot withdraw consult %s from %s: address unknown", consult_id, peer)
            return False
        response = ConsultResponse(
            consult_id, rt.identity.node_id, Event.WITHDRAW, rt.now(), reason
        )
        try:
            await rt.send_message(
                found.record.public_key, "consult.response", response.to_wire(rt.identity)
            )
        except NodeError as exc:
            log.warning("withdrawal of consult %s not sent: %s", consult_id[:8], exc)
            return False
        return True

    # -- consultant side ------------------------------------------------------------------
    async def respond(self, consult_id: str, event: Event, reason: str = "") -> State:
        """Accept or decline a request and tell the requesting node."""
        rt = self.rt
        consult_id = rt.consults.resolve(consult_id)
        if rt.consults.info(consult_id).role is not Role.CONSULTANT:
            raise LocalConsultError(f"consult {consult_id[:8]} was not sent to this node")
        transition = rt.consults.apply(consult_id, event, rt.now(), str(rt.identity.node_id))
        response = ConsultResponse(consult_id, rt.identity.node_id, event, rt.now(), reason)
        await rt.send_message(
            cases.requester_key(rt, consult_id), "consult.response", response.to_wire(rt.identity)
        )
        return transition.target

    # -- guests of the live session: the parties' consent ---------------------------------
    async def approve_live_guest(self, consult_id: str, guest: bytes) -> str:
        """Either party: agree that ``guest`` (a public key) joins the consult's live session,
        and tell the other party. A guest is admitted once both parties agreed (one of them
        then invites it); see :mod:`consult.admission`. Returns how the other party was
        told."""
        rt = self.rt
        consult_id = rt.consults.resolve(consult_id)
        guest_id = NodeId.from_public_key(guest)
        rt.consults.approve_guest(consult_id, str(guest_id), str(rt.identity.node_id))
        rt.audit.append(
            AuditKind.CONSULT,
            now=rt.clock(),
            peer=str(guest_id),
            details={"consult": consult_id, "event": "live-guest-approved"},
        )
        if not rt.consults.info(consult_id).peer:
            return "no other party yet"
        other = await cases.other_party_key(rt, consult_id)
        if other is None:
            raise RuntimeError_(
                f"the other party of consult {consult_id[:8]} cannot be reached now"
            )
        return await rt.send_message(
            other, LIVE_CONSENT_KIND, GuestConsent(consult_id, guest).to_wire()
        )

    async def on_live_consent(self, sender: NodeId, wire: bytes) -> None:
        rt = self.rt
        consent = GuestConsent.from_wire(wire)
        if rt.consults.info(consent.consult_id).peer_id != sender:
            raise RuntimeError_(
                f"a guest approval for consult {consent.consult_id[:8]} from {sender.short()}, "
                "who is not its other party, was ignored"
            )
        # Checked per message like every other kind: a party revoked since does not approve.
        key = await cases.other_party_key(rt, consent.consult_id)
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
            details={
                "consult": consent.consult_id,
                "event": "live-guest-approved",
                "by": str(sender),
            },
        )
        rt.notify(
            f"{sender.short()} approved {guest.short()} as a guest of the live session on "
            f"consult {consent.consult_id[:8]}"
        )
        rt.guests.after_consent(consent.consult_id, consent.guest, sender)  # ask, or invite


def _sender_key(sender: NodeId, wire: bytes) -> bytes | None:
    """The key that signed ``wire``, if it is ``sender``'s (whose sealed message it came in)."""
    with contextlib.suppress(CryptoError):
        signer = SignedEnvelope.from_wire(wire).signer
        if NodeId.from_public_key(signer) == sender:
            return signer
    return None


__all__ = ["LIVE_CONSENT_KIND", "MAX_STRANGER_REQUESTS", "ConsultService", "Terms"]
