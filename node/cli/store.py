"""``radmesh import``, ``studies``, ``export``, ``delete``, ``audit verify|show``, ``demo-data``."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from crypto.identity import Identity
from node.cli.identity import home_of
from node.core.audit import AuditKind, AuditLog, open_audit
from node.core.config import NodeHome
from node.core.display import printable
from node.core.errors import NodeError
from node.core.ids import file_name
from node.core.keystore import load_identity

if TYPE_CHECKING:
    from node.dicom.store import Store


def _open(args: argparse.Namespace) -> tuple[NodeHome, Identity]:
    home = home_of(args)
    home.require()
    return home, load_identity(home.key_path)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def cmd_import(args: argparse.Namespace) -> int:
    from node.dicom.importer import Progress, import_paths
    from node.dicom.store import open_store

    home, identity = _open(args)
    paths = [Path(p) for p in args.paths]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise NodeError(f"{missing[0]} does not exist; check the path and try again")
    progress = Progress()
    with open_store(home, identity) as store, open_audit(home, identity) as audit:
        try:
            summary = import_paths(store, paths, source="import", progress=progress)
        finally:
            progress.done()
        per_study: dict[str, list[int]] = {}
        for result in summary.imported:
            counts = per_study.setdefault(result.study_uid, [0, 0])
            counts[0] += 1
            counts[1] += result.size
        now = time.time()
        for study_uid, (count, size) in per_study.items():
            audit.append(
                AuditKind.IMPORT,
                now=now,
                study_uid=study_uid,
                details={"instances": count, "bytes": size, "source": "import"},
            )
        audit.checkpoint(now)
    size = sum(r.size for r in summary.imported)
    print(
        f"imported {len(summary.imported)} instance(s) ({_size(size)}) in "
        f"{len(per_study)} study(ies); {len(summary.duplicates)} duplicate(s); "
        f"{len(summary.conflicts)} not imported (same instance UID, other bytes: kept the "
        f"first); {len(summary.rejected)} rejected"
    )
    for path, reason in summary.conflicts:
        print(f"  not imported {path}: {reason}")
    for path, reason in summary.rejected:
        print(f"  rejected {path}: {reason}")
    usable = summary.imported or summary.duplicates
    if not usable:
        print("nothing importable found", file=sys.stderr)
    return 0 if usable else 1


def cmd_studies(args: argparse.Namespace) -> int:
    from node.dicom.store import open_store

    home, identity = _open(args)
    with open_store(home, identity) as store:
        rows = store.studies()
        if not rows:
            print("no studies yet: `radmesh import PATH` or `radmesh demo-data DIR --import`")
            return 0
        for study in rows:
            patient = (
                f"{study.patient_name} ({study.patient_id})" if args.phi else "[patient hidden]"
            )
            print(  # DICOM text may come from a peer's study: no raw control characters
                printable(
                    f"{study.study_uid}  {study.study_date or '--------'}  "
                    f"{'/'.join(study.modalities) or '?':8s} "
                    f"{study.description or '(no description)'}"
                    f"  {patient}  {study.instance_count} inst, {_size(study.size)}"
                )
            )
            if args.series:
                for series in store.series(study.study_uid):
                    number = "-" if series.series_number is None else str(series.series_number)
                    print(
                        printable(
                            f"    series {number:>3} {series.modality:3s} "
                            f"{series.description or '(no description)'}  {series.body_part}  "
                            f"{series.instance_count} inst  {series.series_uid}"
                        )
                    )
    if args.phi:
        _audit_phi_listing(home, identity, len(rows))
    return 0


def _audit_phi_listing(home: NodeHome, identity: Identity, studies: int) -> None:
    """Patient names and ids shown on screen: a view, recorded (never the names)."""
    with open_audit(home, identity) as audit:
        audit.append(
            AuditKind.VIEW, now=time.time(), details={"by": "studies --phi", "studies": studies}
        )


def _export(store: Store, study_uid: str, out: Path) -> tuple[int, int]:
    store.study(study_uid)  # raises a readable error for an unknown study
    count = size = 0
    for row in store.instances(study_uid):
        # UIDs may have come from a peer: a malformed one is named by its hash, not used.
        folder = out / file_name(row.series_uid)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{file_name(row.sop_instance_uid)}.dcm"
        temp = target.with_suffix(".part")
        with store.open_instance(row.sop_instance_uid) as source, temp.open("wb") as sink:
            while chunk := source.read(1 << 20):
                sink.write(chunk)
        temp.replace(target)
        count += 1
        size += row.size
    return count, size


def cmd_export(args: argparse.Namespace) -> int:
    from node.dicom.store import open_store

    home, identity = _open(args)
    out = Path(args.to)
    with open_store(home, identity) as store, open_audit(home, identity) as audit:
        count, size = _export(store, args.study_uid, out)
        audit.append(
            AuditKind.EXPORT,
            now=time.time(),
            study_uid=args.study_uid,
            details={"instances": count, "bytes": size, "to": "folder"},
        )
    print(f"exported {count} instance(s) ({_size(size)}) to {out}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from node.dicom.store import open_store

    home, identity = _open(args)
    with open_store(home, identity) as store, open_audit(home, identity) as audit:
        study = store.study(args.study_uid)
        if not args.yes:
            raise NodeError(
                f"this removes study {args.study_uid} ({study.instance_count} instance(s)) "
                "from the store for good; run again with --yes to confirm"
            )
        store.delete_study(args.study_uid)
        audit.append(
            AuditKind.DELETE,
            now=time.time(),
            study_uid=args.study_uid,
            details={"instances": study.instance_count, "bytes": study.size},
        )
    print(f"deleted study {args.study_uid} ({study.instance_count} instance(s))")
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    home, identity = _open(args)
    with open_audit(home, identity) as audit:
        report = audit.verify()
    print(
        f"{report.records} record(s), {report.checkpoints} signed checkpoint(s), "
        f"signed through record {report.last_signed_seq}"
    )
    if report.unsigned_tail:
        print(f"{report.unsigned_tail} record(s) after the last checkpoint are not signed yet")
    if report.high_water is not None:
        print(f"signed high-water mark (kept outside the log): record {report.high_water}")
    if report.ok:
        print("audit log intact")
        return 0
    for problem in report.problems:
        print(f"PROBLEM: {problem}")
    print("the audit log was altered: keep a copy of it and report this to your security officer")
    return 1


def _show(audit: AuditLog, args: argparse.Namespace) -> None:
    for record in audit.records(study_uid=args.study, peer=args.peer, kind=args.kind):
        when = dt.datetime.fromtimestamp(record.time_ms / 1000, dt.UTC).strftime(
            "%Y-%m-%d %H:%M:%S"
        )
        details = json.dumps(record.details, sort_keys=True, default=str)
        print(
            f"{record.seq:6d} {when} {record.kind:8s} actor={record.actor[:11]} "
            f"study={record.study_uid or '-'} peer={record.peer or '-'} {details}"
        )


def cmd_audit_show(args: argparse.Namespace) -> int:
    home, identity = _open(args)
    with open_audit(home, identity) as audit:
        _show(audit, args)
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from node.demo.phantom import generate_demo_study

    out = Path(args.out_dir)
    generate_demo_study(
        out,
        ct_slices=args.ct_slices,
        ct_rows=args.ct_rows,
        mr_slices=args.mr_slices,
        cr_rows=args.cr_rows,
        seed=args.seed,
    )
    files = sum(1 for p in out.rglob("*.dcm"))
    print(f"wrote {files} DICOM file(s) to {out} (fictitious patient, head CT with a subdural)")
    if args.import_:
        return cmd_import(argparse.Namespace(**{**vars(args), "paths": [str(out)]}))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "import",
        help="import DICOM files, folders (recursive) or DICOMDIRs into the store",
        description="Import DICOM files. Exit status 0 if anything was imported or was "
        "already stored, 1 if nothing importable was found; every rejected file is "
        "listed with its reason either way.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.set_defaults(handler=cmd_import)

    p = sub.add_parser("studies", help="list stored studies")
    p.add_argument("--series", action="store_true", help="also list each study's series")
    p.add_argument("--phi", action="store_true", help="show patient name and id")
    p.set_defaults(handler=cmd_studies)

    p = sub.add_parser("export", help="write a study's original files to a folder")
    p.add_argument("study_uid", metavar="STUDY_UID")
    p.add_argument("--to", required=True, metavar="DIR")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("delete", help="remove a study from the store (audited)")
    p.add_argument("study_uid", metavar="STUDY_UID")
    p.add_argument("--yes", action="store_true", help="confirm the deletion")
    p.set_defaults(handler=cmd_delete)

    p = sub.add_parser("audit", help="verify or show the audit log")
    audit_sub = p.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    q = audit_sub.add_parser("verify", help="check the hash chain and signed checkpoints")
    q.set_defaults(handler=cmd_audit_verify)
    q = audit_sub.add_parser("show", help="print audit records")
    q.add_argument("--study", metavar="UID")
    q.add_argument("--peer", metavar="NODE_ID")
    q.add_argument("--kind", choices=[k.value for k in AuditKind])
    q.set_defaults(handler=cmd_audit_show)

    p = sub.add_parser("demo-data", help="write a synthetic study (CT, MR, CR) for trying radmesh")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--ct-slices", type=int, default=200)
    p.add_argument("--ct-rows", type=int, default=512)
    p.add_argument("--mr-slices", type=int, default=24, help="0 for none")
    p.add_argument("--cr-rows", type=int, default=2048, help="0 for none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--import", dest="import_", action="store_true", help="also import it into this node"
    )
    p.set_defaults(handler=cmd_demo_data)
