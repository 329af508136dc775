"""``radmesh consult request | import | list | accept | decline | report | ack | review | show |
export | stats``.

Works against the local node's consult database. When the node is on the
network (a registry in its config, or the peer remembered with a LAN address)
a command that must reach a peer starts the node for its duration, as
``radmesh send`` does, and sends the sealed message: straight over the LAN,
else relayed by a registry, or left in the registry's mailbox while the peer
is offline. ``--out FILE`` writes the signed bytes for the offline path
(``radmesh consult import FILE`` on the other node).

Why one module: Every `radmesh consult` subcommand: argparse and printing only, one
small function each; the work is in node.app.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from consult.errors import BadReport, LocalConsultError
from consult.requests import (
    ConsultCase,
    ConsultRequest,
    ConsultResponse,
    Event,
    Priority,
    Role,
    State,
    turnaround_by_priority,
)
from crypto.envelope import SignedEnvelope
from crypto.errors import InvalidNodeId
from crypto.identity import Identity, NodeId
from node.cli.addenda import register_into as register_addenda
from node.cli.guests import register_into as register_guests
from node.cli.identity import home_of
from node.cli.ids import consult_command, known_ids, resolve_id
from node.cli.transfer import add_sharing_options
from node.core.audit import AuditKind, open_audit
from node.core.config import NodeConfig, NodeHome
from node.core.display import peer_label, printable
from node.core.keystore import load_identity
from registry.trust import TrustState, TrustStore

if TYPE_CHECKING:
    from consult import report_text
    from consult.alerts import AckPolicy, ReportAck
    from consult.report import PeerReview, Report
    from consult.store import ConsultDB
    from node.dicom.deid import PseudonymMap


def _open_db(home: NodeHome) -> ConsultDB:
    from consult.store import ConsultDB

    home.require()
    return ConsultDB.in_data_dir(home.data_dir)


def _on_network(home: NodeHome, config: NodeConfig, peer: NodeId | None) -> bool:
    """A registry is configured, or ``peer`` is remembered with a LAN address."""
    from registry.directory import PeerDirectory

    if config.network.registries:
        return True
    if peer is None:
        return False
    home.data_dir.mkdir(parents=True, exist_ok=True)
    trust = TrustStore(home.trust_db)
    directory = PeerDirectory(home.peers_db, trust)
    try:
        record = directory.remembered(peer)
    finally:
        directory.close()
        trust.close()
    return record is not None and bool(record.lan_urls)


def _run(home: NodeHome, op: str, args: dict[str, Any]) -> Any:
    """The operation on this home's running node if there is one, else on a node brought up
    for it (:mod:`node.app.commands`); progress lines overwrite each other on one line."""
    from node.app import commands  # the node's stack: not for building the parser

    return asyncio.run(commands.run(home, op, args, lambda line: print(line, end="\r", flush=True)))


def _send(home: NodeHome, to: bytes, kind: str, wire: bytes, out: str | None) -> None:
    """Send a signed response now when the network is configured; ``--out`` also (or
    otherwise) writes it for `radmesh consult import` on the other node."""
    peer = NodeId.from_public_key(to)
    if out:
        _write(out, wire, kind)
    if _on_network(home, home.load_config(), peer):
        how = _run(home, "message.send", {"to": to, "kind": f"consult.{kind}", "wire": wire})
        print(f"Sent the {kind} to {peer.short()}: {how}")
    elif not out:
        print(
            f"The {kind} is stored but not sent (no registry configured and no LAN address "
            f"known for {peer.short()}); use --out FILE to carry it, then "
            "`radmesh consult import FILE` on the other node"
        )


def _request_online(args: argparse.Namespace, home: NodeHome) -> bytes | None:
    done = _run(
        home,
        "consult.request",
        {
            "study": args.study,
            "to": args.to,
            "max_offers": args.max_offers,
            "question": args.question,
            "priority": args.priority,
            "subspecialty": args.subspecialty,
            "jurisdiction": args.jurisdiction,
            "language": args.language,
            "deadline_seconds": int(args.deadline_hours * 3600),
            "deidentify": not args.identified,
            "burned_in_checked": args.burned_in_checked,
            "black_out_top": args.black_out_top,
            "priors": args.prior or [],
            "with_priors": args.with_priors,
        },
    )
    print(f"Consult {done['id']} requested ({done['priority']}, {done['subspecialty']})")
    if done.get("priors"):
        print(f"  with {done['priors']} prior stud{'y' if done['priors'] == 1 else 'ies'}")
    for node_id, how in done["sent"].items():
        print(f"  offered to {NodeId.parse(node_id).short()}: {how}")
    wire: bytes | None = done["wire"]
    return wire


def _write(out: str, wire: bytes, kind: str) -> None:
    Path(out).write_bytes(wire)
    print(f"Signed {kind} written to {out}")


def cmd_request(args: argparse.Namespace) -> int:
    from node.dicom import sharing
    from node.dicom.deid import PseudonymMap

    home = home_of(args)
    config = home.load_config()
    if args.deadline_hours <= 0:
        raise LocalConsultError("--deadline-hours must be positive")
    if args.max_offers < 1:
        raise LocalConsultError("--max-offers must be at least 1")
    if args.to:  # the short id `radmesh peers` prints will do, if no other peer has it
        args.to = str(resolve_id(args.to, known_ids(home)))
    peer = NodeId.parse(args.to) if args.to else None
    if args.route:
        if peer is not None:
            raise LocalConsultError("use --route or --to, not both")
        if not config.network.registries and not config.network.mdns:
            raise LocalConsultError(
                "--route searches the registries: add one to config.toml [network] "
                "registries, or choose the consultant with --to"
            )
    if args.identified:
        print(sharing.IDENTIFIED_WARNING, file=sys.stderr)
    online = args.route or (peer is not None and _on_network(home, config, peer))
    if (args.prior or args.with_priors) and not online:
        raise LocalConsultError(
            "prior studies go with a request sent over the network only: configure a "
            "registry (or reach the consultant on the LAN), or request without --prior"
        )
    if online:
        wire = _request_online(args, home)
        if args.out and wire is not None:
            _write(args.out, wire, "request")
        return 0
    identity = load_identity(home.key_path)
    now = int(time.time())
    pseudonyms = None if args.identified else PseudonymMap()
    request = ConsultRequest.new(
        requester=identity.node_id,
        study_uid=args.study if pseudonyms is None else pseudonyms.pseudo_uid(args.study),
        question=args.question,
        priority=Priority(args.priority),
        subspecialty=args.subspecialty,
        jurisdiction=args.jurisdiction or config.country,
        language=args.language or (config.languages[0] if config.languages else "en"),
        deadline=now + int(args.deadline_hours * 3600),
        now=now,
        deidentified=not args.identified,
    )
    _offline_share(home, identity, request, pseudonyms, args, peer)
    wire = request.to_wire(identity)
    with _open_db(home) as db:
        db.add(request, role=Role.REQUESTER, now=now, wire=wire)
        if peer is not None:
            db.offer(request.id, [peer], now, str(identity.node_id))
    print(f"Consult {request.id} requested ({request.priority.value}, {request.subspecialty})")
    if args.out:
        _write(args.out, wire, "request")
    else:
        print(
            "The request is stored but not sent (no registry configured and no LAN address "
            "known for the consultant); use --out FILE to carry it, then "
            "`radmesh consult import FILE` on the other node"
        )
    return 0


def _offline_share(
    home: NodeHome,
    identity: Identity,
    request: ConsultRequest,
    pseudonyms: PseudonymMap | None,
    args: argparse.Namespace,
    peer: NodeId | None,
) -> None:
    """The offline request shares like the online one: the study is checked for burned-in
    text (when this node stores it), the pseudonym map is kept here (so the node serves the
    de-identified study when the consultant fetches it), and the share is audited."""
    from node.app.cases import pseudonym_map_path
    from node.dicom import sharing
    from node.dicom.store import open_store

    original = args.study
    with open_store(home, identity) as store, open_audit(home, identity) as audit:
        who = str(peer) if peer is not None else None
        if pseudonyms is None:
            sharing.audit_identified(audit, original, now=time.time(), peer=who, via="consult")
        else:
            if store.instances(original):
                sharing.check_free_text(store, original, args.question, "clinical question")
                pseudonyms.burned_in_checked = sharing.confirm_burned_in(
                    store,
                    audit,
                    original,
                    args.burned_in_checked,
                    now=time.time(),
                    peer=who,
                    consult=request.id,
                    black_out_top=args.black_out_top,
                )
            pseudonyms.black_out_top = args.black_out_top
            key = identity.derive_key(sharing.PSEUDONYM_KEY_PURPOSE)
            pseudonyms.persist(pseudonym_map_path(home, request.id), key)
        audit.append(
            AuditKind.SHARE,
            now=time.time(),
            study_uid=original,
            peer=who,
            details={"consult": request.id, "deidentified": str(pseudonyms is not None)},
        )
        audit.checkpoint(time.time())


def cmd_import(args: argparse.Namespace) -> int:
    """Take in a signed request or response that arrived out of band."""
    from consult.intake import take_in

    home = home_of(args)
    data = Path(args.file).read_bytes()
    with _open_db(home) as db:
        intake = take_in(db, data, int(time.time()))
    print(intake.summary)
    if intake.kind == "request":
        print(f"`radmesh consult show {intake.consult_id[:8]}` shows it")
    return 0


def _respond(args: argparse.Namespace, event: Event) -> int:
    home = home_of(args)
    now = int(time.time())
    with _open_db(home) as db:
        consult_id = db.resolve(args.id)
        info = db.info(consult_id)
        if info.role is not Role.CONSULTANT:
            raise LocalConsultError(
                f"consult {consult_id[:8]} was requested by this node; only the consultant "
                f"who received it can {event.value} it"
            )
        identity = load_identity(home.key_path)
        transition = db.apply(consult_id, event, now, str(identity.node_id))
    if info.request_wire is None:
        raise LocalConsultError(f"consult {consult_id[:8]} has no signed request on this node")
    wire = ConsultResponse(consult_id, identity.node_id, event, now, args.reason).to_wire(identity)
    print(f"Consult {consult_id[:8]} is now {transition.target.value}")
    _send(home, SignedEnvelope.from_wire(info.request_wire).signer, "response", wire, args.out)
    return 0


def cmd_accept(args: argparse.Namespace) -> int:
    return _respond(args, Event.ACCEPT)


def cmd_decline(args: argparse.Namespace) -> int:
    return _respond(args, Event.DECLINE)


# `--score`: the word a person types -> the review's score (consult.report.Score)
SCORES = {"agree": "agree", "minor": "minor_discrepancy", "major": "major_discrepancy"}


def cmd_review(args: argparse.Namespace) -> int:
    """The QA step: score the report this node received; it goes to the report's author."""
    home = home_of(args)
    with _open_db(home) as db:
        consult_id = db.resolve(args.id)
        peer = db.info(consult_id).peer_id
    if not _on_network(home, home.load_config(), peer):
        raise LocalConsultError(
            "a review is sent to the report's author: add a registry to config.toml "
            "[network] registries, or find the consultant on the LAN first (`radmesh peers`)"
        )
    how = _run(
        home,
        "consult.review",
        {"id": consult_id, "score": SCORES[args.score], "comment": args.comment},
    )
    print(f"Review of consult {consult_id[:8]} ({args.score}) kept here and sent: {how}")
    return 0


