"""``radmesh dicom listen | echo | send``: DICOM with the hospital's PACS and modalities."""

from __future__ import annotations

import argparse
import dataclasses
import threading
import time
from typing import IO, TYPE_CHECKING, Any

from node.audit import AuditKind, open_audit
from node.commands.identity import home_of
from node.display import printable
from node.keystore import load_identity

if TYPE_CHECKING:
    pass


def cmd_listen(args: argparse.Namespace) -> int:
    from node.dicom_files import InvalidDicom
    from node.dicom_net import DicomListener
    from node.store import InstanceConflict, open_store

    home = home_of(args)
    config = home.load_config().dicom
    if args.port is not None:
        config = dataclasses.replace(config, port=args.port)
    if args.host is not None:
        config = dataclasses.replace(config, host=args.host)
    if args.allow:
        config = dataclasses.replace(
            config, allowed_calling_aets=[*config.allowed_calling_aets, *args.allow]
        )
    identity = load_identity(home.key_path)
    store = open_store(home, identity)
    audit = open_audit(home, identity)
    store_lock = threading.Lock()

    def on_stream(stream: IO[bytes], size: int, calling_ae: str) -> None:
        with store_lock:  # pynetdicom runs one thread per association
            result = store.add_stream(stream, size, source=f"dicom:{calling_ae}")
            if not result.duplicate:  # as the running node records a receipt
                audit.append(
                    AuditKind.RECEIVE,
                    now=time.time(),
                    study_uid=result.study_uid,
                    details={"from": f"dicom:{calling_ae}", "sop": result.sop_instance_uid},
                )
        duplicate = "duplicate " if result.duplicate else ""
        print(f"received {duplicate}instance from {printable(calling_ae, 16)}")

    listener = DicomListener(
        config,
        on_stream=on_stream,
        spool_dir=home.data_dir / "incoming",
        bad_data_errors=(InvalidDicom, InstanceConflict),
    )
    listener.start()
    print(
        f"DICOM listener {config.ae_title} on {config.host}:{listener.port}; "
        f"accepting {', '.join([*config.allowed_calling_aets, *config.allowed])}. Ctrl-C stops."
    )
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        print("stopping")
    finally:
        listener.stop()
        audit.close()  # signs what it received
        store.close()
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    from node.dicom_net import echo

    status = echo(args.host, args.port, args.aet, args.calling_aet)
    print(f"C-ECHO {args.aet}@{args.host}:{args.port}: status 0x{status:04X}")
    return 0 if status == 0 else 1


def cmd_send(args: argparse.Namespace) -> int:
    from node.dicom_net import DicomNetError, send_to_pacs
    from node.store import open_store

    home = home_of(args)
    config = home.load_config().dicom
    host = args.host or config.pacs_host
    port = args.port or config.pacs_port
    aet = args.aet or config.pacs_ae_title
    if not (host and port and aet):
        raise DicomNetError(
            "no PACS to send to: set [dicom] pacs_host, pacs_port and pacs_ae_title in "
            "config.toml, or pass --host, --port and --aet"
        )
    identity = load_identity(home.key_path)
    store = open_store(home, identity)
    try:
        rows = store.instances(args.study_uid)
        data = [store.read_instance(row.sop_instance_uid) for row in rows]
    finally:
        store.close()
    if not data:
        raise DicomNetError(f"no instances of study {args.study_uid} in the store")
    report = send_to_pacs(data, host, port, aet, config.ae_title)
    with open_audit(home, identity) as audit:
        audit.append(
            AuditKind.EXPORT,
            now=time.time(),
            study_uid=args.study_uid,
            details={
                "to": f"pacs:{aet}",
                "via": "dicom send",
                "instances": len(data),
                "sent": report.sent,
            },
        )
    print(f"sent {report.sent}/{len(report.results)} instance(s) to {aet}@{host}:{port}")
    for failure in report.failed:
        print(f"  failed {printable(failure.sop_instance_uid)}: {printable(failure.error)}")
    return 0 if report.ok else 1


def register(sub: Any) -> None:
    dicom = sub.add_parser(
        "dicom",
        help="DICOM networking: listen for a PACS, echo, send a study",
        description="Speak DICOM with the hospital's PACS and modalities.",
    )
    dsub = dicom.add_subparsers(dest="dicom_command", metavar="DICOM_COMMAND", required=True)
    p = dsub.add_parser("listen", help="run the C-STORE listener in the foreground")
    p.add_argument("--host", help="address to listen on (default: [dicom] host)")
    p.add_argument("--port", type=int, help="port (default: [dicom] port; 0 picks one)")
    p.add_argument(
        "--allow", action="append", default=[], metavar="AET", help="also allow this calling AE"
    )
    p.set_defaults(handler=cmd_listen)
    p = dsub.add_parser("echo", help="C-ECHO a DICOM peer")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--aet", default="ANY-SCP", help="called AE title")
    p.add_argument("--calling-aet", default="RADMESH", help="our AE title")
    p.set_defaults(handler=cmd_echo)
    p = dsub.add_parser("send", help="push a stored study to the PACS by C-STORE")
    p.add_argument("study_uid")
    p.add_argument("--host", help="PACS host (default: [dicom] pacs_host)")
    p.add_argument("--port", type=int, help="PACS port (default: [dicom] pacs_port)")
    p.add_argument("--aet", help="PACS AE title (default: [dicom] pacs_ae_title)")
    p.set_defaults(handler=cmd_send)
