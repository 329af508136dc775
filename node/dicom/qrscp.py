"""The node as a Query/Retrieve SCP: a workstation on the hospital's network finds and
retrieves what the node holds (issue 16, item 5).

Study Root C-FIND at STUDY, SERIES and IMAGE level; C-GET (the instances come back on
the caller's own association, so no address is involved); C-MOVE only to destinations
the site lists in ``[dicom] move_destinations = ["WS1@10.0.0.5:11112"]``. A C-MOVE
request names only an AE title: the node never learns an address from a request, and an
unlisted title is answered "move destination unknown" (0xA801).

Who may ask is the listener's own allow-list (:class:`node.dicom.guard.AllowList`: AE
title and, with ``[dicom] allowed``, address), checked before any of this runs. The
answer is what the node's store holds: the originals on a hospital's node, de-identified
studies on a consultant's. Matching is the subset PACS workstations use: single values,
``*``/``?`` wildcards on text, ``\\``-separated UID lists, date ranges
``YYYYMMDD-YYYYMMDD``; anything else in a key is matched as "any". At most
:data:`MAX_MATCHES` answers per query. Every query and retrieve is audited with the
calling AE and counts, never with the keys asked for (they may name a patient).
"""

from __future__ import annotations

import fnmatch
import io
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import pydicom
from pydicom import Dataset
from pynetdicom import build_context

from node.core.errors import NodeError

log = logging.getLogger(__name__)

MAX_MATCHES = 1000  # answers to one C-FIND; the rest are not sent and the log says so
MAX_KEY_CHARS = 256  # a longer matching key is refused as unreadable (0xA900)

STATUS_PENDING = 0xFF00
STATUS_CANCEL = 0xFE00
STATUS_SUCCESS = 0x0000
STATUS_IDENTIFIER_MISMATCH = 0xA900  # "identifier does not match SOP class"
STATUS_UNABLE_TO_PROCESS = 0xC001
STATUS_MOVE_DESTINATION_UNKNOWN = 0xA801

_DESTINATION = re.compile(r"^([ -~]{1,16})@([0-9A-Za-z.:\-\[\]]{1,253}):(\d{1,5})$")


class QueryRetrieveError(NodeError):
    """The ``[dicom] move_destinations`` setting cannot be used."""


class Archive(Protocol):
    """What the SCP answers from (:class:`node.dicom.store.Store` fits)."""

    def studies(self) -> Sequence[Any]: ...

    def series(self, study_uid: str) -> Sequence[Any]: ...

    def instances(self, study_uid: str, series_uid: str | None = None) -> Sequence[Any]: ...

    def read_instance(self, sop_instance_uid: str) -> bytes: ...


Emit = Callable[[str, dict[str, str]], None]


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int


def parse_destinations(entries: Sequence[str]) -> dict[str, Destination]:
    """``["AE@host:port", ...]`` from the site's config, by AE title."""
    found: dict[str, Destination] = {}
    for entry in entries:
        match = _DESTINATION.match(entry.strip())
        port = int(match.group(3)) if match else 0
        if match is None or not 0 < port < 65536:
            raise QueryRetrieveError(
                f"[dicom] move_destinations entry {entry!r} is not AE@host:port "
                '(e.g. "WS1@10.0.0.5:11112"); fix it in config.toml'
            )
        ae = match.group(1).strip()
        found[ae] = Destination(ae, match.group(2).strip("[]"), port)
    return found


# -- matching (pure) -----------------------------------------------------------------------


def _text_matches(wanted: str, value: str) -> bool:
    if wanted in ("", "*"):
        return True
    if any(c in wanted for c in "*?"):
        return fnmatch.fnmatchcase(value.upper(), wanted.upper())
    return value.strip().upper() == wanted.strip().upper()


def _uid_matches(wanted: str, value: str) -> bool:
    return wanted == "" or value in {u.strip() for u in wanted.split("\\")}


def _date_matches(wanted: str, value: str) -> bool:
    if wanted == "":
        return True
    if "-" not in wanted:
        return value == wanted
    low, high = wanted.split("-", 1)
    return bool(value) and (not low or value >= low) and (not high or value <= high)


def _value(identifier: Dataset, keyword: str) -> str:
    raw = identifier.get(keyword, "")
    if isinstance(raw, pydicom.multival.MultiValue):
        raw = "\\".join(str(v) for v in raw)
    text = str(raw if raw is not None else "")
    if len(text) > MAX_KEY_CHARS:
        raise ValueError(f"{keyword} is longer than {MAX_KEY_CHARS} characters")
    return text