def cmd_withdraw(args: argparse.Namespace) -> int:
    """The requester cancels: every consultant the request was offered to is told."""
    home = home_of(args)
    reason = args.reason or "withdrawn by the requester"
    with _open_db(home) as db:
        consult_id = db.resolve(args.id)
        peer = db.info(consult_id).peer_id
    if _on_network(home, home.load_config(), peer):
        unreached = _run(home, "consult.withdraw", {"id": consult_id, "reason": reason})
        print(f"Consult {consult_id[:8]} withdrawn")
        for node_id in unreached:
            print(
                f"  {NodeId.parse(node_id).short()} could not be told now; its copy expires "
                "at the deadline"
            )
        return 0
    identity = load_identity(home.key_path)
    now = int(time.time())
    with _open_db(home) as db:
        if db.info(consult_id).role is not Role.REQUESTER:
            raise LocalConsultError(
                f"consult {consult_id[:8]} was sent to this node; only the requester withdraws it"
            )
        db.apply(consult_id, Event.WITHDRAW, now, str(identity.node_id))
    wire = ConsultResponse(consult_id, identity.node_id, Event.WITHDRAW, now, reason)
    print(f"Consult {consult_id[:8]} withdrawn here; no network configured to tell consultants")
    if args.out:
        _write(args.out, wire.to_wire(identity), "withdrawal")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    """The consultant pulls the (de-identified) study of an accepted consult."""
    home = home_of(args)
    with _open_db(home) as db:
        consult_id = db.resolve(args.id)
        info = db.info(consult_id)
    if info.role is not Role.CONSULTANT:
        raise LocalConsultError(
            f"consult {consult_id[:8]} was requested by this node: the study is already here"
        )
    if not _on_network(home, home.load_config(), info.peer_id):
        raise LocalConsultError(
            "the study comes from the requesting node: add a registry to config.toml "
            "[network] registries, or find that node on the LAN first (`radmesh peers`)"
        )
    done = _run(home, "consult.fetch", {"id": consult_id})
    print(f"\nStudy of consult {consult_id[:8]} received and stored: {done}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """The consultant signs and sends the report of a consult (``--critical`` for a
    finding that needs action now: the hospital is paged until someone acknowledges)."""
    home = home_of(args)
    with _open_db(home) as db:
        consult_id = db.resolve(args.id)
    how = _run(
        home,
        "consult.report",
        {"id": consult_id, "text": args.text, "impression": args.impression,
         "critical": args.critical},
    )  # fmt: skip
    print(f"Report of consult {consult_id[:8]} signed and {how}")
    return 0


def cmd_ack(args: argparse.Namespace) -> int:
    """The referrer acknowledges the report it received (by name: required when critical)."""
    home = home_of(args)
    with _open_db(home) as db:
        consult_id = db.resolve(args.id)
    how, seconds = _run(home, "consult.ack", {"id": consult_id, "by": args.by})
    print(
        f"Report of consult {consult_id[:8]} acknowledged"
        + (f" by {printable(args.by, 80)}" if args.by else "")
        + f", {_age(int(seconds))} after it arrived; consultant told: {how}"
    )
    return 0


def _ack_flag(row: ReportAck | None, state: State, policy: AckPolicy, now: int) -> str:
    """What `consult list` says about a report's acknowledgement."""
    if row is None or state is not State.REPORTED:
        return ""
    mark = "CRITICAL " if row.critical else ""
    if policy.overdue(row.priority, row.critical, row.reported_at, now):
        return f"{mark}NOT ACKNOWLEDGED {_age(now - row.reported_at)}  "
    return mark


def _age(seconds: int) -> str:
    sign, seconds = ("-" if seconds < 0 else ""), abs(seconds)
    if seconds < 3600:
        return f"{sign}{seconds // 60}m"
    if seconds < 86400:
        return f"{sign}{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{sign}{seconds // 86400}d{seconds % 86400 // 3600}h"


def cmd_list(args: argparse.Namespace) -> int:
    from node.app.alerts import policy_of

    home = home_of(args)
    now = int(time.time())
    with _open_db(home) as db:
        db.expire_due(now)
        states = None if args.all else [State(s) for s in args.state] or None
        cases = db.cases(states)
        if not args.all and not args.state:
            cases = [c for c in cases if c.state not in (State.ACKNOWLEDGED, State.WITHDRAWN)]
        rows = [(c, db.info(c.request.id).role) for c in cases]
        acks = {r.consult_id: r for r in db.report_acks()}
    policy = policy_of(home.load_config().alerts)
    if not rows:
        print("No consults." + ("" if args.all else " (`--all` shows closed ones)"))
        return 0
    print(
        f"{'ID':8}  {'PRIO':7}  {'STATE':12}  {'ROLE':10}  {'SUBSPEC':12}  {'DUE':>7}  "
        f"{'TAT':>7}  QUESTION"
    )
    for case, role in rows:
        r = case.request
        question = printable(r.question.replace("\n", " "), 41)
        turnaround = case.turnaround()
        print(
            f"{printable(r.id[:8])}  {r.priority.value:7}  {case.state.value:12}  {role.value:10}  "
            f"{printable(r.subspecialty, 12):12}  {_age(r.deadline - now):>7}  "
            f"{_age(turnaround) if turnaround is not None else '-':>7}  "
            f"{_ack_flag(acks.get(r.id), case.state, policy, now)}{question}"
        )
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    """Turnaround (requested to reported) per priority, over every case on this node."""
    from consult.alerts import critical_stats

    home = home_of(args)
    with _open_db(home) as db:
        stats = turnaround_by_priority(db.cases())
        critical = critical_stats(db.report_acks())

    def age(seconds: float | None) -> str:
        return "-" if seconds is None else _age(int(seconds))

    print(f"{'PRIORITY':8}  {'REPORTED':>8}  {'MEDIAN':>7}  {'P90':>7}  {'MAX':>7}  {'LATE':>4}")
    for priority, row in stats.items():
        print(
            f"{priority.value:8}  {row.reported:>8}  {age(row.median_s):>7}  "
            f"{age(row.p90_s):>7}  {age(row.max_s):>7}  {row.late:>4}"
        )
    print(
        f"critical results: {critical.critical}, acknowledged {critical.acknowledged} "
        f"(time to acknowledge: median {age(critical.median_s)}, max {age(critical.max_s)}), "
        f"not acknowledged now: {critical.unacknowledged}"
    )
    return 0


def _peer_label(home: NodeHome, peer: str) -> str:
    """``Dr X (SHORTID, verified)``: the name the peer's record gives, with the key's short
    id and this node's trust in it (a name alone proves nothing)."""
    from registry.directory import PeerDirectory

    try:
        node_id = NodeId.parse(peer)
    except InvalidNodeId:
        return ""
    home.data_dir.mkdir(parents=True, exist_ok=True)
    trust = TrustStore(home.trust_db)
    directory = PeerDirectory(home.peers_db, trust)
    try:
        record = directory.remembered(node_id)
        state = (
            trust.state(record.public_key, int(time.time()), record.org_certificate)
            if record is not None
            else trust.known().get(node_id, TrustState.UNKNOWN)
        )
    finally:
        directory.close()
        trust.close()
    return peer_label(record.display_name if record else "", node_id.short(), state.value)


def _print_case(
    case: ConsultCase, role: Role, peer: str, now: int, reviews: list[PeerReview], who: str = ""
) -> None:
    r, text = case.request, printable  # every field but the state was written by a peer
    print(f"Consult {text(r.id, 80)}")
    print(f"  state:         {case.state.value}  (this node is the {role.value})")
    print(f"  priority:      {r.priority.value}")
    print(f"  question:      {text(r.question, multiline=True)}")
    print(
        f"  subspecialty:  {text(r.subspecialty, 40)}   origin: {text(r.jurisdiction, 8)}   "
        f"language: {text(r.language, 16)}"
    )
    kind = "de-identified" if r.deidentified else "identified"
    print(f"  study:         {text(r.study_uid, 80)}  ({kind})")
    print(f"  requester:     {r.requester}")
    if peer:
        print(f"  peer:          {text(peer, 80)}  {who}")
    print(f"  created:       {time.strftime('%Y-%m-%d %H:%M', time.gmtime(r.created_at))} UTC")
    print(f"  deadline:      {time.strftime('%Y-%m-%d %H:%M', time.gmtime(r.deadline))} UTC")
    turnaround = case.turnaround()
    if turnaround is not None:
        print(f"  turnaround:    {_age(turnaround)}")
    print("  history:")
    print(f"    {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(r.created_at))}  requested")
    for t in case.history:
        who = f"  by {t.actor[:7]}" if t.actor else ""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t.at))
        print(f"    {stamp}  {t.event.value} -> {t.target.value}{who}")
    for review in reviews:
        stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime(review.at))
        print(
            f"  peer review:   {review.score.value.replace('_', ' ')} by "
            f"{review.reviewer.short()} at {stamp} UTC"
            + (f": {printable(review.comment, multiline=True)}" if review.comment else "")
        )


