"""What every way a study leaves this node shares: the checks and records around de-id.

A study leaves de-identified unless a person asked for it identified
(``--identified``: warned, audited). Before a de-identified share, the study's
instances are checked for text burned into the pixels (:func:`node.dicom.deid.burned_in_reason`):
if any may carry it, the share is refused with the instances named, unless the
hospital confirms the pixels were checked (``--burned-in-checked``, the TUI's
check box), which is audited. The pseudonym map of a plain ``radmesh send``
is kept per (study, peer), so sending again gives the peer the same pseudonyms
(and the same transfer, which resumes).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from node.core.audit import AuditKind, AuditLog
from node.core.config import SharingConfig
from node.dicom.deid import (
    DEFAULT_OPTIONS,
    BurnedInPolicy,
    DeidError,
    Option,
    PseudonymMap,
    ShareContext,
    burned_in_reason,
    deidentify,
)
from node.dicom.store import Store

PSEUDONYM_KEY_PURPOSE = "radmesh-pseudonyms-v1"  # the same key node.app.cases uses
NAMED_AT_MOST = 10  # instances listed in a refusal; the rest are counted
_HEADER_TAGS = ["Modality", "SOPClassUID", "SOPInstanceUID", "BurnedInAnnotation", "ConversionType"]


class BurnedInRefused(DeidError):
    """Some instances may show the patient's identity in their pixels; nobody said they
    were checked."""


@dataclass(frozen=True)
class Risk:
    sop_instance_uid: str
    reason: str


def burned_in_risks(store: Store, study_uid: str) -> list[Risk]:
    """The stored instances of a study that may have text burned into their pixels."""
    risks = []
    for row in store.instances(study_uid):
        try:
            with store.open_instance(row.sop_instance_uid) as stream:
                ds = pydicom.dcmread(stream, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            reason = burned_in_reason(ds)
        except (InvalidDicomError, ValueError, EOFError) as exc:
            reason = f"its header cannot be read ({type(exc).__name__})"
        if reason is not None:
            risks.append(Risk(row.sop_instance_uid, reason))
    return risks


def refusal(risks: list[Risk]) -> str:
    named = "; ".join(f"{r.sop_instance_uid} ({r.reason})" for r in risks[:NAMED_AT_MOST])
    more = f" and {len(risks) - NAMED_AT_MOST} more" if len(risks) > NAMED_AT_MOST else ""
    return (
        f"not shared: {len(risks)} instance(s) may have text burned into the pixels that "
        f"identifies the patient: {named}{more}. Look at those images; if no name, id or date "
        "is written in them, share again with --burned-in-checked (in the TUI: tick "
        '"pixels checked"); the confirmation is audited. Or black out the band where the '
        "text is with --black-out-top ROWS (ultrasound), or leave those series out."
    )


def confirm_burned_in(
    store: Store,
    audit: AuditLog,
    study_uid: str,
    checked: bool,
    *,
    now: float,
    peer: str | None = None,
    consult: str | None = None,
    black_out_top: int = 0,
) -> bool:
    """Refuse a de-identified share of a study that may show text in its pixels unless
    ``checked``, or unless the share blacks out the top ``black_out_top`` rows of those
    images (Clean Pixel Data); either choice, when it mattered, is audited. Returns
    whether burned-in instances may go unchanged (True only when some were found and a
    person confirmed them)."""
    risks = burned_in_risks(store, study_uid)
    if not risks:
        return False
    details: dict[str, str | int] = {"event": "burned-in-checked", "instances": len(risks)}
    if black_out_top > 0:
        details = {"event": "black-out", "rows": black_out_top, "instances": len(risks)}
    elif not checked:
        raise BurnedInRefused(refusal(risks))
    if consult is not None:
        details["consult"] = consult
    audit.append(AuditKind.SHARE, now=now, study_uid=study_uid, peer=peer, details=details)
    return black_out_top <= 0


class QuestionNamesPatient(DeidError):
    """The free text that goes with a de-identified study identifies the patient."""


def _found(item: str, text: str, *, capitalised: bool) -> bool:
    """``item`` as a whole word of ``text``; a name part only where it is written with a
    capital (so the surname White does not stop "white matter")."""
    for match in re.finditer(rf"(?<!\w){re.escape(item)}(?!\w)", text, re.IGNORECASE):
        if not capitalised or match.group(0)[0].isupper():
            return True
    return False


def check_free_text(store: Store, study_uid: str, text: str, what: str) -> None:
    """Refuse ``text`` (the clinical question) that names the study's patient: it leaves
    with the de-identified study. The message does not repeat what was found."""
    study = store.study(study_uid)
    numbers = [study.patient_id, study.accession_number]
    birth = study.patient_birth_date
    if len(birth) == 8 and birth.isdigit():
        numbers += [
            birth,
            f"{birth[:4]}-{birth[4:6]}-{birth[6:]}",
            f"{birth[6:]}/{birth[4:6]}/{birth[:4]}",
        ]
    names = [part for part in re.split(r"[\^\s,]+", study.patient_name) if len(part) >= 3]
    if any(_found(n, text, capitalised=False) for n in numbers if len(n) >= 3) or any(
        _found(n, text, capitalised=True) for n in names
    ):
        raise QuestionNamesPatient(
            f"the {what} contains the patient's name, id, accession number or birth date; "
            "the study leaves de-identified, so nothing sent with it may identify the "
            f"patient: rewrite the {what} without them"
        )


def audit_identified(
    audit: AuditLog, study_uid: str, *, now: float, peer: str | None, via: str
) -> None:
    """An identified share: a person chose to send the patient's identity."""
    audit.append(
        AuditKind.SHARE,
        now=now,
        study_uid=study_uid,
        peer=peer,
        details={"event": "identified", "via": via},
    )


