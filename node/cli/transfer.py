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
from typing import TYPE_CHECKING, TextIO

from crypto.identity import NodeId
from node.cli.identity import home_of
from node.core.display import printable
from node.core.errors import NodeError
from node.core.ids import local_name
from node.core.keystore import load_identity
from peer_transport.errors import TransportError

if TYPE_CHECKING:
    from node.app.runtime import NodeRuntime
    from peer_transport import transfer as tr


async def fetch_from_peer(
    runtime: NodeRuntime, peer: str | None, within: float, out: TextIO = sys.stderr
) -> tr.Progress:
    from node.app.sending import progress_line
    from peer_transport import transfer as tr
    from peer_transport.mux import ChannelLink
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


async def _fetch(args: argparse.Namespace) -> int:
    from node.app.runtime import NodeRuntime

    home = home_of(args)
    runtime = NodeRuntime(home, load_identity(home.key_path), resume=False)
    await runtime.start()
    try:
        progress = await fetch_from_peer(runtime, args.peer, args.wait)
        print(f"\nreceived {progress.instances_done} instances, {progress.bytes_done} bytes")
        return 0
    finally:
        await runtime.stop()


def cmd_send(args: argparse.Namespace) -> int:
    """Send a study: on this home's running node if there is one."""
    from node.app import commands
    from node.dicom import sharing
    from peer_transport import transfer as tr

    if args.identified:
        print(sharing.IDENTIFIED_WARNING, file=sys.stderr)
    try:
        state = asyncio.run(
            commands.run(
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