def cmd_show(args: argparse.Namespace) -> int:
    from consult import report_text

    home = home_of(args)
    with _open_db(home) as db:
        consult_id = db.resolve(args.id)
        case = db.get(consult_id)
        info = db.info(consult_id)
        role, peer = info.role, info.peer
        reviews = db.reviews(consult_id)
        report = _report_sections(db, consult_id)
        ack = db.report_ack(consult_id)
    _print_case(
        case, role, peer, int(time.time()), reviews, _peer_label(home, peer) if peer else ""
    )
    if ack is not None:
        print(f"  report:        {_ack_line(ack)}")
    if role is Role.CONSULTANT:
        _print_retention(home, consult_id)
    if report is not None:
        _print_peer_text("\n" + report_text.as_text(report))
    return 0


def _print_peer_text(text: str) -> None:
    """The one way a peer's report reaches the terminal: control characters made visible."""
    print(printable(text, multiline=True), end="" if text.endswith("\n") else "\n")


def _report_sections(db: ConsultDB, consult_id: str) -> list[report_text.Section] | None:
    from consult import report_text
    from consult.report_view import addenda_sections, checked_report

    report = checked_report(db, consult_id)
    if report is None:
        return None
    if isinstance(report, BadReport):
        return report_text.unverified_sections(consult_id, str(report))
    return report_text.report_sections(report, report_text.Signature(True, "")) + addenda_sections(
        db, consult_id, report.author
    )


