"""``radmesh demo``: what works so far, on one machine, under a demo directory."""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crypto.safety import safety_number
from node.cli.tui import add_low_bandwidth
from node.core.config import NodeConfig, NodeHome

if TYPE_CHECKING:
    pass


READY = "tui.ready"  # written under the demo directory once the request waits
STARTUP_SECONDS = 300.0  # the registry, three nodes, the CT and the request (Orthanc too)


def run_interactive(
    root: Path, *, slices: int, rows: int, with_pacs: bool, low_bandwidth: bool | None = None
) -> int:
    """Send the STAT request, then open the TUI as the neuroradiologist: the request waits
    in the worklist; once accepted and fetched, the scripted surgeon joins a live session.
    The demo's registry, nodes and surgeon run in a child process (``demo --serve``; its
    steps go to demo.log), the TUI in this one attached to the neuroradiologist's node,
    as `radmesh tui` runs its node."""
    from node.cli.tui import NodeChild, node_running, run_app
    from node.core.errors import NodeError
    from node.demo.story import NEURORAD

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    home = NodeHome(root / NEURORAD.key)
    argv = ["demo", "--serve", "--dir", str(root), "--slices", str(slices), "--rows", str(rows)]
    if not with_pacs:
        argv.append("--no-pacs")
    log = root / "demo.log"
    print(f"staging the case (registry, three nodes, the CT, the STAT request; steps in {log})")
    try:
        child = NodeChild.start(
            home,
            argv,
            log=log,
            ready=lambda: (root / READY).exists() and node_running(home),
            within=STARTUP_SECONDS,
        )
    except (NodeError, OSError) as exc:
        print(exc, file=sys.stderr)
        return 1
    try:
        run_app(home, low_bandwidth, child)
    finally:
        child.stop()
    print(f"demo stopped; its files are under {root} (the scripted steps: {log})")
    return 0


async def serve(root: Path, *, slices: int, rows: int, with_pacs: bool) -> int:
    """``demo --serve``: the interactive demo's network, until SIGTERM (the TUI quit)."""
    import asyncio
    import contextlib

    from node.cli.node import with_tui_operation
    from node.demo.story import NEURORAD, DemoNetwork, send_request, surgeon_when_ready

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    net = DemoNetwork(root, tui_role=NEURORAD.key, tui_operations=with_tui_operation())
    surgeon: asyncio.Future[None] | None = None
    try:
        await net.start(with_pacs=with_pacs)
        requested = await send_request(net, slices=slices, rows=rows)
        net.say("the request waits in the neuroradiologist's worklist: the TUI opens")
        (root / READY).touch()
        surgeon = asyncio.ensure_future(surgeon_when_ready(net, requested, rows))
        await stop.wait()
    finally:
        if surgeon is not None:
            surgeon.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await surgeon
        await net.stop()
    return 0


def _hangup_stops_the_demo() -> None:
    """A closed terminal (SIGHUP, as an SSH drop) or SIGTERM stops the demo as ctrl+c
    does, so it stops its nodes and Orthanc in order (Orthanc also dies with this
    process however it ends: node.core.children)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, interrupt)


def cmd_demo(args: argparse.Namespace) -> int:
    from node.demo.story import ROLES, demo_home

    root = Path(args.dir).resolve()
    if args.serve:
        import asyncio

        return asyncio.run(
            serve(root, slices=args.slices, rows=args.rows, with_pacs=not args.no_pacs)
        )
    if args.headless or args.interactive:
        _hangup_stops_the_demo()
    if args.headless:
        import asyncio

        from node.demo.story import run_headless

        return asyncio.run(
            run_headless(root, slices=args.slices, rows=args.rows, with_pacs=not args.no_pacs)
        )
    if args.interactive:
        return run_interactive(
            root,
            slices=args.slices,
            rows=args.rows,
            with_pacs=not args.no_pacs,
            low_bandwidth=True if args.low_bandwidth else None,
        )
    if args.fresh and root.exists():
        shutil.rmtree(root)
    print(f"radmesh demo in {root}")
    identities = {}
    for role in ROLES:
        home, identities[role.key] = demo_home(root, role)
        if not home.config_path.exists():
            home.save_config(
                NodeConfig(
                    display_name=role.name,
                    institution=role.institution,
                    roles=list(role.roles),
                    subspecialties=list(role.subspecialties),
                )
            )
        print(f"  {role.name:<22} {identities[role.key].node_id}")
    a, b = identities["rural"], identities["neurorad"]
    print("Safety number, rural hospital <-> neuroradiologist, as each side computes it:")
    print(f"  rural:    {safety_number(a.node_id, b.node_id)}")
    print(f"  neurorad: {safety_number(b.node_id, a.node_id)}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="run the demo scenario on this machine",
        description="Create demo nodes under DIR and show what radmesh does.",
    )
    p.add_argument("--dir", default="demo", help="demo directory (default: ./demo)")
    p.add_argument("--fresh", action="store_true", help="delete the demo directory first")
    p.add_argument(
        "--headless",
        action="store_true",
        help="run the whole scenario scripted, print each step, exit non-zero on failure",
    )
    p.add_argument(
        "--interactive",
        action="store_true",
        help="stage the case and open the TUI as the neuroradiologist (what `make demo` runs)",
    )
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # --interactive's
    p.add_argument("--slices", type=int, default=40, help="CT slices in the demo study")
    p.add_argument("--rows", type=int, default=512, help="CT matrix size (rows = columns)")
    p.add_argument("--no-pacs", action="store_true", help="do not start Orthanc as the PACS")
    add_low_bandwidth(p)
    p.set_defaults(handler=cmd_demo)
