"""The viewer's overlay: what every PACS viewer prints around the image.

Study and slice facts above the image, the view (window/level, zoom, the value
under the cursor) below it, and the patient-orientation letters on its four
edges. It lives in its own widgets, not in the image renderer: moving the
pointer changes the value shown here without redrawing the picture.

Everything here is computed by pure functions (tested on their own); the widgets
only lay the text out. The DICOM text comes from the files, so from the peer
that sent them: it goes through :mod:`tui.safe_text` and is never markup. On a
consultant's node these are the de-identified values the store holds.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, OverflowMethod, RenderResult
from rich.measure import Measurement
from rich.segment import Segment
from rich.style import Style
from rich.table import Table
from rich.text import Text
from textual.geometry import Region
from textual.strip import Strip
from textual.widgets import Static

from tui import imaging, safe_text
from tui.facade import Frame, SeriesInfo, StudyInfo
from tui.imaging import Point, Window
from tui.widgets.kept import kept_lines

# A component of a direction counts for a letter when it is at least this large: 0.1 is
# about 6 degrees, so an oblique plane gets a second (and third) letter, noise does not.
OBLIQUE_THRESHOLD = 0.1
MAX_LETTERS = 3
# Patient axes (DICOM LPS): +x towards the patient's left, +y posterior, +z superior.
_AXIS_LETTERS = (("R", "L"), ("A", "P"), ("I", "S"))
TEXT_CHARS = 40  # one DICOM field on the overlay
OVERLAY_STYLE = "#ffff87"


@dataclass(frozen=True)
class Markers:
    """The orientation letters on each edge of the image."""

    top: str
    bottom: str
    left: str
    right: str


def direction_letters(vector: Sequence[float]) -> str:
    """``L``, ``LP``, ``LPS``…: the patient directions a unit vector points to, largest
    component first (DICOM PS3.3 C.7.6.1.1.1)."""
    order = sorted(range(3), key=lambda axis: -abs(vector[axis]))
    letters = [
        _AXIS_LETTERS[axis][1 if vector[axis] > 0 else 0]
        for axis in order
        if abs(vector[axis]) >= OBLIQUE_THRESHOLD
    ]
    return "".join(letters[:MAX_LETTERS])


def orientation_markers(orientation: Sequence[float] | None) -> Markers | None:
    """The edge letters of an image from its ImageOrientationPatient (row direction, then
    column direction): the right edge is where the rows run to, the bottom edge where the
    columns run to. None when the value is missing or not two unit-ish vectors (it comes
    from the sender's file: anything can be in it)."""
    if orientation is None or len(orientation) != 6:
        return None
    try:
        values = [float(v) for v in orientation]
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in values):
        return None
    row, col = values[:3], values[3:]
    if not (0.5 < math.hypot(*row) < 1.5 and 0.5 < math.hypot(*col) < 1.5):
        return None
    right, bottom = direction_letters(row), direction_letters(col)
    left = direction_letters([-v for v in row])
    top = direction_letters([-v for v in col])
    if not (right and bottom and left and top):
        return None
    return Markers(top, bottom, left, right)


def slice_location(frame: Frame) -> float | None:
    """SliceLocation when the file has it, else the position of the slice along its normal
    (ImagePositionPatient projected on row x column), as viewers show it."""
    if frame.slice_location is not None and math.isfinite(frame.slice_location):
        return frame.slice_location
    if frame.origin is None or frame.orientation is None or len(frame.orientation) != 6:
        return None
    rx, ry, rz, cx, cy, cz = frame.orientation
    normal = (ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx)
    value = sum(n * o for n, o in zip(normal, frame.origin, strict=True))
    return value if math.isfinite(value) else None


def pixel_value(frame: Frame, point: Point) -> float | None:
    """The modality value (HU on CT) of the pixel under an image point, None off the image."""
    if not safe_text.finite([point]):
        return None
    col, row = math.floor(point[0] + 0.5), math.floor(point[1] + 0.5)
    rows, cols = frame.pixels.shape[:2]
    if not (0 <= row < rows and 0 <= col < cols):
        return None
    value = float(frame.pixels[row, col]) * frame.slope + frame.intercept
    return value if math.isfinite(value) else None


def age_sex(age: str, sex: str) -> str:
    """``67Y F`` from PatientAge ``067Y`` and PatientSex, as the store holds them."""
    age = safe_text.plain(age, 8).strip()
    if len(age) == 4 and age[:3].isdigit() and age[3] in "DWMY":
        age = f"{int(age[:3])}{age[3]}"
    return " ".join(p for p in (age, safe_text.plain(sex, 3).strip()) if p)


def study_date(value: str) -> str:
    """``2026-01-01`` from a DICOM DA ``20260101`` (anything else as written)."""
    value = safe_text.plain(value, 16).strip()
    if len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value


def _mm(value: float | None) -> str:
    return f"{value:.1f} mm" if value is not None and math.isfinite(value) else ""