def _audit_report_export(home: NodeHome, consult_id: str, report: Report, out: Path) -> None:
    """Every export is audited: which report (its author and signing time), in what form.
    The file name stays out of the log: a person may have named it after the patient."""
    identity = load_identity(home.key_path)
    with open_audit(home, identity) as audit:
        audit.append(
            AuditKind.EXPORT,
            now=time.time(),
            peer=str(report.author),
            details={
                "consult": consult_id,
                "to": "file",
                "format": "html" if out.suffix.lower() in (".html", ".htm") else "text",
                "signed_at": str(report.finalised_at),
            },
        )
        audit.checkpoint(time.time())


def cmd_export(args: argparse.Namespace) -> int:
    from consult import report_text
    from consult.report import Report
    from consult.report_view import addenda_sections, checked_report

    home = home_of(args)
    with _open_db(home) as db:
        consult_id = db.resolve(args.id)
        report = checked_report(db, consult_id)
        addenda = (
            addenda_sections(db, consult_id, report.author) if isinstance(report, Report) else []
        )
    if report is None:
        raise LocalConsultError(
            f"consult {consult_id[:8]} has no report on this node yet: "
            "`radmesh consult show` tells where it stands"
        )
    if isinstance(report, BadReport):
        raise LocalConsultError(
            f"the report of consult {consult_id[:8]} no longer verifies ({report}): it was "
            "not written; ask the consultant to send it again"
        )
    sections = report_text.report_sections(report, report_text.Signature(True, "")) + addenda
    out = Path(args.out)
    if out.suffix.lower() in (".html", ".htm"):
        data = report_text.as_html(sections, title=f"Consult report {consult_id[:8]}")
    else:
        data = report_text.as_text(sections)
    out.write_text(data, encoding="utf-8")
    _audit_report_export(home, consult_id, report, out)
    print(f"Report of consult {consult_id[:8]} written to {out}")
    return 0


