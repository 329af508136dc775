"""This node's availability (online, on call, away): saved in the home's config and, on a
running node, signed into a new record and published at once (`radmesh status --set`,
the Home screen's key)."""

from __future__ import annotations

from typing import TYPE_CHECKING

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


__all__ = ["LABEL", "apply_availability", "next_availability", "save_availability"]
