"""A consult's report as this node shows it now: checked again, with its acknowledgement.

One function for the TUI's report screen (and any other reader): the signed report
verified again against the consult and the consultant the case was sent to, laid out
by the pure formatter :mod:`consult.report_text`, with where its acknowledgement stands
and the addenda that amend it. Everything in it is still peer text: the caller shows
it as plain text (the TUI through ``tui.safe_text``, never as markup).
"""

from __future__ import annotations

from consult import report_text
from consult.addenda import verify_addendum
from consult.alerts import ReportAck
from consult.errors import BadReport, ConsultError
from consult.report import Report, verify_report
from consult.requests import Role
from consult.store import ConsultDB
from crypto.identity import NodeId


def _ack_lines(ack: ReportAck | None) -> tuple[str, ...]:
    if ack is None:
        return ("no acknowledgement tracked for this report",)
    kind = "CRITICAL result" if ack.critical else "report"
    if ack.acked_at is None:
        steps = f" ({ack.steps} repeat(s) so far)" if ack.steps else ""
        return (f"{kind}, NOT acknowledged yet{steps}",)
    by = f" by {report_text.clean(ack.acked_by)}" if ack.acked_by else ""
    return (f"{kind}, acknowledged{by}, {ack.time_to_ack or 0} s after it arrived",)


def checked_report(db: ConsultDB, consult_id: str) -> Report | BadReport | None:
    """The consult's signed report checked again now (this consult; on the requesting node,
    signed by the consultant the case was sent to): the report, why it does not verify,
    or None when this node holds none."""
    wire = db.report_wire(consult_id)
    if wire is None:
        return None
    info = db.info(consult_id)
    consultant = info.peer_id if info.role is Role.REQUESTER else None
    try:
        return verify_report(wire, consult_id=consult_id, consultant=consultant)
    except BadReport as exc:
        return exc


def report_view(
    db: ConsultDB, consult_id: str, *, trust: str = ""
) -> list[report_text.Section] | None:
    """The report's sections (None when this node holds no report for the consult).

    ``trust`` is this node's trust in the author's key (verified, organisation,
    unverified), shown next to the author's name and short id."""
    report = checked_report(db, consult_id)
    if report is None:
        return None
    if isinstance(report, BadReport):
        return report_text.unverified_sections(consult_id, str(report))
    sections = report_text.report_sections(report, report_text.Signature(True, ""), trust=trust)
    sections.append(report_text.Section("Acknowledgement", _ack_lines(db.report_ack(consult_id))))
    return sections + addenda_sections(db, consult_id, report.author)


def addenda_sections(db: ConsultDB, consult_id: str, author: NodeId) -> list[report_text.Section]:
    """The report's addenda, each checked again (signed by ``author``, the report's
    author; amending the exact report held here; in order)."""
    report_wire = db.report_wire(consult_id) or b""
    found = []
    for number, wire in enumerate(db.addenda_wires(consult_id), start=1):
        try:
            addendum = verify_addendum(
                wire, consult_id=consult_id, report_wire=report_wire, author=author, number=number
            )
        except ConsultError as exc:
            found.append(report_text.bad_addendum_section(number, str(exc)))
            continue
        found.append(report_text.addendum_section(addendum))
    return found