def _ack_line(ack: ReportAck) -> str:
    kind = "CRITICAL result" if ack.critical else "report"
    if ack.acked_at is None:
        steps = f" ({ack.steps} repeat(s) so far)" if ack.steps else ""
        return f"{kind}, not acknowledged yet{steps}"
    by = f" by {printable(ack.acked_by, 80)}" if ack.acked_by else ""
    return f"{kind}, acknowledged{by} {_age(ack.time_to_ack or 0)} after it arrived"


def _pin(args: argparse.Namespace, pin: bool) -> int:
    from node.app.retention import RetentionDB

    home = home_of(args)
    with _open_db(home) as db:
        consult_id = db.resolve(args.id)
    retention = RetentionDB(home.data_dir)
    try:
        if pin:
            retention.pin(consult_id, int(time.time()))
            print(f"Consult {consult_id[:8]} pinned: its study is kept past the retention window.")
        elif retention.unpin(consult_id):
            print(f"Consult {consult_id[:8]} unpinned: [retention] applies to its study again.")
        else:
            print(f"Consult {consult_id[:8]} was not pinned.")
    finally:
        retention.close()
    return 0


def _print_retention(home: NodeHome, consult_id: str) -> None:
    from node.app.retention import RetentionDB

    retention = RetentionDB(home.data_dir)
    try:
        line = retention.describe(consult_id)
    finally:
        retention.close()
    if line:
        print(f"  retention:     {line}")


