"""A stored study sent to a trusted peer outside any consult (`radmesh send`).

The study leaves de-identified (:mod:`node.dicom.sharing`: pseudonym map kept here,
burned-in check); ``identified`` sends it as stored, audited as such.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from crypto.identity import NodeId
from node.core.errors import NodeError
from node.dicom import pseudonyms as pair_pseudonyms
from node.dicom import sharing
from peer_transport.mux import ChannelLink
from peer_transport.transfer.runner import send_study

if TYPE_CHECKING:
    from node.app.runtime import NodeRuntime
    from peer_transport import transfer as tr


class TransferCommandError(NodeError):
    """The transfer command could not reach its peer."""


async def peer_key(runtime: NodeRuntime, peer: str) -> bytes:
    node_id = NodeId.parse(peer)
    found = await runtime.directory.resolve(node_id, runtime.now())
    if found is None:
        raise TransferCommandError(
            f"peer {node_id.short()} is not known: find it with `radmesh peers` first"
        )
    return found.record.public_key


async def send_to_peer(
    runtime: NodeRuntime,
    study_uid: str,
    peer: str,
    *,
    identified: bool = False,
    burned_in_checked: bool = False,
    black_out_top: int = 0,
) -> tr.State:
    """Send a stored study to a trusted peer, de-identified unless ``identified``."""
    key = await peer_key(runtime, peer)
    peer_id = str(NodeId.from_public_key(key))
    prepare = await asyncio.to_thread(  # reads every instance's header: off the event loop
        prepare_share, runtime, study_uid, peer_id, identified, burned_in_checked, black_out_top
    )
    conn = await runtime.transport.connect(key)
    return await send_study(
        ChannelLink(conn),
        runtime.store,
        study_uid,
        runtime.identity,
        peer=peer_id,
        audit=runtime.audit,
        prepare=prepare,
        spool_dir=runtime.home.data_dir / "outgoing",
    )


def prepare_share(
    runtime: NodeRuntime,
    study_uid: str,
    peer_id: str,
    identified: bool,
    burned_in_checked: bool,
    black_out_top: int = 0,
) -> Callable[[Iterable[bytes]], Iterator[bytes]] | None:
    """The share's checks and records before anything is sent; the de-identifier, or
    None for an identified send (audited as such)."""
    runtime.store.study(study_uid)  # a readable error for a study not in the store
    if identified:
        sharing.audit_identified(
            runtime.audit, study_uid, now=runtime.clock(), peer=peer_id, via="send"
        )
        return None
    key = runtime.identity.derive_key(sharing.PSEUDONYM_KEY_PURPOSE)
    path = sharing.send_map_path(runtime.home.data_dir, study_uid, peer_id)
    pseudonyms = sharing.load_or_new(path, key)
    pseudonyms.burned_in_checked = sharing.confirm_burned_in(
        runtime.store,
        runtime.audit,
        study_uid,
        burned_in_checked,
        now=runtime.clock(),
        peer=peer_id,
        black_out_top=black_out_top,
    )
    pseudonyms.black_out_top = black_out_top
    linkage = runtime.identity.derive_key(pair_pseudonyms.LINKAGE_KEY_PURPOSE)
    pair_pseudonyms.bind_to_consultant(pseudonyms, runtime.home.data_dir, linkage, peer_id)
    pseudonyms.persist(path, key)  # the secret stays home before anything leaves
    return sharing.deidentifier(pseudonyms, path, key, sharing.options_of(runtime.config.sharing))


def progress_line(p: tr.Progress, width: int = 30) -> str:
    """A transfer's progress on one line: bar, counts, rate, time left."""
    filled = int(p.fraction * width)
    eta = f"{p.eta:5.0f} s" if p.eta is not None else "    ? s"
    return (
        f"[{'#' * filled}{'.' * (width - filled)}] {p.instances_done}/{p.instances_total} "
        f"{p.bytes_done / 1e6:7.1f}/{p.bytes_total / 1e6:.1f} MB "
        f"{p.rate / 1e6:6.1f} MB/s ETA {eta}"
    )


__all__ = ["TransferCommandError", "peer_key", "prepare_share", "progress_line", "send_to_peer"]
