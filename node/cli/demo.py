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
from node.core.config import NodeConfig

if TYPE_CHECKING:
    pass


def run_interactive(
    root: Path, *, slices: int, rows: int, with_pacs: bool, low_bandwidth: bool | None = None
) -> int:
    """Send the STAT request, then open the TUI as the neuroradiologist: the request waits
    in the worklist; once accepted and fetched, the scripted surgeon joins a live session.
    The demo's nodes and the surgeon run on their own thread (tui.node_thread), the TUI
    on this one, as `radmesh tui` runs its node."""
    import asyncio

    from node.demo.story import DemoNetwork, send_request, surgeon_when_ready
    from tui.app import RadmeshApp
    from tui.node_facade import RuntimeNode
    from tui.node_thread import NodeThread, ThreadedNode

    shutil.rmtree(root, ignore_errors=True)
    net = DemoNetwork(root)
    surgeon: asyncio.Future[None] | None = None

    async def stop_surgeon() -> None:
        if surgeon is not None:
            surgeon.cancel()
            await asyncio.gather(surgeon, return_exceptions=True)

    with NodeThread("radmesh-demo") as thread:
        try:
            thread.run(net.start(with_pacs=with_pacs))
            requested = thread.run(send_request(net, slices=slices, rows=rows))
            net.say(
                "opening the TUI as the neuroradiologist: the request waits in the worklist "
                "(a accept, f fetch, enter open; ? help, ctrl+q quit)"
            )
            # The scripted surgeon's steps go to a file while the TUI owns the terminal
            # (printed there, they were drawn over the screen).
            with (root / "demo.log").open("a") as steps:
                net.out = steps
                surgeon = thread.call(
                    asyncio.ensure_future, surgeon_when_ready(net, requested, rows)
                )
                node = ThreadedNode(RuntimeNode(net.nodes["neurorad"]), thread)
                asyncio.run(RadmeshApp(node, low_bandwidth=low_bandwidth).run_async())
        finally:
            thread.run(stop_surgeon())
            net.out = sys.stdout
            thread.run(net.stop())
    print(f"demo stopped; its files are under {root} (the scripted steps: {root / 'demo.log'})")
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
    p.add_argument("--slices", type=int, default=40, help="CT slices in the demo study")
    p.add_argument("--rows", type=int, default=512, help="CT matrix size (rows = columns)")
    p.add_argument("--no-pacs", action="store_true", help="do not start Orthanc as the PACS")
    add_low_bandwidth(p)
    p.set_defaults(handler=cmd_demo)
