"""The report draft before it is signed: its two sections, templates, duplicate marks.

Pure functions. The shared live report is one text (the wire format is unchanged); its
sections are headed lines::

    FINDINGS:
    ...

    IMPRESSION:
    ...

:func:`split_report` reads them back (headings in any case, with or without the colon);
a draft without headings is all findings, so nothing typed lands in the impression
unasked. :func:`duplicates` finds the accidental second copy of a measurement.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from consult.report_text import CRITICAL_LINE, Section, clean
from consult.shared import Annotation

FINDINGS = "FINDINGS:"
IMPRESSION = "IMPRESSION:"
# The word alone on its line, or followed by a colon ("Impression: Acute SDH.").
_HEADING = re.compile(r"^\s*(findings|impression)\s*(?::\s*(.*))?$", re.IGNORECASE)
DUPLICATE_MM = 1.0  # two marks of a kind on one slice whose points all lie this close


def join_report(findings: str, impression: str) -> str:
    """The shared text of a draft with these two sections."""
    return f"{FINDINGS}\n{findings.strip()}\n\n{IMPRESSION}\n{impression.strip()}\n"


def split_report(text: str) -> tuple[str, str]:
    """(findings, impression) of a draft. Text before any heading counts as findings."""
    parts: dict[str, list[str]] = {"findings": [], "impression": []}
    current = "findings"
    for raw in text.replace("\r\n", "\n").split("\n"):
        match = _HEADING.match(raw)
        if match:
            current = match.group(1).lower()
            rest = (match.group(2) or "").strip()
            if rest:
                parts[current].append(rest)
            continue
        parts[current].append(raw)
    return "\n".join(parts["findings"]).strip(), "\n".join(parts["impression"]).strip()


@dataclass(frozen=True)
class Template:
    name: str
    findings: str
    impression: str

    def text(self) -> str:
        return join_report(self.findings, self.impression)


TEMPLATES: dict[tuple[str, str], Template] = {
    ("CT", "head"): Template(
        "CT head",
        "Brain parenchyma: \nExtra-axial spaces: \nVentricles: \nSkull and sinuses: ",
        "",
    ),
    ("CT", "chest"): Template(
        "CT chest",
        "Lungs: \nPleura: \nMediastinum and hila: \nHeart and vessels: \nBones: ",
        "",
    ),
    ("MR", "brain"): Template(
        "MR brain",
        "Parenchyma: \nDiffusion: \nVentricles and extra-axial spaces: \nVessels (flow voids): ",
        "",
    ),
    ("CR", "chest"): Template(
        "CR chest",
        "Lungs: \nPleura: \nHeart and mediastinum: \nBones and soft tissues: ",
        "",
    ),
}
_REGION_WORDS = {
    "head": ("head", "brain", "cranial", "skull"),
    "brain": ("brain", "head", "cranial"),
    "chest": ("chest", "thorax", "lung", "thoracic"),
}


def template_for(modality: str, description: str) -> Template | None:
    """The template for a study's modality and region (from its description), if any."""
    modality = modality.upper().strip()
    if modality == "DX":
        modality = "CR"
    words = description.lower()
    for (mod, region), template in TEMPLATES.items():
        if mod == modality and any(w in words for w in _REGION_WORDS[region]):
            return template
    return None


def duplicates(
    annotations: Sequence[Annotation],
    spacing_of: Callable[[Annotation], tuple[float, float]],
    within_mm: float = DUPLICATE_MM,
) -> list[Annotation]:
    """Annotations that repeat an earlier one: same kind, same slice (instance and
    frame), every point within ``within_mm`` of the earlier one's (``spacing_of``: the
    slice's (row, column) pixel spacing in mm). The first of each group is kept."""
    kept: list[Annotation] = []
    dropped: list[Annotation] = []
    for a in annotations:
        row, col = spacing_of(a)
        if any(_same(a, k, row, col, within_mm) for k in kept):
            dropped.append(a)
        else:
            kept.append(a)
    return dropped


def _same(a: Annotation, b: Annotation, row: float, col: float, within: float) -> bool:
    if (a.kind, a.sop_instance_uid, a.frame) != (b.kind, b.sop_instance_uid, b.frame):
        return False
    if len(a.points) != len(b.points):
        return False
    return all(
        math.hypot((p[0] - q[0]) * col, (p[1] - q[1]) * row) <= within
        for p, q in zip(a.points, b.points, strict=True)
    )


def preview_sections(
    text: str,
    measurements: Iterable[str],
    *,
    critical: bool,
    dropped: Iterable[str] = (),
) -> list[Section]:
    """What signing will send, as :mod:`consult.report_text` sections (cleaned lines):
    findings, impression, measurement lines (each naming its slice), the critical flag,
    and the duplicates left out."""
    findings, impression = split_report(text)
    sections = [
        Section(
            "Report",
            (
                "Preview: this is what will be signed and sent",
                CRITICAL_LINE if critical else "Critical:   no (F8 marks it critical)",
            ),
        ),
        Section("Findings", tuple(clean(findings).splitlines()) or ("(none written)",)),
        Section("Impression", tuple(clean(impression).splitlines()) or ("(none written)",)),
    ]
    measured = tuple(clean(m) for m in measurements)
    if measured:
        sections.append(Section("Measurements", measured))
    left_out = tuple(clean(d) for d in dropped)
    if left_out:
        sections.append(
            Section(
                "Duplicates not sent",
                tuple(f"{line} (same as an earlier one within {DUPLICATE_MM:g} mm)"
                      for line in left_out),
            )
        )  # fmt: skip
    return sections
