"""Query/retrieve from the hospital's PACS: C-FIND, C-MOVE and C-GET as SCU (issue 16).

* :func:`find_studies` lists the PACS's studies matching a :class:`StudyQuery`
  (patient ID, accession number, or a modality with a first date), at most
  ``max_matches`` of them: past that the association is aborted and the answer
  says it was cut. What the PACS answers is untrusted text: callers print it
  through :func:`node.core.display.printable`, and patient name/ID only on request.
* :func:`move_study` asks the PACS to C-STORE one study to an AE title it knows
  (the node's own listener, :class:`node.dicom.net.DicomListener`); progress
  comes from the PACS's pending responses.
* :func:`get_study` fetches one study over our own association (C-GET, where the
  PACS allows it); each instance's data set bytes are kept exactly as the PACS
  sent them, and handed to a sink with the same shape as the listener's.

Query values are checked before they leave: no wildcard or multi-value
characters (``*``, ``?``, ``\\``), so a typo cannot list the whole PACS.
"""

from __future__ import annotations

import io
import logging
import re
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import IO, Any

from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.multival import MultiValue
from pynetdicom import AE, _config, build_role, evt
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from node.dicom.guard import meter_client
from node.dicom.net import (
    ACCEPTED_TRANSFER_SYNTAXES,
    MAX_INSTANCE_BYTES,
    MAX_PDU_BYTES,
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    DicomNetError,
    DicomPeerError,
    association,
)

log = logging.getLogger(__name__)

MAX_MATCHES = 1000  # studies one query lists; more and the answer says it was cut
QR_TIMEOUT = 60.0  # seconds per DIMSE message of a query or retrieve
QUERY_MAX_SECONDS = 300.0  # a whole query; past it the association is aborted
RETRIEVE_MAX_SECONDS = 4 * 3600.0  # a whole retrieve (a PACS answering "pending" forever)
# Pending responses: 0xFF00 and 0xFF01 (PS3.4 C.4.1.1.4).
_PENDING = (0xFF00, 0xFF01)
_BAD_VALUE = re.compile(r"[*?\\\x00-\x1f]")
_DATE = re.compile(r"^\d{8}$")
_MODALITY = re.compile(r"^[A-Z0-9]{1,16}$")


class QueryError(DicomNetError):
    """A query or retrieve was asked with values the PACS must not get."""


@dataclass(frozen=True)
class PacsAddress:
    host: str
    port: int
    ae_title: str
    calling_ae: str  # ours


@dataclass(frozen=True)
class StudyQuery:
    """What to look for; at least one of the fields. ``since`` is YYYYMMDD."""

    patient_id: str = ""
    accession: str = ""
    modality: str = ""
    since: str = ""

    def check(self) -> None:
        if not (self.patient_id or self.accession or self.modality or self.since):
            raise QueryError(
                "say what to look for: --patient-id, --accession, or --modality/--since"
            )
        for name, value in (("patient id", self.patient_id), ("accession", self.accession)):
            if len(value) > 64 or _BAD_VALUE.search(value):
                raise QueryError(
                    f"the {name} must be one exact value (no *, ? or \\, at most 64 characters)"
                )
        if self.modality and not _MODALITY.match(self.modality):
            raise QueryError(f"modality {self.modality!r} is not a DICOM modality such as CT or MR")
        if self.since and not _DATE.match(self.since):
            raise QueryError(f"--since {self.since!r} is not a date YYYYMMDD")

    def identifier(self) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = ""
        ds.StudyDate = f"{self.since}-" if self.since else ""
        ds.StudyTime = ""
        ds.ModalitiesInStudy = self.modality
        ds.StudyDescription = ""
        ds.NumberOfStudyRelatedInstances = ""
        ds.PatientID = self.patient_id
        ds.PatientName = ""
        ds.AccessionNumber = self.accession
        return ds


@dataclass(frozen=True)
class StudyMatch:
    """One study as the PACS describes it (untrusted text: print it with ``printable``)."""

    study_uid: str
    date: str
    modalities: str
    description: str
    instances: int | None
    patient_id: str
    patient_name: str
    accession: str

    @classmethod
    def from_identifier(cls, ds: Dataset) -> StudyMatch:
        def text(keyword: str) -> str:
            value = ds.get(keyword, "")
            if isinstance(value, MultiValue):
                return "\\".join(str(v) for v in value)
            return str(value or "")

        count = text("NumberOfStudyRelatedInstances")
        return cls(
            study_uid=text("StudyInstanceUID"),
            date=text("StudyDate"),
            modalities=text("ModalitiesInStudy"),
            description=text("StudyDescription"),
            instances=int(count) if count.isdigit() else None,
            patient_id=text("PatientID"),
            patient_name=text("PatientName"),
            accession=text("AccessionNumber"),
        )


