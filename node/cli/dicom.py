"""``radmesh dicom listen | echo | send``: DICOM with the hospital's PACS and modalities."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import threading
import time
from typing import IO, TYPE_CHECKING, Any

from node.app import control
from node.cli.identity import home_of
from node.core.audit import AuditKind, AuditLog, open_audit
from node.core.display import printable
from node.core.keystore import load_identity

if TYPE_CHECKING:
    from node.core.config import DicomConfig, NodeHome
    from node.dicom.qr import PacsAddress, RetrieveReport, StudyMatch

QUERY_MAX = 1000  # = node.dicom.qr.MAX_MATCHES, kept here so --help loads no DICOM stack


def cmd_listen(args: argparse.Namespace) -> int:
    from node.dicom.files import InvalidDicom
    from node.dicom.net import DicomListener
    from node.dicom.store import InstanceConflict, open_store

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
    from node.dicom.net import echo

    status = echo(args.host, args.port, args.aet, args.calling_aet)
    print(f"C-ECHO {args.aet}@{args.host}:{args.port}: status 0x{status:04X}")
    return 0 if status == 0 else 1


def cmd_send(args: argparse.Namespace) -> int:
    from node.dicom.net import DicomNetError, send_to_pacs
    from node.dicom.store import open_store

    home = home_of(args)
    config = home.load_config().dicom
    pacs = _pacs_address(config, args, "no PACS to send to")
    host, port, aet = pacs.host, pacs.port, pacs.ae_title
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


# -- query / retrieve (issue 16) ------------------------------------------------------------


def _pacs_address(
    config: DicomConfig, args: argparse.Namespace, missing: str = "no PACS configured"
) -> PacsAddress:
    """The PACS named by --host, --port and --aet, each defaulting to [dicom]."""
    from node.dicom.net import DicomNetError
    from node.dicom.qr import PacsAddress

    host = args.host or config.pacs_host
    port = args.port or config.pacs_port
    aet = args.aet or config.pacs_ae_title
    if not (host and port and aet):
        raise DicomNetError(
            f"{missing}: set [dicom] pacs_host, pacs_port and pacs_ae_title in "
            "config.toml, or pass --host, --port and --aet"
        )
    return PacsAddress(host, port, aet, config.ae_title)


def _match_line(match: StudyMatch, phi: bool) -> str:
    count = "?" if match.instances is None else str(match.instances)
    line = (  # PACS text is untrusted: no raw control characters, bounded widths
        f"{printable(match.study_uid, 64)}  {printable(match.date, 8) or '--------'}  "
        f"{printable(match.modalities, 16) or '?':8s} {count:>5} inst  "
        f"{printable(match.description, 64) or '(no description)'}"
    )
    if phi:
        line += f"  {printable(match.patient_name, 64)} ({printable(match.patient_id, 64)})"
    return line


def cmd_query(args: argparse.Namespace) -> int:
    from node.dicom.net import DicomNetError
    from node.dicom.qr import MAX_MATCHES, StudyQuery, find_studies

    home = home_of(args)
    pacs = _pacs_address(home.load_config().dicom, args)
    query = StudyQuery(
        patient_id=args.patient_id or "",
        accession=args.accession or "",
        modality=(args.modality or "").upper(),
        since=args.since or "",
    )
    if not 1 <= args.max <= MAX_MATCHES:
        raise DicomNetError(f"--max must be between 1 and {MAX_MATCHES}")
    result = find_studies(pacs, query, max_matches=args.max)
    if not result.matches:
        print(f"no study in {pacs.ae_title} matches")
    for match in result.matches:
        print(_match_line(match, args.phi))
    if result.truncated:
        print(
            f"more than {args.max} studies matched: only the first {args.max} are listed; "
            "narrow the query (--since, --modality) to see the rest"
        )
    if args.phi:  # patient names and ids were shown: a view, recorded (never the names)
        with open_audit(home, load_identity(home.key_path)) as audit:
            audit.append(
                AuditKind.VIEW,
                now=time.time(),
                details={"by": "dicom query --phi", "studies": len(result.matches)},
            )
    return 0


class _Receiver:
    """Stores what a retrieve brings (this process's store), counting new, duplicate and
    refused instances; an instance of another study than the one asked for is refused."""

    def __init__(self, home: NodeHome, study_uid: str, audit: AuditLog, report: RetrieveReport):
        from node.dicom.store import open_store

        self._store = open_store(home, load_identity(home.key_path))
        self._study_uid = study_uid
        self._audit = audit
        self._report = report
        self._lock = threading.Lock()

    def __call__(self, stream: IO[bytes], size: int, calling_ae: str) -> None:
        self.store(stream, size, calling_ae)

    def store(self, stream: IO[bytes], size: int, calling_ae: str) -> bool:
        """Store one instance; True if it is new here."""
        import pydicom

        from node.dicom.net import BadInstanceError

        with self._lock:  # pynetdicom runs one thread per association
            try:
                header = pydicom.dcmread(
                    stream, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]
                )
                stream.seek(0)
                if str(header.get("StudyInstanceUID", "")) != self._study_uid:
                    raise BadInstanceError("an instance of another study than the one asked for")
                result = self._store.add_stream(stream, size, source=f"dicom:{calling_ae}")
            except Exception:
                self._report.refused += 1
                raise
            if result.duplicate:
                self._report.duplicate += 1
            else:
                self._report.received += 1
                self._audit.append(
                    AuditKind.RECEIVE,
                    now=time.time(),
                    study_uid=result.study_uid,
                    details={"from": f"dicom:{calling_ae}", "sop": result.sop_instance_uid},
                )
        return not result.duplicate

    def close(self) -> None:
        self._store.close()


def _retrieve_here(
    home: NodeHome, config: DicomConfig, pacs: PacsAddress, study_uid: str, use_get: bool
) -> RetrieveReport:
    """Retrieve without a running node: C-GET, or C-MOVE to a listener for this command."""
    from node.app.retrieve import audit_retrieve, retrieve_line
    from node.dicom.files import InvalidDicom
    from node.dicom.net import DicomListener
    from node.dicom.qr import RetrieveReport, get_study, move_study
    from node.dicom.store import InstanceConflict

    report = RetrieveReport()
    with open_audit(home, load_identity(home.key_path)) as audit:
        # C-GET: the counts come back in its answer (its receiver sees every refusal)
        receiver = _Receiver(home, study_uid, audit, RetrieveReport() if use_get else report)
        try:
            if use_get:
                answer = get_study(
                    pacs, study_uid, receiver.store, progress=lambda r: print(retrieve_line(r))
                )
            else:
                listener = DicomListener(
                    config,
                    on_stream=receiver,
                    spool_dir=home.data_dir / "incoming",
                    bad_data_errors=(InvalidDicom, InstanceConflict),
                )
                with listener:
                    answer = move_study(
                        pacs,
                        study_uid,
                        config.ae_title,
                        progress=lambda r: print(retrieve_line(r)),
                    )
        finally:
            receiver.close()
        for name in ("completed", "failed", "warning", "remaining", "status"):
            setattr(report, name, getattr(answer, name))
        if use_get:
            report.received += answer.received
            report.duplicate += answer.duplicate
            report.refused += answer.refused
        audit_retrieve(audit, study_uid, pacs, report, "get" if use_get else "move")
    return report


def cmd_retrieve(args: argparse.Namespace) -> int:
    from node.dicom.qr import RetrieveReport, check_uid

    home = home_of(args)
    config = home.load_config().dicom
    study_uid = check_uid(args.study_uid)
    pacs = _pacs_address(config, args)
    print(f"retrieving study {study_uid} from {pacs.ae_title}@{pacs.host}:{pacs.port}")
    found, result = False, None
    if not args.get:  # C-MOVE: to the running node's listener when a node runs
        request = {
            "study_uid": study_uid,
            "host": pacs.host,
            "port": pacs.port,
            "aet": pacs.ae_title,
        }
        found, result = asyncio.run(control.ask_running(home, "dicom.retrieve", request, print))
    if found and isinstance(result, dict):
        report = RetrieveReport(**result)
    else:
        report = _retrieve_here(home, config, pacs, study_uid, args.get)
    print(
        f"study {study_uid}: {report.received} received, {report.failed + report.refused} "
        f"failed, {report.duplicate} duplicate"
        + (f", {report.warning} with warnings" if report.warning else "")
    )
    if report.status is not None and report.status != 0:
        print(f"the PACS ended the retrieve with status 0x{report.status:04X}")
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
    _register_qr(dsub)


def _pacs_options(p: Any) -> None:
    p.add_argument("--host", help="PACS host (default: [dicom] pacs_host)")
    p.add_argument("--port", type=int, help="PACS port (default: [dicom] pacs_port)")
    p.add_argument("--aet", help="PACS AE title (default: [dicom] pacs_ae_title)")


def _register_qr(dsub: Any) -> None:
    p = dsub.add_parser("query", help="list the PACS's studies (C-FIND)")
    p.add_argument("--patient-id", help="one exact patient ID")
    p.add_argument("--accession", help="one exact accession number")
    p.add_argument("--modality", help="a modality in the study, e.g. CT")
    p.add_argument("--since", metavar="YYYYMMDD", help="studies from this date on")
    p.add_argument(
        "--max", type=int, default=QUERY_MAX, help=f"most studies listed (default {QUERY_MAX})"
    )
    p.add_argument("--phi", action="store_true", help="show patient name and id (audited)")
    _pacs_options(p)
    p.set_defaults(handler=cmd_query)
    p = dsub.add_parser("retrieve", help="bring a study from the PACS into the store")
    p.add_argument("study_uid")
    p.add_argument(
        "--get", action="store_true", help="C-GET over this association instead of C-MOVE"
    )
    _pacs_options(p)
    p.set_defaults(handler=cmd_retrieve)
