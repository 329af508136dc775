"""Node ids as a person types them: the full id, or the short id `radmesh peers` prints
when exactly one known peer's id starts with it; the subcommands that name a consult by
its id (or a unique prefix of it); and the peer directory and trust store of a home,
opened for one command."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from crypto.errors import InvalidNodeId
from crypto.identity import NodeId
from node.core.config import NodeHome
from node.core.display import printable
from registry.trust import TrustStore

if TYPE_CHECKING:
    from registry.client import MultiRegistry
    from registry.directory import PeerDirectory

SHORT_ID_LEN = 7  # NodeId.short(): what `radmesh peers` prints
FULL_ID_LEN = 56
_MISREAD = str.maketrans("018", "OIB")  # as NodeId.parse reads them


def consult_command(
    csub: Any, name: str, text: str, handler: Callable[[argparse.Namespace], int]
) -> Any:
    """A ``radmesh consult`` subcommand whose first argument is a consult's id (a unique
    prefix is enough: the consult database resolves it); returns its parser."""
    p = csub.add_parser(name, help=text)
    p.add_argument("id", help="consult id (a unique prefix is enough)")
    p.set_defaults(handler=handler)
    return p


def open_trust(home: NodeHome) -> TrustStore:
    home.data_dir.mkdir(parents=True, exist_ok=True)
    return TrustStore(home.trust_db)


def open_directory(home: NodeHome, registries: MultiRegistry | None = None) -> PeerDirectory:
    from registry.directory import PeerDirectory, RegistryFinder

    finders = [RegistryFinder(registries)] if registries is not None else []
    return PeerDirectory(home.peers_db, open_trust(home), finders)


def known_ids(home: NodeHome) -> list[NodeId]:
    """Every node id this home knows: remembered records and trust entries."""
    directory = open_directory(home)
    try:
        known = {p.record.node_id for p in directory.list(int(time.time()))}
        known.update(directory.trust.known())
    finally:
        directory.close()
        directory.trust.close()
    return sorted(known)


def resolve_id(text: str, known: list[NodeId]) -> NodeId:
    """A full node id, or the start of one this node knows (the short id `radmesh peers`
    prints): exactly one known id must start with it."""
    try:
        return NodeId.parse(text)
    except InvalidNodeId:
        prefix = "".join(text.split()).replace("-", "").upper().translate(_MISREAD)
        if len(prefix) < SHORT_ID_LEN or len(prefix) >= FULL_ID_LEN:
            raise
    found = [n for n in known if str(n).replace("-", "").startswith(prefix)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise InvalidNodeId(
            f"no known peer's id starts with {printable(text, 20)}: give the full node id "
            "(`radmesh peers show` prints it), or find the peer with `radmesh peers search`"
        )
    raise InvalidNodeId(
        f"{len(found)} known peers' ids start with {printable(text, 20)}: give the full node id "
        "of the one you mean:\n  " + "\n  ".join(str(n) for n in found)
    )