@dataclass(frozen=True)
class QueryResult:
    matches: tuple[StudyMatch, ...]
    truncated: bool  # the PACS had more than ``max_matches``; the rest was not read


@dataclass
class RetrieveReport:
    """How a retrieve went, from the PACS's sub-operation counts and our own receipts."""

    completed: int = 0
    failed: int = 0
    warning: int = 0
    remaining: int = 0
    status: int | None = None
    received: int = 0  # instances new in the store
    duplicate: int = 0  # already in the store
    refused: int = 0  # received but not stored (not readable, or not of this study)

    @property
    def ok(self) -> bool:
        return self.status in (STATUS_SUCCESS,) and self.failed == 0 and self.refused == 0


Progress = Callable[[RetrieveReport], None]
# (seekable Part-10 stream, its size, calling AE) as the listener's on_stream; returns
# True if new in the store, False if a duplicate.
GetSink = Callable[[IO[bytes], int, str], bool]


def check_uid(uid: str) -> str:
    if not re.fullmatch(r"[0-9]+(\.[0-9]+)*", uid) or len(uid) > 64:
        raise QueryError(f"{uid!r} is not a study instance UID (digits and dots)")
    return uid


def _over_cap(address: str, what: str) -> None:
    log.warning("aborted the association with the PACS at %s: it sent %s", address, what)


def _association(
    pacs: PacsAddress, ae: AE, timeout: float, **kwargs: Any
) -> AbstractContextManager[Any]:
    """An association with the PACS, metered (:func:`~node.dicom.net.association`)."""
    meter_client(ae, (MAX_PDU_BYTES, MAX_INSTANCE_BYTES), _over_cap)
    hint = (
        "check [dicom] pacs_host, pacs_port and pacs_ae_title, and that the PACS knows this "
        f"node as a modality with AE title {pacs.calling_ae!r}"
    )
    return association(ae, pacs.host, pacs.port, pacs.ae_title, timeout, hint, **kwargs)


def find_studies(
    pacs: PacsAddress,
    query: StudyQuery,
    *,
    max_matches: int = MAX_MATCHES,
    timeout: float = QR_TIMEOUT,
    max_seconds: float = QUERY_MAX_SECONDS,
) -> QueryResult:
    """C-FIND at study level (Study Root); at most ``max_matches`` matches."""
    query.check()
    ae = AE(ae_title=pacs.calling_ae)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    matches: list[StudyMatch] = []
    truncated = False
    deadline = time.monotonic() + max_seconds
    with _association(pacs, ae, timeout) as assoc:
        for status, identifier in assoc.send_c_find(
            query.identifier(), StudyRootQueryRetrieveInformationModelFind
        ):
            if time.monotonic() > deadline:
                assoc.abort()
                raise DicomPeerError(
                    f"the PACS {pacs.ae_title} took more than {max_seconds:.0f} s to answer "
                    "the query: aborted it; narrow the query"
                )
            if not status or "Status" not in status:
                raise DicomPeerError(
                    f"the PACS {pacs.ae_title} stopped answering the query (no response "
                    f"within {timeout:.0f} s or the association dropped)"
                )
            code = int(status.Status)
            if code in _PENDING:
                if identifier is None:
                    continue
                if len(matches) >= max_matches:
                    truncated = True
                    assoc.abort()  # nothing more is read from it
                    break
                matches.append(StudyMatch.from_identifier(identifier))
            elif code != STATUS_SUCCESS:
                raise DicomPeerError(
                    f"the PACS {pacs.ae_title} refused the query (status 0x{code:04X}); "
                    "check that it allows queries from this node's AE title"
                )
    return QueryResult(tuple(matches), truncated)


