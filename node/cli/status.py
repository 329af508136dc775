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
from typing import TYPE_CHECKING, Any

from node.app import control
from node.cli.identity import home_of
from node.core.config import AVAILABILITY, NodeHome, parse_availability

if TYPE_CHECKING:
    from node.app.runtime import NodeRuntime

LABEL = {"online": "online", "on_call": "on call", "away": "away (taking no cases)"}


def save_availability(home: NodeHome, value: str) -> None:
    config = home.load_config()  # fresh: another command may have changed other settings
    config.availability = value
    home.save_config(config)


async def apply_availability(rt: NodeRuntime, value: str) -> str:
    """Make ``value`` this node's availability and publish it now; what to tell the user."""
    value = parse_availability(value)
    save_availability(rt.home, value)
    rt.config.availability = value
    await rt.republish()
    reached = [url for url, state in rt.registry_state.items() if state == "connected"]
    where = f"{len(reached)} of {len(rt.registry_state)} registries" if rt.registry_state else ""
    return f"now {LABEL[value]}" + (f"; published to {where}" if where else "")


def next_availability(value: str) -> str:
    return AVAILABILITY[(AVAILABILITY.index(value) + 1) % len(AVAILABILITY)]


@control.operation("status.set")
async def _op_set(rt: NodeRuntime, args: dict[str, Any], emit: control.Emit) -> str:
    return await apply_availability(rt, str(args.get("availability", "")))


@control.operation("status.get")
async def _op_get(rt: NodeRuntime, args: dict[str, Any], emit: control.Emit) -> dict[str, Any]:
    return {
        "availability": rt.config.availability,
        "registries": dict(rt.registry_state),
        # `radmesh doctor`: a held DICOM port that is this node's own is no problem
        "dicom": f"{rt.dicom.ae_title} on port {rt.dicom.port}" if rt.dicom is not None else "",
    }


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
