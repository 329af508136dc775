"""``radmesh tui`` (and plain ``radmesh``): open the terminal app on this home's node.

The node runs in its own process and the app in this one (issue 18 item 2: sharing one
GIL, a transfer in the TUI ran at 0.70-0.79 of headless; apart, they do not wait on each
other). If the home's node already runs (`radmesh node run`, another TUI), the app
attaches to it through its control socket (:mod:`tui.remote`) and leaves it running.
Otherwise it starts `radmesh node run` on the home as its child (:class:`NodeChild`),
attaches, and stops the child when the app exits; the child dies with this process
however it ends. If the child stops while the app is open, the app says so and what to do.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from node.cli.identity import home_of
from node.core import children
from node.core.config import NodeHome
from node.core.errors import NodeError

STARTUP_SECONDS = 90.0  # for the child node to answer on its control socket
STOP_SECONDS = 30.0  # for it to close its connections and exit after SIGTERM
LOG_NAME = "tui-node.log"


class NodeStartFailed(NodeError):
    """The node the TUI started did not come up; the text names its log."""


def node_running(home: NodeHome) -> bool:
    """Whether the home's node answers the TUI's operation on its control socket."""
    from node.app import control
    from tui.remote import OPERATION

    running, _ = asyncio.run(
        control.ask(home, OPERATION, {"method": "status", "args": []}, lambda _: None)
    )
    return bool(running)


class NodeChild:
    """`radmesh node run` on ``home`` as this process's child, its output in a log file."""

    def __init__(self, process: subprocess.Popen[bytes], log: Path) -> None:
        self.process, self.log = process, log

    @classmethod
    def start(
        cls,
        home: NodeHome,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        ready: Callable[[], bool] | None = None,
        log: Path | None = None,
        within: float = STARTUP_SECONDS,
    ) -> NodeChild:
        """Run ``python -m node.cli ARGV`` (``node run`` on the home, or the demo's nodes);
        return once ``ready()`` (by default: the home's node answers the TUI)."""
        log = log or home.data_dir / LOG_NAME
        log.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with open(fd, "ab") as out:
            process = subprocess.Popen(  # noqa: S603 - this interpreter, our own module
                # -P: not the working directory's `node` package (a checkout there), ours
                [sys.executable, "-P", "-m", "node.cli", *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # the terminal's ctrl+c and hangup are the app's
                preexec_fn=children.die_with_parent(signal.SIGTERM),  # it stops in order
            )
        child = cls(process, log)
        try:
            child._wait_ready(ready or (lambda: node_running(home)), within)
        except BaseException:
            child.stop()
            raise
        return child

    def _wait_ready(self, ready: Callable[[], bool], within: float) -> None:
        from node.app.control import ControlError

        deadline = time.monotonic() + within
        while True:
            if self.process.poll() is not None:
                raise NodeStartFailed(f"the node could not start: {self.exited()}")
            try:
                if ready():
                    return
            except ControlError:
                pass  # the socket is there, the node not yet answering
            if time.monotonic() > deadline:
                raise NodeStartFailed(
                    f"the node did not answer within {within:.0f} s; see {self.log} for why"
                )
            time.sleep(0.1)

    def exited(self) -> str | None:
        """Why the child is gone (with where to look), or None while it runs."""
        code = self.process.poll()
        if code is None:
            return None
        return f"its process exited with code {code}; see {self.log}"

    def stop(self) -> None:
        children.stop(self.process, STOP_SECONDS)


def _passphrase_env(home: NodeHome) -> dict[str, str] | None:
    """The environment for the child: a passphrase-protected key is unlocked with a
    passphrase asked here (the child has no terminal), checked before the child starts.
    The variable reaches only the child (its environment is this user's to read anyway)."""
    from crypto import keyfile
    from node.core.keystore import PASSPHRASE_ENV, load_identity, passphrase_from_env_or_prompt

    if not keyfile.is_encrypted(home.key_path.read_bytes()) or PASSPHRASE_ENV in os.environ:
        return None
    passphrase = passphrase_from_env_or_prompt()
    if passphrase is None:
        return None  # the child then says the key is protected and how to unlock it
    load_identity(home.key_path, passphrase)  # a wrong one fails here, in words
    return {**os.environ, PASSPHRASE_ENV: passphrase}


def run_app(home: NodeHome, low_bandwidth: bool | None, child: NodeChild | None = None) -> None:
    """The app on the home's running node, through its control socket."""
    from tui.app import RadmeshApp
    from tui.remote import RemoteNode

    node = RemoteNode(home, stopped=child.exited if child is not None else None)
    try:
        RadmeshApp(node, low_bandwidth=low_bandwidth).run()
    finally:
        node.close()


def _low_bandwidth(args: argparse.Namespace) -> bool | None:
    """--low-bandwidth, else None: the app then reads RADMESH_LOW_BANDWIDTH."""
    return True if getattr(args, "low_bandwidth", False) else None


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
    if node_running(home):  # the user's own node: attach, and leave it running
        run_app(home, _low_bandwidth(args))
        return 0
    argv = ["--home", str(home.root), "node", "run", "--for-tui"]
    if args.listen is not None:
        argv += ["--listen", args.listen]
    if args.no_mdns:
        argv.append("--no-mdns")
    try:
        child = NodeChild.start(home, argv, env=_passphrase_env(home))
    except (NodeError, OSError) as exc:
        print(exc, file=sys.stderr)
        return 1
    try:
        run_app(home, _low_bandwidth(args), child)
    finally:
        child.stop()
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