IDENTIFIED_WARNING = (
    "warning: the study leaves IDENTIFIED (patient name, id, birth date, free text and "
    "burned-in text included). Do this only when the receiver must know the patient; "
    "this send is recorded in the audit log."
)


def send_map_path(data_dir: Path, study_uid: str, peer: str) -> Path:
    """Where the pseudonym map of a plain send of ``study_uid`` to ``peer`` lives (a name
    derived from a hash: never from the UID's text)."""
    digest = hashlib.sha256(f"send\x00{study_uid}\x00{peer}".encode()).hexdigest()[:32]
    return data_dir / "pseudonyms" / f"send-{digest}.map"


def load_or_new(path: Path, key: bytes) -> PseudonymMap:
    return PseudonymMap.load(path, key) if path.exists() else PseudonymMap()


def options_of(config: SharingConfig) -> frozenset[Option]:
    """The Annex E options of a share: the defaults plus what the site turned on."""
    chosen = set(DEFAULT_OPTIONS)
    for wanted, option in (
        (config.clean_descriptors, Option.CLEAN_DESCRIPTORS),
        (config.retain_device_identity, Option.RETAIN_DEVICE_IDENTITY),
        (config.retain_institution_identity, Option.RETAIN_INSTITUTION_IDENTITY),
    ):
        if wanted:
            chosen.add(option)
    return frozenset(chosen)


def deidentifier(
    pseudonyms: PseudonymMap,
    path: Path,
    key: bytes,
    options: frozenset[Option] = DEFAULT_OPTIONS,
) -> Callable[[Iterable[bytes]], Iterator[bytes]]:
    """A ``prepare`` for :func:`peer_transport.transfer.runner.send_study`: de-identifies
    one file at a time with one context, then saves the map with every UID in it."""

    def prepare(files: Iterable[bytes]) -> Iterator[bytes]:
        policy = BurnedInPolicy.ALLOW if pseudonyms.burned_in_checked else BurnedInPolicy.REFUSE
        share = ShareContext(
            pseudonyms=pseudonyms,
            options=options,
            burned_in=policy,
            black_out_top=pseudonyms.black_out_top,
        )
        for data in files:
            yield deidentify(data, share)
        pseudonyms.persist(path, key)

    return prepare