@dataclass(frozen=True)
class OverlayFacts:
    """What the overlay shows for one slice, gathered by the viewer."""

    study: StudyInfo
    series: SeriesInfo | None
    position: str  # "Im 3/12  Fr 1/3"
    window: Window
    zoom: float
    invert: bool = False
    frame: Frame | None = None
    cursor: Point | None = None  # the pointer or the keyboard cursor, image pixels
    notes: tuple[str, ...] = ()  # tool, presenting/following, the last message


def study_text(facts: OverlayFacts) -> str:
    """Top left: the (pseudonymised) patient, age/sex, accession, date, study."""
    s = facts.study
    parts = [
        safe_text.plain(s.patient, TEXT_CHARS),
        age_sex(s.patient_age, s.patient_sex),
        f"Acc {safe_text.plain(s.accession, TEXT_CHARS)}" if s.accession.strip() else "",
        study_date(s.date),
        safe_text.plain(s.description, TEXT_CHARS),
    ]
    return "  ".join(p for p in parts if p)


def series_text(facts: OverlayFacts) -> str:
    """Top right: series number and description, image number, slice location/thickness."""
    if facts.series is None:
        return "no series in this study"
    se = facts.series
    head = f"Se {se.number} {safe_text.plain(se.description, TEXT_CHARS)}".strip()
    parts = [head, facts.position]
    frame = facts.frame
    if frame is not None:
        location = _mm(slice_location(frame))
        parts.append(f"SL {location}" if location else "")
        thickness = _mm(frame.slice_thickness)
        parts.append(f"ST {thickness}" if thickness else "")
    return "  ".join(p for p in parts if p)


def view_text(facts: OverlayFacts) -> str:
    """Bottom left: window/level, inversion, zoom."""
    w = facts.window
    return (
        f"W {w.width:.0f} L {w.center:.0f}{'  INV' if facts.invert else ''}  zoom {facts.zoom:.2f}"
    )


def cursor_text(facts: OverlayFacts) -> str:
    """Bottom right: the value under the cursor (HU on CT) and where it is, in mm."""
    frame, point = facts.frame, facts.cursor
    if frame is None or point is None:
        return ""
    value = pixel_value(frame, point)
    if value is None:
        return ""
    modality = facts.series.modality if facts.series is not None else ""
    unit = "HU" if modality.upper() == "CT" else "value"
    shown = f"{value:.0f}" if float(value).is_integer() or abs(value) >= 100 else f"{value:.2f}"
    pos = imaging.position_mm(point, frame.spacing, frame.origin, frame.orientation)
    where = "pos " + " ".join(f"{v:.1f}" for v in pos) + " mm"
    return f"{unit} {shown}  {where}"


def _bar(left: str, centre: str, right: str, wrap: bool) -> Table:
    """Left text, an orientation letter, right text; wrapped onto more lines, or one line
    cut with an ellipsis."""
    grid = Table.grid(expand=True, padding=(0, 1))
    grid.add_column(ratio=1, justify="left", no_wrap=not wrap)
    grid.add_column(justify="center", width=max(1, len(centre)))
    grid.add_column(ratio=1, justify="right", no_wrap=not wrap)
    overflow: OverflowMethod = "fold" if wrap else "ellipsis"
    grid.add_row(
        Text(left, style=OVERLAY_STYLE, end="", overflow=overflow),
        Text(centre, style="bold", end=""),
        Text(right, style=OVERLAY_STYLE, end="", overflow=overflow),
    )
    return grid


_BAR_STYLE = Style.parse(OVERLAY_STYLE)
_BOLD = Style.parse("bold")


@functools.lru_cache(maxsize=32)
def _columns(width: int, centre: str) -> tuple[int, int] | None:
    """The widths of the left and right text columns of the bar above the image at this
    width, as Rich lays out :func:`_bar` (None: not the five cells expected)."""
    console = Console(width=width, file=io.StringIO(), color_system=None)
    grid = Table.grid(expand=True)
    grid.add_row(_bar("", centre, "", wrap=True))
    lines = console.render_lines(grid, console.options.update_width(width), pad=False)
    line = lines[0] if len(lines) == 1 else []
    styles = [_BAR_STYLE, Style(), _BOLD, Style(), _BAR_STYLE]
    if (
        [segment.style for segment in line] != styles
        or [segment.text.strip() for segment in line] != ["", "", centre, "", ""]
        or any(not segment.text for segment in line)
        or sum(len(segment.text) for segment in line) != width
    ):
        return None
    return len(line[0].text), len(line[4].text)


def one_line_segments(left: str, centre: str, right: str, width: int) -> list[Segment] | None:
    """The bar above the image as Rich draws :func:`_bar` (in a grid) when both texts fit
    their columns, without laying a table out; None when they may not (or hold anything
    but printable text): then only the table says how it wraps."""
    columns = _columns(width, centre)
    if (
        columns is None
        or not (left + centre + right).isprintable()
        or right != right.rstrip()  # Rich strips these when it justifies
        or centre != centre.strip()
    ):
        return None
    left_cells, right_cells = cell_len(left), cell_len(right)
    if left_cells > columns[0] or right_cells > columns[1] or len(centre) != cell_len(centre):
        return None
    return [
        Segment(left + " " * (columns[0] - left_cells), _BAR_STYLE),
        Segment(" ", Style()),
        Segment(centre or " ", _BOLD),
        Segment(" ", Style()),
        Segment(" " * (columns[1] - right_cells) + right, _BAR_STYLE),
        Segment.line(),
    ]


