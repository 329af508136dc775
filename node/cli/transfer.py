"""`radmesh send STUDY --to PEER` and `radmesh fetch --from PEER`: a study between two nodes.

The study leaves de-identified (:mod:`node.dicom.sharing`: pseudonym map kept here, burned-in
check); ``--identified`` sends it as stored, with a warning and an audit record.

Both ends run at the same time: the receiving side waits with ``fetch``, the
sending side connects with ``send``. The connection is the encrypted peer
transport (only trusted peers get one); the study travels with the wire codec
and the resumable transfer protocol; both ends record it in their audit logs.
An interrupted ``fetch`` resumes from its spool when run again.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TextIO

from crypto.identity import NodeId
from node.app import control
from node.cli.identity import home_of
from node.core.display import printable
from node.core.errors import NodeError
from node.core.ids import local_name
from node.core.keystore import load_identity
from peer_transport.errors import TransportError

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
    from peer_transport.connection import ChannelLink
    from peer_transport.transfer.runner import send_study

    key = await peer_key(runtime, peer)
    peer_id = str(NodeId.from_public_key(key))
    prepare = await asyncio.to_thread(  # reads every instance's header: off the event loop
        _prepare_share, runtime, study_uid, peer_id, identified, burned_in_checked, black_out_top
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


def _prepare_share(
    runtime: NodeRuntime,
    study_uid: str,
    peer_id: str,
    identified: bool,
    burned_in_checked: bool,
    black_out_top: int = 0,
) -> Callable[[Iterable[bytes]], Iterator[bytes]] | None:
    """The share's checks and records before anything is sent; the de-identifier, or
    None for an identified send (audited as such)."""
    from node.dicom import pseudonyms as pair_pseudonyms
    from node.dicom import sharing

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


async def fetch_from_peer(
    runtime: NodeRuntime, peer: str | None, within: float, out: TextIO = sys.stderr
) -> tr.Progress:
    from peer_transport import transfer as tr
    from peer_transport.connection import ChannelLink
    from peer_transport.transfer.runner import receive_study

    while True:
        conn = await runtime.transport.accept(within)
        who = NodeId.from_public_key(conn.peer)
        if peer is None or who == NodeId.parse(peer):
            break
    spool = runtime.home.data_dir / "transfers" / f"fetch-{local_name(conn.peer.hex())}"
    return await receive_study(
        ChannelLink(conn),
        runtime.store,
        spool,
        peer=str(who),
        audit=runtime.audit,
        on_progress=lambda p: print(progress_line(p), end="\r", file=out, flush=True),
        sender_key=conn.peer,  # a fetch run again asks for its unfinished transfer at once
        spool_key=runtime.identity.derive_key(tr.SPOOL_KEY_PURPOSE),
    )


def progress_line(p: tr.Progress, width: int = 30) -> str:
    filled = int(p.fraction * width)
    eta = f"{p.eta:5.0f} s" if p.eta is not None else "    ? s"
    return (
        f"[{'#' * filled}{'.' * (width - filled)}] {p.instances_done}/{p.instances_total} "
        f"{p.bytes_done / 1e6:7.1f}/{p.bytes_total / 1e6:.1f} MB "
        f"{p.rate / 1e6:6.1f} MB/s ETA {eta}"
    )


@control.operation("study.send")
async def _op_send_study(rt: NodeRuntime, a: dict[str, Any], emit: control.Emit) -> str:
    state = await send_to_peer(
        rt,
        a["study"],
        a["to"],
        identified=bool(a.get("identified")),
        burned_in_checked=bool(a.get("burned_in_checked")),
        black_out_top=int(a.get("black_out_top") or 0),
    )
    return state.value


async def _fetch(args: argparse.Namespace) -> int:
    from node.app.runtime import NodeRuntime

    home = home_of(args)
    runtime = NodeRuntime(home, load_identity(home.key_path))
    await runtime.start()
    try:
        progress = await fetch_from_peer(runtime, args.peer, args.wait)
        print(f"\nreceived {progress.instances_done} instances, {progress.bytes_done} bytes")
        return 0
    finally:
        await runtime.stop()


def cmd_send(args: argparse.Namespace) -> int:
    """Send a study: on this home's running node if there is one."""
    from node.dicom import sharing
    from peer_transport import transfer as tr

    if args.identified:
        print(sharing.IDENTIFIED_WARNING, file=sys.stderr)
    try:
        state = asyncio.run(
            control.run(
                home_of(args),
                "study.send",
                {
                    "study": args.study_uid,
                    "to": args.to,
                    "identified": args.identified,
                    "burned_in_checked": args.burned_in_checked,
                    "black_out_top": args.black_out_top,
                },
                lambda line: print(line, file=sys.stderr),
            )
        )
    except (NodeError, TransportError) as exc:
        print(f"send failed: {printable(exc)}", file=sys.stderr)
        return 1
    print(f"study {args.study_uid}: {state}")
    return 0 if state == tr.State.COMPLETE.value else 1


def cmd_fetch(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_fetch(args))
    except TimeoutError:
        print("no peer connected in time", file=sys.stderr)
        return 1
    except (NodeError, TransportError) as exc:
        print(f"fetch failed: {printable(exc)}", file=sys.stderr)
        return 1


def pixel_rows(text: str) -> int:
    rows = int(text)
    if not 0 <= rows <= 4096:
        raise argparse.ArgumentTypeError("a number of pixel rows, 0 to 4096")
    return rows


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("send", help="send a stored study to a trusted peer (it runs `fetch`)")
    p.add_argument("study_uid", metavar="STUDY_UID")
    p.add_argument("--to", required=True, metavar="NODE_ID")
    add_sharing_options(p)
    p.set_defaults(handler=cmd_send)

    p = sub.add_parser("fetch", help="wait for a trusted peer to send a study, with progress")
    p.add_argument("--from", dest="peer", metavar="NODE_ID", help="only this peer")
    p.add_argument("--wait", type=float, default=600.0, metavar="SECONDS")
    p.set_defaults(handler=cmd_fetch)


def add_sharing_options(p: argparse.ArgumentParser) -> None:
    """How a study leaves the node: `radmesh send` and `radmesh consult request` alike."""
    p.add_argument(
        "--identified",
        action="store_true",
        help="send the study NOT de-identified (warned and audited); default: de-identified",
    )
    p.add_argument(
        "--burned-in-checked",
        action="store_true",
        help="a person checked the pixels of ultrasound/screen-capture images for burned-in "
        "text (audited)",
    )
    p.add_argument(
        "--black-out-top",
        type=pixel_rows,
        default=0,
        metavar="ROWS",
        help="black out the top ROWS rows of ultrasound/screen-capture images, where the "
        "machine writes name, id and date (Clean Pixel Data; audited)",
    )
