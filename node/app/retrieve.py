"""A study retrieved from the hospital's PACS into the running node (`radmesh dicom
retrieve` while the node runs): C-MOVE to the node's own listener, its store takes what
arrives, audited."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from node.core.audit import AuditKind, AuditLog
from node.dicom.net import DicomNetError
from node.dicom.qr import PacsAddress, RetrieveReport, check_uid, move_study

if TYPE_CHECKING:
    from collections.abc import Callable

    from node.app.runtime import NodeRuntime


def retrieve_line(report: RetrieveReport) -> str:
    return (
        f"  {report.completed} done, {report.failed} failed, {report.warning} with warnings, "
        f"{report.remaining} to go"
    )


def audit_retrieve(
    audit: AuditLog, study_uid: str, pacs: PacsAddress, report: RetrieveReport, via: str
) -> None:
    audit.append(
        AuditKind.IMPORT,
        now=time.time(),
        study_uid=study_uid,
        details={
            "from": f"pacs:{pacs.ae_title}",
            "via": f"dicom retrieve ({via})",
            "received": report.received,
            "duplicate": report.duplicate,
            "failed": report.failed + report.refused,
        },
    )


async def retrieve_to_node(
    rt: NodeRuntime, study_uid: str, host: str, port: int, aet: str, emit: Callable[[str], None]
) -> RetrieveReport:
    """C-MOVE to the running node's own listener; its store takes what arrives."""
    if rt.dicom is None:
        raise DicomNetError(
            "the running node has no DICOM listener for the PACS to send to: set [dicom] "
            "enabled = true in config.toml and restart it, or stop it and retrieve again "
            "(a listener for the command is used then)"
        )
    study_uid = check_uid(study_uid)
    pacs = PacsAddress(host, port, aet, rt.dicom.ae_title)
    before = {row.sop_instance_uid for row in rt.store.instances(study_uid)}
    loop = asyncio.get_running_loop()

    def progress(report: RetrieveReport) -> None:  # from the SCU's thread
        loop.call_soon_threadsafe(emit, retrieve_line(report))

    report = await asyncio.to_thread(
        move_study, pacs, study_uid, rt.dicom.ae_title, progress=progress
    )
    after = {row.sop_instance_uid for row in rt.store.instances(study_uid)}
    report.received = len(after - before)
    report.duplicate = max(0, report.completed + report.warning - report.received)
    audit_retrieve(rt.audit, study_uid, pacs, report, "move to the running node")
    return report


__all__ = ["audit_retrieve", "retrieve_line", "retrieve_to_node"]