class _TopBar:
    """The bar above the image: one line drawn directly when it fits (a slice step changes
    its text, and a table costs more to lay out than the rest of the screen's update), else
    the grid (made when first needed)."""

    def __init__(self, left: str, centre: str, right: str, table: Callable[[], Table]) -> None:
        self.texts = (left, centre, right)
        self._table_of = table
        self._table: Table | None = None

    @property
    def table(self) -> Table:
        if self._table is None:
            self._table = self._table_of()
        return self._table

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        segments = one_line_segments(*self.texts, options.max_width)
        if segments is None:
            yield self.table
        else:
            yield from segments

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement.get(console, options, self.table)


class OverlayBar(Static):
    """Overlay text above or below the image (the text is never markup).

    Above: as many lines as the study and slice facts need (they change with the slice).
    Below: always two lines, the view and cursor line and a line of notes, each cut to
    the width: the pointer moving must never change the image's height."""

    DEFAULT_CSS = """
    OverlayBar { height: auto; background: #000000; }
    OverlayBar.-fixed { height: 2; }
    """

    text = ""  # what it shows, as one plain string (tests and screen readers)
    _shown: tuple[object, ...] | None = None
    _direct: tuple[str, str, str] | None = None  # the texts of a _TopBar shown, if one is
    _line: tuple[object, Strip] | None = None  # the line drawn directly, and what for

    def show(self, left: str, centre: str, right: str, notes: tuple[str, ...] = ()) -> None:
        # The same text again (every slice step shows the same view line) changes nothing:
        # an update would lay the screen out again and repaint the bar.
        if self._shown == (left, centre, right, notes):
            return
        self._shown = (left, centre, right, notes)
        self.text = "\n".join(["  ".join((left, centre, right)), *notes])
        fixed = self.has_class("-fixed")

        def table() -> Table:
            grid = Table.grid(expand=True)
            grid.add_row(_bar(left, centre, right, wrap=not fixed))
            note = "  ·  ".join(safe_text.plain(n) for n in notes)
            if note or fixed:
                overflow: OverflowMethod = "ellipsis" if fixed else "fold"
                grid.add_row(
                    Text(note, style=OVERLAY_STYLE, end="", no_wrap=fixed, overflow=overflow)
                )
            return grid

        self._direct = None
        if fixed:  # its height is fixed: laying the screen out again would change nothing
            self.update(table(), layout=False)
        elif notes:
            self.update(table())
        else:
            # One line that stays one line: no layout (it costs more than drawing the bar).
            fits = one_line_segments(left, centre, right, self.content_size.width) is not None
            self._direct = (left, centre, right)
            self.update(
                _TopBar(left, centre, right, table), layout=not (fits and self.size.height == 1)
            )

    def render_lines(self, crop: Region) -> list[Strip]:
        return kept_lines(self, crop, super().render_lines)  # tui.widgets.kept

    def render_line(self, y: int) -> Strip:
        """A bar above the image that fits its one line is drawn straight from its segments,
        each over the widget's style: what Static's way through Rich (a console render, the
        style applied, the lines split and cropped) makes of it, at a fraction of the cost
        (its text changes with every slice step). Anything else goes that way."""
        line = self._direct_line() if y == 0 else None
        return line if line is not None else super().render_line(y)

    def _direct_line(self) -> Strip | None:
        if self._direct is None:
            return None
        width = self.size.width
        base = self.visual_style.rich_style
        key = (self._direct, width, base)
        if self._line is None or self._line[0] != key:
            segments = one_line_segments(*self._direct, width)
            if segments is None:
                return None
            line = [Segment(s.text, base + s.style) for s in segments if s.text != "\n"]
            self._line = (key, Strip(line, width))
        return self._line[1]


class EdgeMarker(Static):
    """The orientation letter(s) on the left or right edge of the image."""

    DEFAULT_CSS = """
    EdgeMarker { width: auto; min-width: 1; height: 1fr; content-align: center middle;
                 background: #000000; text-style: bold; }
    """

    text = ""
    _shown: str | None = None

    def render_lines(self, crop: Region) -> list[Strip]:
        return kept_lines(self, crop, super().render_lines)  # tui.widgets.kept

    def show(self, letters: str) -> None:
        if letters == self._shown:  # as above: no layout, no repaint of the whole edge
            return
        self._shown = letters
        self.text = letters
        self.update(Text(letters, end=""))


def overlay_lines(facts: OverlayFacts) -> tuple[str, str, str, str]:
    """The four texts of the overlay: top left, top right, bottom left, bottom right."""
    return study_text(facts), series_text(facts), view_text(facts), cursor_text(facts)
