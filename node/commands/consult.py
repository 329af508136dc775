"""``radmesh consult request | import | list | accept | decline | show``.

Works against the local node's consult database. Anything that must reach a
peer goes through :func:`deliver`, the one transport hook: until the runtime
wires it, it reports "not sent" and the signed bytes can be written to a file
(``--out``) and brought to the other node with ``radmesh consult import``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from consult.errors import LocalConsultError
from consult.intake import take_in
from consult.requests import (
    ConsultCase,
    ConsultRequest,
    ConsultResponse,
    Event,
    Priority,
    State,
)
from consult.store import ConsultDB
from crypto.identity import NodeId
from node.commands.identity import home_of
from node.config import NodeHome
from node.keystore import load_identity

# The transport hook: (home, peer, kind, signed bytes) -> True once handed to the network.
# ``kind`` is "request" or "response". The runtime replaces this; the default sends nothing.
Deliver = Callable[[NodeHome, NodeId, str, bytes], bool]


def _not_connected(home: NodeHome, peer: NodeId, kind: str, wire: bytes) -> bool:
    return False


deliver: Deliver = _not_connected


def _open_db(home: NodeHome) -> ConsultDB:
    home.require()
    return ConsultDB.in_data_dir(home.data_dir)


def _send(home: NodeHome, peer: NodeId, kind: str, wire: bytes, out: str | None) -> None:
    if out:
        Path(out).write_bytes(wire)
        print(f"Signed {kind} written to {out}")
    if deliver(home, peer, kind, wire):
        print(f"Sent the {kind} to {peer.short()}")
    elif not out:
        print(
            f"The {kind} is stored but not sent (this node is not connected to the network); "
            "use --out FILE to carry it, then `radmesh consult import FILE` on the other node"
        )


def cmd_request(args: argparse.Namespace) -> int:
    home = home_of(args)
    config = home.load_config()
    identity = load_identity(home.key_path)
    now = int(time.time())
    if args.deadline_hours <= 0:
        raise LocalConsultError("--deadline-hours must be positive")
    request = ConsultRequest.new(
        requester=identity.node_id,
        study_uid=args.study,
        question=args.question,
        priority=Priority(args.priority),
        subspecialty=args.subspecialty,
        jurisdiction=args.jurisdiction or config.country,
        language=args.language or (config.languages[0] if config.languages else "en"),
        deadline=now + int(args.deadline_hours * 3600),
        now=now,
        deidentified=not args.identified,
    )
    wire = request.to_wire(identity)
    peer = NodeId.parse(args.to) if args.to else None
    with _open_db(home) as db:
        db.add(request, role="requester", now=now, wire=wire)
        if peer is not None:
            db.offer(request.id, [peer], now, str(identity.node_id))
    print(f"Consult {request.id} requested ({request.priority.value}, {request.subspecialty})")
    if peer is not None:
        _send(home, peer, "request", wire, args.out)
    elif args.out:
        Path(args.out).write_bytes(wire)
        print(f"Signed request written to {args.out}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """Take in a signed request or response that arrived out of band."""
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
        role, peer, _ = db.info(consult_id)
        if role != "consultant":
            raise LocalConsultError(
                f"consult {consult_id[:8]} was requested by this node; only the consultant "
                f"who received it can {event.value} it"
            )
        identity = load_identity(home.key_path)
        transition = db.apply(consult_id, event, now, str(identity.node_id))
    wire = ConsultResponse(consult_id, identity.node_id, event, now, args.reason).to_wire(identity)
    print(f"Consult {consult_id[:8]} is now {transition.target.value}")
    _send(home, NodeId.parse(peer), "response", wire, args.out)
    return 0


def cmd_accept(args: argparse.Namespace) -> int:
    return _respond(args, Event.ACCEPT)


def cmd_decline(args: argparse.Namespace) -> int:
    return _respond(args, Event.DECLINE)


def _age(seconds: int) -> str:
    sign, seconds = ("-" if seconds < 0 else ""), abs(seconds)
    if seconds < 3600:
        return f"{sign}{seconds // 60}m"
    if seconds < 86400:
        return f"{sign}{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{sign}{seconds // 86400}d{seconds % 86400 // 3600}h"


def cmd_list(args: argparse.Namespace) -> int:
    home = home_of(args)
    now = int(time.time())
    with _open_db(home) as db:
        db.expire_due(now)
        states = None if args.all else [State(s) for s in args.state] or None
        cases = db.cases(states)
        if not args.all and not args.state:
            cases = [c for c in cases if c.state not in (State.ACKNOWLEDGED, State.WITHDRAWN)]
        rows = [(c, db.info(c.request.id)[0]) for c in cases]
    if not rows:
        print("No consults." + ("" if args.all else " (`--all` shows closed ones)"))
        return 0
    print(f"{'ID':8}  {'PRIO':7}  {'STATE':12}  {'ROLE':10}  {'SUBSPEC':12}  {'DUE':>7}  QUESTION")
    for case, role in rows:
        r = case.request
        question = r.question.replace("\n", " ")
        print(
            f"{r.id[:8]}  {r.priority.value:7}  {case.state.value:12}  {role:10}  "
            f"{r.subspecialty[:12]:12}  {_age(r.deadline - now):>7}  "
            f"{question[:40] + ('…' if len(question) > 40 else '')}"
        )
    return 0


def _print_case(case: ConsultCase, role: str, peer: str, now: int) -> None:
    r = case.request
    print(f"Consult {r.id}")
    print(f"  state:         {case.state.value}  (this node is the {role})")
    print(f"  priority:      {r.priority.value}")
    print(f"  question:      {r.question}")
    print(f"  subspecialty:  {r.subspecialty}   origin: {r.jurisdiction}   language: {r.language}")
    print(
        f"  study:         {r.study_uid}  ({'de-identified' if r.deidentified else 'identified'})"
    )
    print(f"  requester:     {r.requester}")
    if peer:
        print(f"  peer:          {peer}")
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


def cmd_show(args: argparse.Namespace) -> int:
    home = home_of(args)
    with _open_db(home) as db:
        consult_id = db.resolve(args.id)
        case = db.get(consult_id)
        role, peer, _ = db.info(consult_id)
    _print_case(case, role, peer, int(time.time()))
    return 0


def register(sub: Any) -> None:
    consult = sub.add_parser(
        "consult",
        help="consult requests: request, import, list, accept, decline, show",
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
    p.add_argument("--identified", action="store_true", help="the study is NOT de-identified")
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
        p = csub.add_parser(name, help=text)
        p.add_argument("id", help="consult id (a unique prefix is enough)")
        p.add_argument("--reason", default="", help="a note for the requester")
        p.add_argument("--out", metavar="FILE", help="also write the signed response to FILE")
        p.set_defaults(handler=handler)

    p = csub.add_parser("show", help="one consult: details and audited history")
    p.add_argument("id", help="consult id (a unique prefix is enough)")
    p.set_defaults(handler=cmd_show)


__all__ = ["deliver", "register"]
