"""``radmesh tui`` (and plain ``radmesh``): open the terminal app with this node running in it.

The node (:class:`~node.app.runtime.NodeRuntime`) runs on its own event loop in its own
thread (:mod:`tui.node_thread`), not on the app's: started before the first screen,
stopped after the app exits, so live sessions, consult messages and the DICOM listener
work while the app is open, and neither loop waits behind the other.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from typing import Any

from crypto.identity import Identity
from node.cli.identity import home_of
from node.core.config import NodeConfig, NodeHome
from node.core.errors import NodeError
from node.core.keystore import load_identity


def _attach(home: NodeHome, low_bandwidth: bool | None) -> bool:
    """The home's node already runs (headless, or in another TUI): open the app on it
    through its control socket (:mod:`tui.remote`) instead of starting a second one.
    False when no node runs."""
    from node.app import control
    from tui.app import RadmeshApp
    from tui.remote import OPERATION, RemoteNode

    running, _ = asyncio.run(
        control.ask(home, OPERATION, {"method": "status", "args": []}, lambda _: None)
    )
    if not running:
        return False
    node = RemoteNode(home)
    try:
        RadmeshApp(node, low_bandwidth=low_bandwidth).run()
    finally:
        node.close()
    return True


def _low_bandwidth(args: argparse.Namespace) -> bool | None:
    """--low-bandwidth, else None: the app then reads RADMESH_LOW_BANDWIDTH."""
    return True if getattr(args, "low_bandwidth", False) else None


def _with_node(
    home: NodeHome, identity: Identity, config: NodeConfig, low_bandwidth: bool | None = None
) -> None:
    from node.app.runtime import NodeRuntime
    from node.cli.node import with_tui_operation
    from tui.app import RadmeshApp
    from tui.node_facade import RuntimeNode
    from tui.node_thread import NodeThread, ThreadedNode

    with NodeThread() as thread:

        async def started() -> NodeRuntime:
            # radmesh commands reach it, and a second `radmesh tui` on this home attaches
            runtime = NodeRuntime(
                home, identity, config, control=True, operations=with_tui_operation()
            )
            await runtime.start()  # its services too: serve fetches, file reports, resume
            return runtime

        runtime = thread.run(started())
        try:
            node = ThreadedNode(RuntimeNode(runtime), thread)
            asyncio.run(RadmeshApp(node, low_bandwidth=low_bandwidth).run_async())
        finally:
            thread.run(runtime.stop())


def _graphics(requested: str | None) -> bool:
    """Decide kitty/sixel/half-blocks now: the terminal can only be asked before Textual runs."""
    from tui import graphics

    try:
        graphics.setup(requested)
    except graphics.GraphicsError as exc:
        print(exc, file=sys.stderr)
        return False
    return True


def cmd_tui(args: argparse.Namespace) -> int:
    home = home_of(args)
    if not _graphics(getattr(args, "graphics", None)):
        return 2
    if not home.exists():
        print(
            f"no node in {home.root}: run `radmesh init` first",
            file=sys.stderr,
        )
        return 2
    config = home.load_config()
    network = config.network
    if args.listen is not None:
        network = dataclasses.replace(network, listen_host=args.listen)
    if args.no_mdns:
        network = dataclasses.replace(network, mdns=False)
    config = dataclasses.replace(config, network=network)
    if _attach(home, _low_bandwidth(args)):
        return 0
    identity = load_identity(home.key_path)
    try:
        _with_node(home, identity, config, _low_bandwidth(args))
    except (NodeError, OSError) as exc:
        print(f"the node could not start: {exc}", file=sys.stderr)
        return 1
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "tui",
        help="open the terminal app with the node running (the default command)",
        description="Worklist, studies, peers, the viewer and live consultations.",
    )
    p.add_argument("--listen", metavar="HOST", help="LAN endpoint address for this run")
    p.add_argument("--no-mdns", action="store_true", help="no mDNS discovery for this run")
    p.add_argument(
        "--graphics",
        choices=("auto", "kitty", "sixel", "halfblock"),
        help="how the viewer draws images (default: auto, or $RADMESH_GRAPHICS): kitty graphics "
        "or sixel at full resolution where the terminal supports them, else half-block cells",
    )
    add_low_bandwidth(p)
    p.set_defaults(handler=cmd_tui)


def add_low_bandwidth(p: Any) -> None:
    p.add_argument(
        "--low-bandwidth",
        action="store_true",
        help="for a slow link (SSH over a poor line): 256 colours, fewer and coarser repaints "
        "while scrolling fast, full detail when scrolling stops (or RADMESH_LOW_BANDWIDTH=1)",
    )
