"""``radmesh consult invite | guests | approve-guest``: guests of a consult's live session.

A party proposes a guest (``invite``), the other party approves or refuses it
(``approve-guest [--refuse]``); ``guests`` lists them with who approved. The
proposal and the answer run on the home's running node (its control socket), or
on a node brought up for the command, like the other consult commands; see
:mod:`node.app.guests` for the rules.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from crypto.identity import NodeId
from node.cli.identity import home_of
from node.cli.ids import consult_command, known_ids, resolve_id
from node.core.config import NodeHome
from node.core.display import printable
from node.core.keystore import load_identity


def _ids(home: NodeHome, args: argparse.Namespace) -> tuple[str, str]:
    """The full consult id and the guest's full node id (short ids resolved here)."""
    from consult.store import ConsultDB

    home.require()
    with ConsultDB.in_data_dir(home.data_dir) as db:
        consult_id = db.resolve(args.id)
    return consult_id, str(resolve_id(args.guest, known_ids(home)))


def _run(home: NodeHome, op: str, args: dict[str, Any]) -> Any:
    from node.app import commands  # the node's stack: not for building the parser

    return asyncio.run(commands.run(home, op, args, lambda line: print(line, end="\r", flush=True)))


def cmd_invite(args: argparse.Namespace) -> int:
    home = home_of(args)
    consult_id, guest = _ids(home, args)
    print(_run(home, "consult.guest.propose", {"id": consult_id, "guest": guest}))
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    home = home_of(args)
    consult_id, guest = _ids(home, args)
    answer = {"id": consult_id, "guest": guest, "approve": not args.refuse}
    print(_run(home, "consult.guest.answer", answer))
    return 0


def _who(nodes: frozenset[str], own: str) -> str:
    names = sorted("this node" if n == own else NodeId.parse(n).short() for n in nodes)
    return ", ".join(names) or "-"


def cmd_guests(args: argparse.Namespace) -> int:
    from consult.store import ConsultDB
    from node.app import guests as live_guests

    home = home_of(args)
    home.require()
    own = str(load_identity(home.key_path).node_id)
    with ConsultDB.in_data_dir(home.data_dir) as db:
        consult_id = db.resolve(args.id)
        found = live_guests.statuses(db, own, consult_id)
    if not found:
        print(
            f"No guests proposed for consult {consult_id[:8]}. "
            f"`radmesh consult invite {consult_id[:8]} --guest PEER` proposes one."
        )
        return 0
    print(f"{'GUEST':56}  {'STATE':8}  {'APPROVED BY':24}  REFUSED BY")
    for status in found:
        print(
            f"{printable(status.guest, 56):56}  {status.state:8}  "
            f"{_who(status.approvers, own):24}  {_who(status.refusers, own)}"
        )
        if status.waits_for(own):
            print(
                f"  waits for your answer: `radmesh consult approve-guest {consult_id[:8]} "
                f"--guest {NodeId.parse(status.guest).short()}` (add --refuse to refuse it)"
            )
    return 0


def register_into(csub: Any) -> None:
    """Add the guest subcommands to ``radmesh consult``."""
    p = consult_command(
        csub,
        "invite",
        "propose a guest (a trusted peer) for the consult's live session",
        cmd_invite,
    )
    p.add_argument("--guest", required=True, metavar="PEER", help="node id (or its short id)")

    consult_command(
        csub, "guests", "guests of the consult's live session, who approved", cmd_guests
    )

    p = consult_command(
        csub, "approve-guest", "approve (or --refuse) a guest the other party proposed", cmd_approve
    )
    p.add_argument("--guest", required=True, metavar="PEER", help="node id (or its short id)")
    p.add_argument(
        "--refuse",
        action="store_true",
        help="refuse it; after approving, this takes the guest out of the session",
    )


__all__ = ["register_into"]