def _answer(identifier: Dataset, level: str, values: dict[str, Any]) -> Dataset:
    """The keys the caller asked for, each filled where the node knows it."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for element in identifier:
        keyword = element.keyword
        if not keyword or keyword in ("QueryRetrieveLevel", "SpecificCharacterSet"):
            continue
        setattr(ds, keyword, values.get(keyword, ""))
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if keyword in values:  # the unique keys of the level and above, always
            setattr(ds, keyword, values[keyword])
    return ds


def _study_values(row: Any) -> dict[str, Any]:
    return {
        "StudyInstanceUID": row.study_uid,
        "PatientID": row.patient_id,
        "PatientName": row.patient_name,
        "PatientBirthDate": row.patient_birth_date,
        "PatientSex": row.patient_sex,
        "AccessionNumber": row.accession_number,
        "StudyDate": row.study_date,
        "StudyTime": row.study_time,
        "StudyDescription": row.description,
        "ModalitiesInStudy": "\\".join(row.modalities),
        "NumberOfStudyRelatedSeries": str(row.series_count),
        "NumberOfStudyRelatedInstances": str(row.instance_count),
    }


def _study_matches(identifier: Dataset, row: Any) -> bool:
    modalities = _value(identifier, "ModalitiesInStudy")
    return (
        _uid_matches(_value(identifier, "StudyInstanceUID"), row.study_uid)
        and _text_matches(_value(identifier, "PatientID"), row.patient_id)
        and _text_matches(_value(identifier, "PatientName"), row.patient_name)
        and _text_matches(_value(identifier, "AccessionNumber"), row.accession_number)
        and _date_matches(_value(identifier, "StudyDate"), row.study_date)
        and (
            not modalities
            or bool({m.strip().upper() for m in modalities.split("\\")} & set(row.modalities))
        )
    )


def find(archive: Archive, identifier: Dataset) -> Iterator[Dataset]:
    """Answers to a Study Root C-FIND identifier, at most :data:`MAX_MATCHES`.

    Raises ValueError for an identifier the node cannot read (no or unknown level)."""
    level = _value(identifier, "QueryRetrieveLevel").upper()
    if level not in ("STUDY", "SERIES", "IMAGE"):
        raise ValueError(f"query level {level!r} is not STUDY, SERIES or IMAGE")
    sent = 0
    for study in archive.studies():
        if not _study_matches(identifier, study):
            continue
        values = _study_values(study)
        if level == "STUDY":
            yield _answer(identifier, level, values)
            sent += 1
        else:
            for answer in _below_study(archive, identifier, level, values):
                yield answer
                sent += 1
                if sent >= MAX_MATCHES:
                    break
        if sent >= MAX_MATCHES:
            log.warning("a C-FIND matched more than %d entries; the rest were not sent", sent)
            return


def _below_study(
    archive: Archive, identifier: Dataset, level: str, values: dict[str, Any]
) -> Iterator[Dataset]:
    wanted_series = _value(identifier, "SeriesInstanceUID")
    for series in archive.series(values["StudyInstanceUID"]):
        if not _uid_matches(wanted_series, series.series_uid):
            continue
        if not _text_matches(_value(identifier, "Modality"), series.modality):
            continue
        series_values = {
            **values,
            "SeriesInstanceUID": series.series_uid,
            "Modality": series.modality,
            "SeriesDescription": series.description,
            "SeriesNumber": _number(series.series_number),
            "BodyPartExamined": series.body_part,
            "NumberOfSeriesRelatedInstances": str(series.instance_count),
        }
        if level == "SERIES":
            yield _answer(identifier, level, series_values)
            continue
        wanted_sop = _value(identifier, "SOPInstanceUID")
        for instance in archive.instances(values["StudyInstanceUID"], series.series_uid):
            if _uid_matches(wanted_sop, instance.sop_instance_uid):
                yield _answer(
                    identifier,
                    level,
                    {
                        **series_values,
                        "SOPInstanceUID": instance.sop_instance_uid,
                        "SOPClassUID": instance.sop_class_uid,
                        "InstanceNumber": (
                            ""
                            if instance.instance_number is None
                            else str(instance.instance_number)
                        ),
                    },
                )


def _number(value: int | None) -> str:
    return "" if value is None else str(value)


def retrieve_uids(archive: Archive, identifier: Dataset) -> list[Any]:
    """The instances (store rows) a C-GET/C-MOVE identifier names (STUDY, SERIES or IMAGE level,
    by the unique keys only, as PS3.4 C.4.2/C.4.3 asks)."""
    level = _value(identifier, "QueryRetrieveLevel").upper()
    studies = [u for u in _value(identifier, "StudyInstanceUID").split("\\") if u]
    if level not in ("STUDY", "SERIES", "IMAGE") or not studies:
        raise ValueError("a retrieve names a level and at least one Study Instance UID")
    series = {u for u in _value(identifier, "SeriesInstanceUID").split("\\") if u}
    sops = {u for u in _value(identifier, "SOPInstanceUID").split("\\") if u}
    known = {row.study_uid for row in archive.studies()}
    found: list[Any] = []
    for study_uid in studies:
        if study_uid not in known:
            continue
        for instance in archive.instances(study_uid):
            if level in ("SERIES", "IMAGE") and instance.series_uid not in series:
                continue
            if level == "IMAGE" and instance.sop_instance_uid not in sops:
                continue
            found.append(instance)
    return found


def contexts_for(instances: Sequence[Any]) -> list[Any]:
    """Presentation contexts to propose to a C-MOVE destination: each SOP class with the
    transfer syntaxes its instances are stored in (they are sent as stored)."""
    syntaxes: dict[str, set[str]] = {}
    for row in instances:
        syntaxes.setdefault(row.sop_class_uid, set()).add(row.transfer_syntax)
    found = [build_context(sop, sorted(ts)) for sop, ts in sorted(syntaxes.items())][:128]
    return found or [build_context("1.2.840.10008.1.1")]  # nothing to send: Verification


# -- the DIMSE handlers (pynetdicom threads) --------------------------------------------


class QueryRetrieveSCP:
    """C-FIND, C-GET and C-MOVE handlers for :class:`node.dicom.net.DicomListener`."""

    def __init__(
        self,
        archive: Archive,
        destinations: dict[str, Destination],
        emit: Emit,
    ) -> None:
        self._archive = archive
        self._destinations = destinations
        self._emit = emit

    def handle_find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        calling = _caller(event)
        try:
            identifier = event.identifier
            answers = find(self._archive, identifier)
            count = 0
            for answer in answers:
                if event.is_cancelled:
                    yield STATUS_CANCEL, None
                    return
                count += 1
                yield STATUS_PENDING, answer
        except (ValueError, AttributeError, TypeError, KeyError) as exc:
            log.warning("C-FIND from %s refused: %s", calling, exc)
            self._emit("dicom.find", {"calling_ae": calling, "status": "refused"})
            yield STATUS_IDENTIFIER_MISMATCH, None
            return
        self._emit("dicom.find", {"calling_ae": calling, "matches": str(count)})
        yield STATUS_SUCCESS, None

    def _instances(self, event: Any, kind: str) -> list[Any] | None:
        """The instances a retrieve names, or None (refused, audited) if it names none."""
        try:
            return retrieve_uids(self._archive, event.identifier)
        except (ValueError, AttributeError, TypeError, KeyError) as exc:
            log.warning("C-%s from %s refused: %s", kind.upper(), _caller(event), exc)
            self._emit(f"dicom.{kind}", {"calling_ae": _caller(event), "status": "refused"})
            return None

    def _send(
        self, event: Any, kind: str, rows: list[Any] | None, details: dict[str, str]
    ) -> Iterator[Any]:
        """The sub-operation count, then each instance, as pynetdicom's C-GET and C-MOVE
        handlers yield them; a cancel stops at the next instance."""
        if rows is None:
            yield 0
            yield STATUS_IDENTIFIER_MISMATCH, None
            return
        self._emit(f"dicom.{kind}", {**details, "instances": str(len(rows))})
        yield len(rows)
        for row in rows:
            if event.is_cancelled:
                yield STATUS_CANCEL, None
                return
            try:
                data = self._archive.read_instance(row.sop_instance_uid)
                yield STATUS_PENDING, pydicom.dcmread(io.BytesIO(data))
            except Exception as exc:  # a damaged blob: that one fails, the rest go on
                log.error("could not read instance for a retrieve: %s", type(exc).__name__)
                yield STATUS_UNABLE_TO_PROCESS, None

    def handle_get(self, event: Any) -> Iterator[Any]:
        rows = self._instances(event, "get")
        yield from self._send(event, "get", rows, {"calling_ae": _caller(event)})

    def handle_move(self, event: Any) -> Iterator[Any]:
        calling = _caller(event)
        raw = event.move_destination
        wanted = (raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)).strip()
        destination = self._destinations.get(wanted)
        if destination is None:
            log.warning(
                "C-MOVE from %s to unknown AE %r refused: list it in [dicom] move_destinations",
                calling,
                wanted,
            )
            self._emit("dicom.move", {"calling_ae": calling, "status": "unknown destination"})
            yield None, None
            return
        rows = self._instances(event, "move")
        contexts = contexts_for(rows or [])
        options = {"ae_title": destination.ae_title, "contexts": contexts}
        yield destination.host, destination.port, options
        details = {"calling_ae": calling, "destination": destination.ae_title}
        yield from self._send(event, "move", rows, details)


def _caller(event: Any) -> str:
    return str(event.assoc.requestor.ae_title).strip()