def _study_identifier(study_uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = check_uid(study_uid)
    return ds


def _count(report: RetrieveReport, status: Dataset) -> None:
    for attr, keyword in (
        ("completed", "NumberOfCompletedSuboperations"),
        ("failed", "NumberOfFailedSuboperations"),
        ("warning", "NumberOfWarningSuboperations"),
        ("remaining", "NumberOfRemainingSuboperations"),
    ):
        value = status.get(keyword)
        if isinstance(value, int):
            setattr(report, attr, value)


def _run_retrieve(
    pacs: PacsAddress,
    assoc: Any,
    responses: Any,
    report: RetrieveReport,
    progress: Progress | None,
) -> RetrieveReport:
    deadline = time.monotonic() + RETRIEVE_MAX_SECONDS
    for status, _identifier in responses:
        if time.monotonic() > deadline:
            assoc.abort()
            raise DicomPeerError(
                f"the retrieve from {pacs.ae_title} took more than {RETRIEVE_MAX_SECONDS:.0f} s: "
                "aborted it; what arrived is kept, run it again for the rest"
            )
        if not status or "Status" not in status:
            raise DicomPeerError(
                f"the PACS {pacs.ae_title} stopped answering the retrieve (no response in "
                "time or the association dropped); run it again: what arrived is kept"
            )
        code = int(status.Status)
        _count(report, status)
        if code in _PENDING:
            if progress is not None:
                progress(report)
            continue
        report.status = code
    return report


def move_study(
    pacs: PacsAddress,
    study_uid: str,
    destination_ae: str,
    *,
    progress: Progress | None = None,
    timeout: float = QR_TIMEOUT,
) -> RetrieveReport:
    """C-MOVE one study from the PACS to ``destination_ae`` (an AE the PACS knows)."""
    identifier = _study_identifier(study_uid)
    ae = AE(ae_title=pacs.calling_ae)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    report = RetrieveReport()
    with _association(pacs, ae, timeout) as assoc:
        responses = assoc.send_c_move(
            identifier, destination_ae, StudyRootQueryRetrieveInformationModelMove
        )
        return _run_retrieve(pacs, assoc, responses, report, progress)


def _raw_data_set(event: Any) -> bytes:
    """The data set bytes exactly as received (in memory: see :func:`get_study`)."""
    data_set = getattr(event.request, "DataSet", None)
    if not isinstance(data_set, io.BytesIO):
        raise ValueError("no in-memory data set")
    return data_set.getvalue()


class _GetReceiver:
    """The C-STORE sub-operations of a C-GET, on our association: the data set bytes as
    the PACS sent them, behind a new file meta group, to ``sink``."""

    def __init__(self, sink: GetSink, study_uid: str, pacs_ae: str, report: RetrieveReport):
        self._sink = sink
        self._study_uid = study_uid
        self._pacs_ae = pacs_ae
        self._report = report
        self._lock = threading.Lock()

    def __call__(self, event: Any) -> int:
        try:
            raw = _raw_data_set(event)
            meta = event.file_meta
            ds = event.dataset  # decoded from the same bytes: what it claims to be
            if str(ds.get("StudyInstanceUID", "")) != self._study_uid:
                log.warning("C-GET: the PACS sent an instance of another study; refused it")
                self._tally(refused=1)
                return STATUS_CANNOT_UNDERSTAND
        except Exception as exc:  # undecodable: refused, never stored
            log.warning("C-GET: an instance from the PACS is not readable: %s", type(exc).__name__)
            self._tally(refused=1)
            return STATUS_CANNOT_UNDERSTAND
        buffer = DicomBytesIO()
        buffer.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(buffer, meta, enforce_standard=True)
        buffer.write(raw)
        part10 = buffer.getvalue()
        try:
            new = self._sink(io.BytesIO(part10), len(part10), self._pacs_ae)
        except Exception as exc:
            log.warning("C-GET: the store refused an instance: %s", exc)
            self._tally(refused=1)
            return STATUS_OUT_OF_RESOURCES
        self._tally(received=1 if new else 0, duplicate=0 if new else 1)
        return STATUS_SUCCESS

    def _tally(self, *, received: int = 0, duplicate: int = 0, refused: int = 0) -> None:
        with self._lock:
            self._report.received += received
            self._report.duplicate += duplicate
            self._report.refused += refused


def get_study(
    pacs: PacsAddress,
    study_uid: str,
    sink: GetSink,
    *,
    progress: Progress | None = None,
    timeout: float = QR_TIMEOUT,
) -> RetrieveReport:
    """C-GET one study: the PACS sends its instances over this association."""
    identifier = _study_identifier(study_uid)
    if _config.STORE_RECV_CHUNKED_DATASET:
        # A listener in this process made pynetdicom write received data sets to files;
        # ours would land in clear in the system temp directory: refused instead.
        raise QueryError(
            "C-GET cannot run inside a process that runs the DICOM listener: use "
            "`radmesh dicom retrieve` without --get (C-MOVE to the listener)"
        )
    ae = AE(ae_title=pacs.calling_ae)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    contexts = StoragePresentationContexts[:127]  # one association carries 128 contexts
    roles = []
    for context in contexts:
        ae.add_requested_context(str(context.abstract_syntax), list(ACCEPTED_TRANSFER_SYNTAXES))
        roles.append(build_role(str(context.abstract_syntax), scp_role=True))
    report = RetrieveReport()
    receiver = _GetReceiver(sink, study_uid, pacs.ae_title, report)
    handlers = [(evt.EVT_C_STORE, receiver)]
    with _association(pacs, ae, timeout, ext_neg=roles, evt_handlers=handlers) as assoc:
        responses = assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)
        return _run_retrieve(pacs, assoc, responses, report, progress)


__all__ = [
    "MAX_MATCHES",
    "PacsAddress",
    "QueryError",
    "QueryResult",
    "RetrieveReport",
    "StudyMatch",
    "StudyQuery",
    "find_studies",
    "get_study",
    "move_study",
]
