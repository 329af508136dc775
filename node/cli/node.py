"""``radmesh node run``: the node without the TUI, for a hospital server beside the PACS."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import signal
from typing import TYPE_CHECKING, Any

from node.cli.identity import home_of
from node.core.display import printable
from node.core.keystore import load_identity

if TYPE_CHECKING:
    from node.app.operations import Operation


async def run_node(args: argparse.Namespace, stop: asyncio.Event | None = None) -> int:
    from node.app.runtime import NodeRuntime

    home = home_of(args)
    home.require()
    config = home.load_config()
    if getattr(args, "listen", None) is not None:  # `radmesh tui`'s options, for this run
        config.network = dataclasses.replace(config.network, listen_host=args.listen)
    if getattr(args, "no_mdns", False):
        config.network = dataclasses.replace(config.network, mdns=False)
    runtime = NodeRuntime(
        home, load_identity(home.key_path), config, control=True, operations=with_tui_operation()
    )
    await runtime.start()  # its services too: serve fetches, file reports, resume fetches
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    status = runtime.status()
    print(f"radmesh node {status.node_id} running")
    print(f"  LAN endpoint {status.lan_url}; DICOM listener: {status.dicom}")
    for url, state in status.registries.items():
        print(f"  registry {url}: {state}")
    print("Ctrl-C stops it; radmesh commands on this home run on it.", flush=True)
    try:
        if getattr(args, "for_tui", False):  # the notifications are the TUI's to show
            await stop.wait()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):  # not wait_for: it can lose a notification
                    text = await runtime.notifications.get()
                print(printable(text, multiline=True), flush=True)  # may quote a peer
    finally:
        await runtime.stop()
    print("stopped")
    return 0


def with_tui_operation() -> dict[str, Operation]:
    """The control table with the operations `radmesh tui` on this home attaches through
    (:mod:`tui.remote`: its calls and its live sessions)."""
    from node.app.operations import OPERATIONS
    from tui import remote

    return {**OPERATIONS, **remote.operations()}


def cmd_node_run(args: argparse.Namespace) -> int:
    return asyncio.run(run_node(args))


def register(sub: Any) -> None:
    p = sub.add_parser(
        "node",
        help="run this node headless (for a server beside the PACS)",
        description="Run the node without the TUI.",
    )
    node_sub = p.add_subparsers(dest="node_command", metavar="NODE_COMMAND", required=True)
    run = node_sub.add_parser(
        "run",
        help="run until Ctrl-C: registries, LAN endpoint, mDNS, DICOM listener, peers",
        description="Run the node: publish to registries, accept peers, receive from the PACS.",
    )
    run.add_argument("--listen", metavar="HOST", help="LAN endpoint address for this run")
    run.add_argument("--no-mdns", action="store_true", help="no mDNS discovery for this run")
    # `radmesh tui`'s child: notifications stay queued for the TUI, not printed to the log
    run.add_argument("--for-tui", action="store_true", help=argparse.SUPPRESS)
    run.set_defaults(handler=cmd_node_run)