def cmd_pin(args: argparse.Namespace) -> int:
    return _pin(args, True)


def cmd_unpin(args: argparse.Namespace) -> int:
    return _pin(args, False)


def register(sub: Any) -> None:
    consult = sub.add_parser(
        "consult",
        help="consult requests: request, import, list, accept, decline, review, show, stats",
        description="Ask for and answer consultations.",
    )
    csub = consult.add_subparsers(dest="consult_command", metavar="CONSULT_COMMAND", required=True)

    p = csub.add_parser("request", help="ask for a consultation on a study")
    p.add_argument("--study", required=True, help="Study Instance UID (as shared)")
    p.add_argument("--question", required=True, help="the clinical question")
    p.add_argument("--priority", choices=[x.value for x in Priority], default="routine")
    p.add_argument("--subspecialty", required=True, help="e.g. neuro, msk, paediatric")
    p.add_argument("--jurisdiction", default="", help="patient's country (default: this node's)")
    p.add_argument("--language", default="", help="report language (default: this node's first)")
    p.add_argument("--deadline-hours", type=float, default=24.0, help="hours until it expires")
    p.add_argument("--to", metavar="NODE_ID", help="send to this consultant")
    p.add_argument(
        "--route",
        action="store_true",
        help="offer it to trusted consultants online with the subspecialty and a licence "
        "for the jurisdiction; the first to accept gets it",
    )
    p.add_argument("--max-offers", type=int, default=3, help="with --route: how many at once")
    p.add_argument(
        "--prior",
        action="append",
        metavar="STUDY_UID",
        help="an earlier study of the same patient held here, sent after the study "
        "(repeat for more; bring it from the PACS with `radmesh dicom retrieve`)",
    )
    p.add_argument(
        "--with-priors",
        action="store_true",
        help="send every earlier study of the same patient held here (most recent first)",
    )
    add_sharing_options(p)
    p.add_argument("--out", metavar="FILE", help="also write the signed request to FILE")
    p.set_defaults(handler=cmd_request)

    p = csub.add_parser("import", help="take in a signed request or response from a file")
    p.add_argument("file")
    p.set_defaults(handler=cmd_import)

    p = csub.add_parser("list", help="the consult worklist, most urgent first")
    p.add_argument("--all", action="store_true", help="include closed consults")
    p.add_argument(
        "--state", action="append", default=[], choices=[s.value for s in State], help="filter"
    )
    p.set_defaults(handler=cmd_list)

    for name, handler, text in (
        ("accept", cmd_accept, "take a consult offered to this node"),
        ("decline", cmd_decline, "decline a consult offered to this node"),
    ):
        p = consult_command(csub, name, text, handler)
        p.add_argument("--reason", default="", help="a note for the requester")
        p.add_argument("--out", metavar="FILE", help="also write the signed response to FILE")

    consult_command(csub, "fetch", "pull the study of a consult this node accepted", cmd_fetch)

    p = consult_command(
        csub, "withdraw", "cancel a request of this node; consultants are told", cmd_withdraw
    )
    p.add_argument("--reason", default="", help="a note for the consultants")
    p.add_argument("--out", metavar="FILE", help="also write the signed withdrawal to FILE")

    p = consult_command(
        csub, "report", "sign and send the report of a consult in review", cmd_report
    )
    p.add_argument("--impression", required=True, help="the conclusion")
    p.add_argument("--text", default="", help="the findings")
    p.add_argument(
        "--critical",
        action="store_true",
        help="a finding that needs action now: delivered first, pages the hospital until "
        "a named person acknowledges it",
    )

    p = consult_command(csub, "ack", "acknowledge the report this node received", cmd_ack)
    p.add_argument("--by", default="", help='who takes it on, e.g. "Dr Name" (critical: required)')

    p = csub.add_parser("stats", help="turnaround per priority: median time to report")
    p.set_defaults(handler=cmd_stats)

    p = consult_command(csub, "review", "score the report this node received (QA)", cmd_review)
    p.add_argument("--score", required=True, choices=list(SCORES), help="agree, or discrepancy")
    p.add_argument("--comment", default="", help="what differs, for the report's author")

    consult_command(
        csub, "show", "one consult: details, audited history, peer reviews, the report", cmd_show
    )

    p = consult_command(csub, "export", "write the consult's signed report to a file", cmd_export)
    p.add_argument(
        "--out", required=True, metavar="FILE", help="plain text, or HTML if FILE ends in .html"
    )

    for name, handler, text in (
        ("pin", cmd_pin, "keep this consult's study past the [retention] window"),
        ("unpin", cmd_unpin, "let [retention] purge this consult's study again"),
    ):
        consult_command(csub, name, text, handler)

    register_guests(csub)  # invite, guests, approve-guest
    register_addenda(csub)  # addendum


__all__ = ["register"]
