"""``radmesh tui`` (and plain ``radmesh``): open the terminal app on this node."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from crypto.identity import Identity
from node.commands.identity import home_of
from node.config import NodeConfig
from node.keystore import load_identity


def cmd_tui(args: argparse.Namespace) -> int:
    # The one upward import the layering test allows: this command is the TUI's entry
    # point. Imported here so `radmesh --help` does not load Textual.
    from tui.app import RadmeshApp
    from tui.local import LocalNode

    home = home_of(args)
    identity: Identity | None = None
    config: NodeConfig | None = None
    if home.exists():
        config = home.load_config()
        identity = load_identity(home.key_path)
    node = LocalNode(home, identity, config, [Path(d) for d in args.dicom or []])
    RadmeshApp(node).run()
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "tui",
        help="open the terminal app (the default when no command is given)",
        description="Worklist, studies, peers, the viewer and live consultations.",
    )
    p.add_argument(
        "--dicom",
        action="append",
        metavar="DIR",
        help="also show DICOM files from this directory (repeatable)",
    )
    p.set_defaults(handler=cmd_tui)
