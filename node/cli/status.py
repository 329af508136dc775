"""``radmesh status``: this node's availability (online, on call, away), shown or set.

Availability is what the node's signed record tells others: ``online`` (at the
desk now), ``on_call`` (reachable for urgent cases), ``away`` (not taking
cases). Routing offers cases to online consultants first, then on-call ones,
never to those away; `radmesh peers search --online` / ``--on-call`` filter by it.

`radmesh status --set on-call` writes the home's setting; when the home's node
runs (`radmesh node run`, the TUI), it signs and publishes the new record to
every registry and the LAN at once, through the control socket. The TUI's Home
screen cycles it with a key.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from node.app import control
from node.app.availability import LABEL, save_availability
from node.cli.identity import home_of
from node.core.config import NodeHome, parse_availability


def _print_retention(home: NodeHome) -> None:
    import sqlite3
    import time

    from node.cli.doctor import retention_line

    try:
        print(f"Retention: {retention_line(home, home.load_config(), int(time.time()))}")
    except (OSError, sqlite3.Error) as exc:
        print(f"Retention: cannot be read ({exc})")


def cmd_status(args: argparse.Namespace) -> int:
    home = home_of(args)
    home.require()
    if args.set:
        value = parse_availability(args.set)
        found, result = asyncio.run(
            control.ask_running(home, "status.set", {"availability": value}, print)
        )
        if found:
            print(f"The running node is {result}.")
        else:
            save_availability(home, value)
            print(f"Saved: {LABEL[value]}. The node publishes it when it starts.")
        return 0
    found, result = asyncio.run(control.ask_running(home, "status.get", {}, print))
    _print_retention(home)
    if not found:
        print(f"Availability: {LABEL[home.load_config().availability]} (the node is not running)")
        return 0
    print(f"Availability: {LABEL.get(str(result['availability']), '?')} (the node is running)")
    for url, state in dict(result["registries"]).items():
        print(f"  registry {url}: {state}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "status",
        help="show or set this node's availability (online, on call, away)",
        description="Show this node's availability, or set it with --set.",
    )
    p.add_argument(
        "--set",
        metavar="AVAILABILITY",
        default="",
        help="online, on-call or away; the running node publishes it at once",
    )
    p.set_defaults(handler=cmd_status)
