"""``radmesh consult addendum ID --text "..."``: amend a signed report, the only way.

A signed report is final. The consultant who signed it adds a signed addendum
(:mod:`consult.addenda`); it runs on the home's running node (its control socket),
or on a node brought up for the command, like the other consult commands, and is
delivered like the report (:meth:`node.app.reports.ReportDesk.send_addendum`). The hospital files
it as a new SR naming the report's SR as its predecessor.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from consult.store import ConsultDB
from node.cli.identity import home_of
from node.cli.ids import consult_command


def cmd_addendum(args: argparse.Namespace) -> int:
    from node.app import commands  # the node's stack: not for building the parser

    home = home_of(args)
    home.require()
    with ConsultDB.in_data_dir(home.data_dir) as db:
        consult_id = db.resolve(args.id)
    number, how = asyncio.run(
        commands.run(
            home,
            "consult.addendum",
            {"id": consult_id, "text": args.text},
            lambda line: print(line, end="\r", flush=True),
        )
    )
    print(f"Addendum {number} to the report of consult {consult_id[:8]} signed; {how}")
    return 0


def register_into(csub: Any) -> None:
    p = consult_command(
        csub,
        "addendum",
        "amend the report this node signed (a signed report is final)",
        cmd_addendum,
    )
    p.add_argument("--text", required=True, help="what the addendum adds or corrects")
