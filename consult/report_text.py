"""A signed report as a clinician reads it: plain text and a self-contained HTML page.

One pure formatter (:func:`report_sections`) for ``radmesh consult show``, ``radmesh
consult report --out`` and, later, the TUI's report view. Everything in a report is
peer-supplied text, so it passes through :func:`clean` (terminal control characters
and bidirectional overrides removed) before it is shown, and through
:func:`html.escape` as well in the HTML export.
"""

from __future__ import annotations

import datetime as dt
import html
import re
from collections.abc import Iterable
from dataclasses import dataclass

from consult.addenda import Addendum
from consult.report import KeyImage, Mark, Measurement, Report, Unit
from consult.shared import AnnotationKind

# C0 controls but tab and newline, DEL, C1 controls (ESC [ and CSI start terminal
# sequences), and the bidi overrides/isolates that reorder what a reader sees.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
REPLACEMENT = "\ufffd"


def clean(text: str) -> str:
    """Peer text made safe to print: each control character becomes U+FFFD (visible, so
    a tampered text shows that something was there)."""
    return _UNSAFE.sub(REPLACEMENT, text.replace("\r\n", "\n"))


@dataclass(frozen=True)
class Signature:
    """What this node found when it checked the report's signature just now."""

    verified: bool
    detail: str  # why not, when not verified

    def describe(self) -> str:
        if self.verified:
            return "verified (signed by the author's node key, unchanged since)"
        return f"NOT VERIFIED: {self.detail}"


@dataclass(frozen=True)
class Section:
    heading: str
    lines: tuple[str, ...]


CRITICAL_LINE = "Critical:   YES, a finding that needs action now"

_UNIT_TEXT = {Unit.MM: "mm", Unit.DEGREE: "°", Unit.MM2: "mm²", Unit.HU: "HU", Unit.NONE: ""}
_NAMES = {"sd": "SD", "min": "min", "max": "max", "mean": "mean", "area": "area"}


def _value(m: Measurement) -> str:
    unit = _UNIT_TEXT[m.unit]
    digits = 0 if m.unit is Unit.MM2 else 1
    number = f"{m.value:.{digits}f}"
    if not unit:
        return number
    return f"{number}{unit}" if unit == "°" else f"{number} {unit}"


def image_name(image: KeyImage | None) -> str:
    """The slice a reader finds it on: the instance number, else the end of its UID."""
    if image is None:
        return "no image"
    name = (
        f"image {image.number}"
        if image.number is not None
        else f"image …{clean(image.sop_instance_uid)[-12:]}"
    )
    return name + (f", frame {image.frame}" if image.frame is not None else "")


def _measurement_lines(measurements: Iterable[Measurement]) -> list[str]:
    groups: dict[str, list[Measurement]] = {}
    for index, m in enumerate(measurements):
        groups.setdefault(m.group or f"#{index}", []).append(m)
    lines = []
    for members in groups.values():
        first = members[0]
        values = ", ".join(f"{_NAMES.get(m.quantity, m.quantity)} {_value(m)}" for m in members)
        if first.outline is not None and first.outline.kind is AnnotationKind.ELLIPSE:
            values = f"ellipse ROI: {values}"
        label = clean(first.label) or first.quantity
        lines.append(f"{label}: {values} ({image_name(first.image)})")
    return lines


def _mark_lines(marks: Iterable[Mark]) -> list[str]:
    return [
        f"{mark.outline.kind.value} “{clean(mark.label)}” ({image_name(mark.image)})"
        for mark in marks
    ]


def _stamp(epoch: int) -> str:
    return dt.datetime.fromtimestamp(epoch, tz=dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def report_sections(report: Report, signature: Signature, *, trust: str = "") -> list[Section]:
    """The report as headed sections of cleaned lines (empty sections say so). ``trust``:
    this node's trust in the author's key, shown after its short id when given."""
    author = clean(report.author_name) or "(no name given)"
    by = f"{author} (node {report.author.short()}{', ' + clean(trust) if trust else ''})"
    if report.author_institution:
        by += f", {clean(report.author_institution)}"
    sections = [
        Section(
            "Report",
            (
                f"Consult:    {clean(report.consult_id)}",
                f"Author:     {by}",
                f"Signature:  {signature.describe()}",
                f"Signed at:  {_stamp(report.finalised_at)}",
                *((CRITICAL_LINE,) if report.critical else ()),
            ),
        ),
        Section("Findings", tuple(clean(report.text).splitlines()) or ("(none written)",)),
        Section("Impression", tuple(clean(report.impression).splitlines())),
    ]
    measured = _measurement_lines(report.measurements)
    if measured:
        sections.append(Section("Measurements", tuple(measured)))
    marks = _mark_lines(report.marks)
    if marks:
        sections.append(Section("Marks", tuple(marks)))
    if report.key_images:
        sections.append(Section("Key images", tuple(image_name(k) for k in report.key_images)))
    return sections


def unverified_sections(consult_id: str, reason: str) -> list[Section]:
    """What to show instead of a report whose signature no longer verifies: nothing of it."""
    return [
        Section(
            "Report",
            (
                f"Consult:    {clean(consult_id)}",
                f"Signature:  NOT VERIFIED: {clean(reason)}",
                "Its content is not shown: do not use it; ask the consultant to send it again.",
            ),
        )
    ]


def as_text(sections: Iterable[Section]) -> str:
    out: list[str] = []
    for section in sections:
        out.append(f"{section.heading}:" if section.heading != "Report" else "Consult report")
        out.extend(f"  {line}" for line in section.lines)
        out.append("")
    return "\n".join(out)


_STYLE = (
    "body{font-family:sans-serif;max-width:48em;margin:2em auto;line-height:1.4}"
    "h1{font-size:1.3em}h2{font-size:1.05em;margin-bottom:.2em}"
    "p{margin:.1em 0;white-space:pre-wrap}.warn{color:#b00;font-weight:bold}"
)


def as_html(sections: Iterable[Section], *, title: str = "Consult report") -> str:
    """A self-contained page (no scripts, no external resources); every text escaped."""
    body: list[str] = []
    for section in sections:
        heading = "h1" if section.heading == "Report" else "h2"
        text = title if section.heading == "Report" else section.heading
        body.append(f"<{heading}>{html.escape(text)}</{heading}>")
        for line in section.lines:
            warn = (
                ' class="warn"'
                if line.startswith(("Signature:  NOT VERIFIED", "Addendum signature:  NOT"))
                or line == CRITICAL_LINE
                else ""
            )
            body.append(f"<p{warn}>{html.escape(line)}</p>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'\">"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def addendum_section(addendum: Addendum) -> Section:
    """One verified addendum, under the report it amends (numbered, signed, dated)."""
    author = clean(addendum.author_name) or "(no name given)"
    return Section(
        f"Addendum {addendum.number}",
        (
            f"Author:     {author} (node {addendum.author.short()})",
            "Signature:  verified (signed by the report's author, amends this report)",
            f"Signed at:  {_stamp(addendum.at)}",
            *clean(addendum.text).splitlines(),
        ),
    )


def bad_addendum_section(number: int, reason: str) -> Section:
    return Section(
        f"Addendum {number}",
        (f"Addendum signature:  NOT VERIFIED: {clean(reason)}", "Its content is not shown."),
    )
