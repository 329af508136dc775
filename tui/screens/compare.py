"""Current and prior side by side (issue 16): linked by slice location, one window.

Opened from Studies with ``p`` on a study that has an earlier one of the same patient
(on a consultant's node: the same pseudonymous patient, which a follow-up from the same
hospital keeps). Stepping moves the current study; the prior follows to the slice at the
same location (``tui.linking``), ``o`` takes the two slices on screen as the same level
(when the patient lay elsewhere on the table), ``t`` shows one study full width and
flips between them, ``v`` opens the prior's report when this node holds one. Thin:
frames come from the facade, drawing from :class:`ImageView`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Static

from tui import imaging, safe_text
from tui.facade import Frame, InstanceRef, NodeFacade, SeriesInfo, StudyInfo
from tui.linking import linked_index
from tui.screens.report import ReportScreen
from tui.widgets.footer import Footer
from tui.widgets.image_view import ImageView

SIDE_BY_SIDE_MIN_WIDTH = 100  # narrower: one study at a time, t flips


def priors_of(studies: list[StudyInfo], study: StudyInfo) -> list[StudyInfo]:
    """Earlier studies of the same patient label, most recent first."""
    return sorted(
        (
            s
            for s in studies
            if s.patient == study.patient
            and s.study_uid != study.study_uid
            and s.date <= study.date
            and s.patient != "(arriving)"
        ),
        key=lambda s: s.date,
        reverse=True,
    )


def matching_series(series: list[SeriesInfo], like: SeriesInfo | None) -> int:
    """The prior's series to show beside ``like``: same modality and description, else
    same modality, else the first."""
    if like is None:
        return 0
    ranked = sorted(
        range(len(series)),
        key=lambda i: (
            series[i].modality != like.modality,
            series[i].description != like.description,
            i,
        ),
    )
    return ranked[0] if ranked else 0


@dataclass
class Side:
    """One study of the pair: its series, slices and the slice on screen."""

    study: StudyInfo
    series: list[SeriesInfo] = field(default_factory=list)
    series_index: int = 0
    slices: list[InstanceRef] = field(default_factory=list)
    index: int = 0
    frame: Frame | None = None

    def locations(self) -> list[float | None]:
        return [ref.location for ref in self.slices]


class CompareScreen(Screen[None]):
    BINDINGS = [  # noqa: RUF012 - Textual's API
        Binding("down,j", "step(1)", "next", show=False),
        Binding("up,k", "step(-1)", "previous", show=False),
        Binding("pagedown", "step(10)", "+10", show=False),
        Binding("pageup", "step(-10)", "-10", show=False),
        Binding("s", "series", "series"),
        *(Binding(str(i + 1), f"preset({i})", "window", show=False) for i in range(6)),
        Binding("o", "sync", "same level"),
        Binding("t", "flip", "current/prior"),
        Binding("v", "prior_report", "prior's report"),
        Binding("escape,q", "close", "back"),
    ]
    DEFAULT_CSS = """
    CompareScreen .pane { width: 1fr; }
    CompareScreen .label { height: 2; padding: 0 1; }
    CompareScreen ImageView { height: 1fr; }
    CompareScreen .hidden { display: none; }
    """

    def __init__(self, node: NodeFacade, current: StudyInfo, prior: StudyInfo) -> None:
        super().__init__()
        self.node = node
        self.current = Side(current)
        self.prior = Side(prior)
        self.level_offset = 0.0  # mm added to the current slice's location to find the prior's
        self.window: imaging.Window | None = None
        self.single: str | None = None  # "current" | "prior" when one is shown alone

    def compose(self) -> ComposeResult:
        with Horizontal():
            for name in ("current", "prior"):
                with Vertical(id=f"pane-{name}", classes="pane"):
                    yield Static(id=f"label-{name}", classes="label")
                    yield ImageView(id=f"view-{name}")
        yield Static(id="compare-status")
        yield Footer()

    def _view(self, name: str) -> ImageView:
        return self.query_one(f"#view-{name}", ImageView)

    def on_mount(self) -> None:
        for side in (self.current, self.prior):
            side.series = self.node.series(side.study.study_uid)
        self._open_current(0)
        if self.size.width and self.size.width < SIDE_BY_SIDE_MIN_WIDTH:
            self.single = "current"
        self._layout()

    def _open_current(self, series_index: int) -> None:
        self._open(self.current, series_index)
        like = self.current.series[self.current.series_index] if self.current.series else None
        self._open(self.prior, matching_series(self.prior.series, like))
        self.current.index = len(self.current.slices) // 2
        self._follow()
        self._load_both()

    def _open(self, side: Side, series_index: int) -> None:
        if not side.series:
            side.slices = []
            return
        side.series_index = series_index % len(side.series)
        side.slices = self.node.instances(side.series[side.series_index].series_uid)
        side.index = 0

    def _follow(self) -> None:
        """Move the prior to the current slice's level; it stays put when there is none."""
        found = linked_index(
            self.current.locations(), self.prior.locations(), self.current.index, self.level_offset
        )
        if found is not None:
            self.prior.index = found

    def _load_both(self) -> None:
        for name, side in (("current", self.current), ("prior", self.prior)):
            self.run_worker(self._load(name, side), group=f"load-{name}", exclusive=True)
        self._labels()

    async def _load(self, name: str, side: Side) -> None:
        if not side.slices:
            self._view(name).show(None)
            return
        ref = side.slices[side.index]
        frame = await self.app.run_blocking(self.node.load_frame, ref.sop_uid, 0)  # type: ignore[attr-defined]
        if not self.is_attached or ref is not side.slices[side.index]:
            return  # closed, or stepped on meanwhile: a newer load draws
        if frame is None:
            self.node.request_first(ref.sop_uid)
        side.frame = frame
        view = self._view(name)
        if frame is not None and self.window is None:
            series = side.series[side.series_index]
            self.window = imaging.default_window(
                frame.window, series.modality, series.description, frame.modality()
            )
        if self.window is not None:
            view.window = self.window  # one window for both: densities compare
        view.show(frame)
        self._labels()

    def _labels(self) -> None:
        for name, side in (("current", self.current), ("prior", self.prior)):
            series = side.series[side.series_index] if side.series else None
            where = side.slices[side.index].location if side.slices else None
            text = (
                f"{name.upper()}  {safe_text.plain(side.study.date, 16)}  "
                f"{safe_text.plain(side.study.description, 40)}\n"
                + (
                    f"{safe_text.plain(series.modality, 8)} "
                    f"{safe_text.plain(series.description, 30)}  "
                    f"Im {side.index + 1}/{len(side.slices)}"
                    + ("" if where is None else f"  {where:.1f} mm")
                    if series is not None
                    else "no series"
                )
            )
            self.query_one(f"#label-{name}", Static).update(safe_text.safe(text))
        window = self.window
        status = (
            f"W {window.width:.0f} L {window.center:.0f}" if window is not None else "W -  L -"
        ) + (f"   same level set: {self.level_offset:+.1f} mm" if self.level_offset else "")
        if not any(ref.location is not None for ref in self.prior.slices):
            status += "   the prior has no slice positions: it is not linked"
        self.query_one("#compare-status", Static).update(safe_text.safe(status))

    def _layout(self) -> None:
        for name in ("current", "prior"):
            pane = self.query_one(f"#pane-{name}")
            pane.set_class(self.single is not None and self.single != name, "hidden")

    # actions
    def action_step(self, delta: int) -> None:
        if not self.current.slices:
            return
        self.current.index = max(0, min(len(self.current.slices) - 1, self.current.index + delta))
        self._follow()
        self._load_both()

    def action_series(self) -> None:
        if self.current.series:
            self._open_current(self.current.series_index + 1)

    def action_preset(self, index: int) -> None:
        self.window = imaging.PRESETS[index % len(imaging.PRESETS)][1]
        for name in ("current", "prior"):
            view = self._view(name)
            view.window = self.window
            view.redraw()
        self._labels()

    def action_sync(self) -> None:
        """The two slices on screen show the same level: remember the offset."""
        here = self.current.slices[self.current.index].location if self.current.slices else None
        there = self.prior.slices[self.prior.index].location if self.prior.slices else None
        if here is None or there is None:
            self.notify("these slices have no position: they cannot be linked", timeout=5)
            return
        self.level_offset = there - here
        self.notify(f"linked at this level ({self.level_offset:+.1f} mm)", timeout=4)
        self._labels()

    def action_flip(self) -> None:
        self.single = {None: "prior", "prior": "current", "current": "prior"}[self.single]
        if self.size.width >= SIDE_BY_SIDE_MIN_WIDTH and self.single == "current":
            self.single = None  # wide enough: back to side by side after a flip each way
        self._layout()

    def action_prior_report(self) -> None:
        for item in self.node.consults():
            if item.study_uid == self.prior.study.study_uid:
                sections = self.node.report(item.consult_id)
                if sections is not None:
                    self.app.push_screen(ReportScreen(item.consult_id, sections))
                    return
        self.notify("no report on this node for the prior study", timeout=5)

    def action_close(self) -> None:
        self.app.pop_screen()
