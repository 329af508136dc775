"""The report desk: signed reports, their acknowledgement, peer reviews and addenda, both
ways.

Consultant side: :meth:`ReportDesk.send_report` signs and sends the report (and keeps
it; a critical one is re-sent on a timer until acknowledged, :mod:`node.app.alerts`),
:meth:`ReportDesk.send_addendum` amends it, the only way. Requesting side: a report
that arrives is verified against the case, re-linked to the real patient, turned into
a DICOM SR filed under the original study, stored, audited and pushed to the PACS
(:meth:`ReportDesk.on_report`); :meth:`ReportDesk.acknowledge` records who took it on;
:meth:`ReportDesk.send_review` lets a second reader score it (agree / minor / major
discrepancy), verified against the exact report bytes and kept on both nodes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

from consult.addenda import MAX_ADDENDUM_WIRE, Addendum, report_digest
from consult.alerts import Acknowledgement
from consult.errors import ConsultError, LocalConsultError, MalformedMessage
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
from consult.requests import Event, Role, State
from consult.shared import Annotation
from crypto.identity import NodeId
from node.app import cases
from node.app.errors import RuntimeError_
from node.core.audit import AuditKind
from node.core.errors import NodeError
from node.dicom.deid import PseudonymMapError
from node.dicom.net import send_to_pacs

if TYPE_CHECKING:
    from node.app.courier import MessageHandler
    from node.app.runtime import NodeRuntime

REPORT_KIND = "consult.report"
REVIEW_KIND = "consult.review"
ACK_KIND = "consult.ack"
ADDENDUM_KIND = "consult.addendum"


class ReportDesk:
    """One node's reports: what it signs and sends, and what it files when one arrives."""

    def __init__(self, rt: NodeRuntime) -> None:
        self.rt = rt

    def install(self) -> None:
        """Register the handlers of the messages this desk takes in."""
        self.rt.handlers[REPORT_KIND] = self._checked(self.on_report, "report", refused=True)
        self.rt.handlers[REVIEW_KIND] = self._checked(self.on_review, "review", refused=True)
        self.rt.handlers[ACK_KIND] = self._checked(self.on_ack, "acknowledgement")
        self.rt.handlers[ADDENDUM_KIND] = self._checked(self.on_addendum, "addendum", refused=True)

    def _checked(
        self,
        handle: Callable[[NodeId, bytes], Awaitable[None]],
        what: str,
        *,
        refused: bool = False,
    ) -> MessageHandler:
        """``handle`` for signed messages whose signer this node trusts; a refusal is shown
        (``refused``) as well as logged."""
        rt = self.rt

        async def handler(sender: NodeId, kind: str, wire: bytes) -> None:
            if not rt.trust.is_trusted(cases.signer(wire), rt.now()):
                raise RuntimeError_(f"{what} from untrusted {sender.short()} ignored")
            try:
                await handle(sender, wire)
            except ConsultError as exc:
                if refused:
                    article = "An" if what[0] in "aeiou" else "A"
                    rt.notify(f"{article} {what} from {sender.short()} was refused: {exc}")
                raise

        return handler

    # -- consultant side ------------------------------------------------------------------
    def report_items_of(
        self, consult_id: str, annotations: Iterable[Annotation]
    ) -> tuple[tuple[Measurement, ...], tuple[Mark, ...]]:
        """A session's annotations as report measurements and marks, each on the image it
        was drawn on (series and SOP class from this node's copy of the study)."""
        rt = self.rt
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
        self,
        consult_id: str,
        *,
        text: str,
        impression: str,
        measurements: tuple[Measurement, ...] = (),
        key_images: tuple[KeyImage, ...] = (),
        marks: tuple[Mark, ...] = (),
        critical: bool = False,
    ) -> Report:
        """Sign the report and send it to the requesting node (a critical one is re-sent on
        a timer until acknowledged: :mod:`node.app.alerts`)."""
        rt = self.rt
        consult_id = rt.consults.resolve(consult_id)
        if rt.consults.report_wire(consult_id) is not None:  # signed is final
            raise LocalConsultError(
                f"consult {consult_id[:8]} already has a signed report: it cannot be changed or "
                'replaced; amend it with `radmesh consult addendum ID --text "..."`'
            )
        own = str(rt.identity.node_id)
        # The consultant holds the study (had it before, or looked at it live): reporting
        # begins the review. A fetch still running is not finished by a report.
        rt.consults.advance(consult_id, State.IN_REVIEW, rt.now(), own, via=_HOLDS_STUDY)
        case = rt.consults.get(consult_id)
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
        rt.consults.keep_sent_report(consult_id, wire, rt.now(), own)
        try:
            await rt.send_message(cases.requester_key(rt, consult_id), REPORT_KIND, wire)
        except RuntimeError_ as exc:
            if not critical:
                raise
            raise RuntimeError_(
                f"{exc} The critical report is kept and sent again every "
                f"{rt.config.alerts.critical_repeat_minutes} min until it is acknowledged; "
                "phone the referring team now"
            ) from exc
        return report

    async def resend_report(self, consult_id: str) -> str:
        """Send the kept signed report again (a critical result not yet acknowledged)."""
        rt = self.rt
        wire = rt.consults.report_wire(consult_id)
        if wire is None:
            raise LocalConsultError(f"consult {consult_id[:8]} has no report sent from this node")
        how = await rt.send_message(cases.requester_key(rt, consult_id), REPORT_KIND, wire)
        await self.resend_addenda(consult_id)
        return how

    async def on_review(self, sender: NodeId, wire: bytes) -> None:
        """A review of a report we sent, from the node we sent it to."""
        rt = self.rt
        consult_id = rt.consults.resolve(cases.signed_consult_id(wire, "review"))
        info = rt.consults.info(consult_id)
        if info.role is not Role.CONSULTANT or info.peer_id != sender:
            raise LocalConsultError(
                f"a review of consult {consult_id[:8]} from {sender.short()}, who did not ask "
                "for it: ignored"
            )
        review = rt.consults.file_review(consult_id, wire, rt.now(), reviewer=sender)
        self._audit_review(review, sender)
        rt.notify(
            f"{sender.short()} reviewed your report on consult {consult_id[:8]}: "
            f"{review.score.value.replace('_', ' ')}"
        )

    async def on_ack(self, sender: NodeId, wire: bytes) -> None:
        """The requesting node acknowledged the report we sent."""
        rt = self.rt
        ack = Acknowledgement.from_wire(wire)
        consult_id = rt.consults.resolve(ack.consult_id)
        report = rt.consults.report_wire(consult_id)
        if (
            rt.consults.info(consult_id).role is not Role.CONSULTANT
            or sender != ack.requester
            or report is None
        ):
            raise LocalConsultError(f"an acknowledgement from {sender.short()} was ignored")
        if ack.requester != NodeId.from_public_key(cases.requester_key(rt, consult_id)):
            raise LocalConsultError(
                f"consult {consult_id[:8]} was acknowledged by {sender.short()}, who did not "
                "ask for it: ignored"
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

    def _held_report(self, consult_id: str, role: Role, task: str) -> tuple[str, bytes]:
        """The consult's full id and the signed report this node holds as ``role`` (signed
        it as the consultant, received it as the requester); else an error saying who may
        do ``task``."""
        consult_id = self.rt.consults.resolve(consult_id)
        wire = self.rt.consults.report_wire(consult_id)
        if self.rt.consults.info(consult_id).role is not role or wire is None:
            raise _no_report(consult_id, role, task)
        return consult_id, wire

    async def send_addendum(self, consult_id: str, text: str) -> tuple[Addendum, str]:
        """Sign an addendum to the report this node signed for the consult, keep it, and send
        it to the requesting node after the earlier ones (all are sent again when the report
        is re-sent). Returns the addendum and how it was delivered."""
        rt = self.rt
        consult_id, report_wire = self._held_report(
            consult_id, Role.CONSULTANT, "adds an addendum to it"
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
        try:  # the earlier ones first (the hospital files each once, in order): one lost
            requester = cases.requester_key(rt, consult_id)  # before is not a gap for ever
            for earlier in rt.consults.addenda_wires(consult_id)[:-1]:
                await rt.send_message(requester, ADDENDUM_KIND, earlier)
            how = await rt.send_message(requester, ADDENDUM_KIND, wire)
        except NodeError as exc:  # kept here; sent again with the report and the next addendum
            how = f"not sent now ({exc}); it is kept and sent again with the next one"
        return addendum, how

    async def resend_addenda(self, consult_id: str) -> None:
        """Send the kept addenda again, in order (after the report)."""
        rt = self.rt
        for wire in rt.consults.addenda_wires(consult_id):
            await rt.send_message(cases.requester_key(rt, consult_id), ADDENDUM_KIND, wire)

    # -- requesting side ------------------------------------------------------------------
    async def on_report(self, sender: NodeId, wire: bytes) -> None:
        rt = self.rt
        consult_id = rt.consults.resolve(cases.signed_consult_id(wire))
        if rt.consults.report_wire(consult_id) is not None:
            await self._on_report_again(sender, consult_id, wire)
            return
        # The requester's copy moves to review once the consultant had the study.
        rt.consults.advance(consult_id, State.IN_REVIEW, rt.now(), str(sender))
        report = rt.consults.file_report(consult_id, wire, rt.now())
        alerts = rt.alerts
        if report.critical:  # first, before the SR export and PACS push
            alerts.raise_alert(consult_id)
        relink = _relinker(rt, consult_id)
        original_study = relink(report.study_uid)
        patient = cases.patient_of(rt, original_study)
        report = self._placeable(report, relink)
        sr = export_sr(
            report, relink_uid=relink, patient=patient, institution=rt.config.institution
        )
        stored = rt.store.add_bytes(sr, source=f"report:{sender}")
        documents = [sr, *self._key_images_document(report, relink, patient, sender)]
        rt.audit.append(
            AuditKind.REPORT,
            now=rt.clock(),
            study_uid=original_study,
            peer=str(sender),
            details={"consult": consult_id, "sr": stored.sop_instance_uid},
        )
        rt.reports[consult_id] = stored.sop_instance_uid
        rt.notify(f"Report for consult {consult_id[:8]} from {sender.short()} filed as DICOM SR")
        pushed = await self._to_pacs(documents, original_study)
        if pushed is not None:
            rt.notify(
                f"Report SR sent to the PACS ({rt.config.dicom.pacs_ae_title})"
                if pushed == ""
                else f"Report SR NOT accepted by the PACS: {pushed}"
            )

    async def _to_pacs(self, documents: list[bytes], original_study: str) -> str | None:
        """Push filed documents to the hospital's PACS, audited: None when no PACS is
        configured, "" when it took them, else what it refused."""
        rt = self.rt
        dicom = rt.config.dicom
        if not (dicom.pacs_host and dicom.pacs_port):
            return None
        result = await asyncio.to_thread(
            send_to_pacs, documents, dicom.pacs_host, dicom.pacs_port, dicom.pacs_ae_title,
            dicom.ae_title,
        )  # fmt: skip
        rt.audit.append(
            AuditKind.EXPORT,
            now=rt.clock(),
            study_uid=original_study,
            details={"to": f"pacs:{dicom.pacs_ae_title}", "ok": str(result.ok)},
        )
        return "" if result.ok else str(result.failed)

    def _key_images_document(
        self, report: Report, relink: Callable[[str], str], patient: PatientStudy, sender: NodeId
    ) -> list[bytes]:
        """The report's key images as a KOS filed beside the SR (none when it has none)."""
        kos = export_key_images(
            report, relink_uid=relink, patient=patient, institution=self.rt.config.institution
        )
        if kos is None:
            return []
        self.rt.store.add_bytes(kos, source=f"report:{sender}")
        return [kos]

    def _placeable(self, report: Report, relink: Callable[[str], str]) -> Report:
        """The report without image references the pseudonym map cannot re-link (said so)."""

        def known(uid: str) -> bool:
            try:
                relink(uid)
            except PseudonymMapError:
                return False
            return True

        kept, dropped = placeable(report, known)
        if dropped:
            self.rt.notify(
                f"The report of consult {report.consult_id[:8]} names {dropped} image(s) that "
                "are not in the study shared: the SR leaves those references out"
            )
        return kept

    async def _on_report_again(self, sender: NodeId, consult_id: str, wire: bytes) -> None:
        """A report already filed here came again (the consultant's node re-sends a critical
        result until it hears the acknowledgement): answer with the acknowledgement if one
        was made; never file it twice."""
        rt = self.rt
        if wire != rt.consults.report_wire(consult_id):
            raise LocalConsultError(
                f"a second, different report for consult {consult_id[:8]} from "
                f"{sender.short()} was not filed: ask the consultant to call"
            )
        ack = rt.consults.ack_wire(consult_id)
        if ack is not None:
            await rt.send_message(cases.signer(wire), ACK_KIND, ack)
        else:
            rt.notify(f"The critical result on consult {consult_id[:8]} came again: acknowledge it")

    async def acknowledge(self, consult_id: str, by: str = "") -> tuple[str, int]:
        """Acknowledge receipt of the report (by a named person: required for a critical
        result), record the time to acknowledgement, tell the report's author.

        Returns (how the author was told, seconds from arrival to acknowledgement).
        """
        rt = self.rt
        task = "acknowledges the report it got back"
        consult_id, report_wire = self._held_report(consult_id, Role.REQUESTER, task)
        row = rt.consults.report_ack(consult_id)
        if row is None:
            raise _no_report(consult_id, Role.REQUESTER, task)
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
            how = await rt.send_message(cases.signer(report_wire), ACK_KIND, wire)
        except NodeError as exc:  # kept here; sent again when the report is re-sent
            how = f"not sent now ({exc})"
        return how, seconds

    async def send_review(self, consult_id: str, score: Score, comment: str = "") -> str:
        """The QA step: a second reader here scores the received report; the signed review
        is kept and audited here and sent to the report's author. Returns how."""
        rt = self.rt
        consult_id, report = self._held_report(
            consult_id, Role.REQUESTER, "reviews the report it got back"
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
        author = cases.signer(report)
        self._audit_review(review, NodeId.from_public_key(author))
        return await rt.send_message(author, REVIEW_KIND, wire)

    def _audit_review(self, review: PeerReview, peer: NodeId) -> None:
        self.rt.audit.append(
            AuditKind.CONSULT,
            now=self.rt.clock(),
            peer=str(peer),
            details={
                "consult": review.consult_id,
                "event": "review",
                "score": review.score.value,
                "reviewer": str(review.reviewer),
            },
        )

    async def on_addendum(self, sender: NodeId, wire: bytes) -> None:
        """Verify an addendum against the report filed here (signed by the consultant who
        wrote it, amending exactly it, the next number), keep it, file it as a new SR naming
        the report's SR as predecessor, re-linked to the real patient."""
        rt = self.rt
        if len(wire) > MAX_ADDENDUM_WIRE:  # before anything of it is decoded
            raise MalformedMessage(f"addendum is {len(wire)} bytes, limit {MAX_ADDENDUM_WIRE}")
        consult_id = rt.consults.resolve(cases.signed_consult_id(wire, "addendum"))
        if rt.consults.info(consult_id).role is not Role.REQUESTER:
            raise LocalConsultError(f"an addendum for consult {consult_id[:8]} was ignored")
        if wire in rt.consults.addenda_wires(consult_id):
            return  # a repeat (sent again with the report): filed once
        addendum = rt.consults.add_addendum(consult_id, wire, rt.now())
        report = verify_report(rt.consults.report_wire(consult_id) or b"", consult_id=consult_id)
        relink = _relinker(rt, consult_id)
        original_study = relink(report.study_uid)
        sr = export_addendum_sr(
            report,
            addendum,
            relink_uid=relink,
            patient=cases.patient_of(rt, original_study),
            institution=rt.config.institution,
        )
        stored = rt.store.add_bytes(sr, source=f"report:{sender}")
        rt.audit.append(
            AuditKind.REPORT,
            now=rt.clock(),
            study_uid=original_study,
            peer=str(addendum.author),
            details={
                "consult": consult_id,
                "addendum": addendum.number,
                "sr": stored.sop_instance_uid,
            },
        )
        rt.notify(
            f"Addendum {addendum.number} to the report of consult {consult_id[:8]} from "
            f"{addendum.author.short()} filed as DICOM SR"
        )
        pushed = await self._to_pacs([sr], original_study)
        if pushed is not None:
            rt.notify(
                "Addendum SR sent to the PACS"
                if pushed == ""
                else f"Addendum SR NOT accepted by the PACS: {pushed}"
            )


# A report begins the review of a study the consultant already holds; it never finishes
# a fetch that is still running (that waits for the study).
_HOLDS_STUDY = frozenset({Event.BEGIN_REVIEW})


def _no_report(consult_id: str, role: Role, task: str) -> LocalConsultError:
    held, who = (
        ("signed by", "the consultant who signed the report")
        if role is Role.CONSULTANT
        else ("received by", "the requesting node")
    )
    return LocalConsultError(
        f"consult {consult_id[:8]} has no report {held} this node: only {who} {task}"
    )


def _relinker(rt: NodeRuntime, consult_id: str) -> Callable[[str], str]:
    """Shared UIDs back to this node's own (unchanged for an identified share)."""
    pseudonyms = cases.pseudonyms_of(rt, consult_id)
    return pseudonyms.relink_uid if pseudonyms is not None else (lambda uid: uid)


__all__ = ["ACK_KIND", "ADDENDUM_KIND", "REPORT_KIND", "REVIEW_KIND", "ReportDesk"]
