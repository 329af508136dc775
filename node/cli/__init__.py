"""The ``radmesh`` command line.

Each command group lives in a module under :mod:`node.cli` with a
``register(subparsers)`` function; handlers take the parsed arguments and
return an exit code. Errors from any radmesh package are printed as one
readable line and exit with status 1; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import signal
import sys
from collections.abc import Sequence

from node.app.errors import USER_ERRORS
from node.core.display import PrintableFormatter, printable
from node.core.private import restrict_umask

COMMAND_MODULES = (
    "node.cli.identity",
    "node.cli.demo",
    "node.cli.doctor",
    "node.cli.node",
    "node.cli.store",
    "node.cli.tui",
    "node.cli.consult",
    "node.cli.dicom",
    "node.cli.peers",
    "node.cli.transfer",
    "node.cli.status",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="radmesh",
        description="Peer-to-peer, end-to-end encrypted teleradiology consultations.",
    )
    parser.add_argument(
        "--home",
        metavar="DIR",
        help="node home directory (default: $RADMESH_HOME or the platform data directory)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def user_errors() -> tuple[type[Exception], ...]:
    """The errors a command prints as one readable line (:data:`node.app.errors.USER_ERRORS`)."""
    return USER_ERRORS


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
    except BrokenPipeError:
        return _reader_gone()
    return code


def _main(argv: Sequence[str] | None) -> int:
    restrict_umask()  # everything this process creates under a home: 0700 / 0600
    parser = build_parser()
    args = parser.parse_args(argv)
    to_terminal = logging.StreamHandler()  # peer text in a log line reaches it escaped
    to_terminal.setFormatter(PrintableFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    level = logging.DEBUG if args.verbose else logging.WARNING
    logging.basicConfig(level=level, handlers=[to_terminal])
    trust_registry_ca(args)  # before any command or node this process runs connects
    handler = getattr(args, "handler", None)
    if handler is None:
        if args.command is None and "node.cli.tui" in COMMAND_MODULES:
            args = parser.parse_args([*(argv or sys.argv[1:]), "tui"])
            handler = args.handler
        else:
            parser.print_help()
            return 2
    try:
        code: int = handler(args)
    except user_errors() as exc:
        # An error's text may quote a peer (a refusal it sent, a name): no raw escapes.
        print(f"radmesh: {printable(exc, multiline=True)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("radmesh: interrupted", file=sys.stderr)
        return 130
    return code


def trust_registry_ca(args: argparse.Namespace) -> None:
    """The home's ``[network] registry_ca_file``, trusted for every registry connection
    this process makes (the node a command brings up, `node run`, the TUI). A home that
    does not exist or does not load is left to the command, which says what is wrong."""
    from node.core.config import NodeHome, resolve_home
    from node.core.errors import NodeError

    home = NodeHome(resolve_home(getattr(args, "home", None)))
    if not home.config_path.is_file():
        return
    try:
        ca_file = home.load_config().network.registry_ca_file
    except (NodeError, OSError):
        return
    if ca_file:
        from registry.httpclient import trust_ca_file

        try:
            trust_ca_file(ca_file)
        except user_errors() as exc:
            print(f"radmesh: {printable(exc, multiline=True)}", file=sys.stderr)


def _reader_gone() -> int:
    """``radmesh consult list | head -1``: the reader left, which is no error of ours. Say
    nothing (no traceback), and exit as a process killed by SIGPIPE does (128 + 13)."""
    with contextlib.suppress(OSError, ValueError):  # later writes and the exit flush go nowhere
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 128 + signal.SIGPIPE


def _use_uvloop() -> None:
    """What peer_transport.connection.install_event_loop_policy does, without importing
    the WebRTC stack before the command line is even parsed."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run() -> None:
    """The console script: uvloop when installed (about 1.6x faster data channels), then main."""
    _use_uvloop()
    sys.exit(main())


if __name__ == "__main__":
    run()
