"""The viewer: series list, the image, and (in a consult) the live panel."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Footer, Header, OptionList

from consult import measure
from consult.errors import ConsultError
from consult.presence import Cursor
from consult.shared import AnnotationKind
from tui import imaging
from tui.facade import Frame, InstanceRef, NodeFacade, SeriesInfo, StudyInfo
from tui.imaging import Point
from tui.screens.prompt import TextPrompt
from tui.widgets.consult_panel import ConsultPanel
from tui.widgets.image_view import ImageView, Mark

CURSOR_PERIOD = 0.05  # own cursor goes out at most 20 times a second
CINE_PERIOD = 0.1
LOADING_POLL = 0.5
FRAME_CACHE = 64
TOOLS = {
    "point": AnnotationKind.POINT,
    "arrow": AnnotationKind.ARROW,
    "length": AnnotationKind.LENGTH,
    "angle": AnnotationKind.ANGLE,
    "ellipse": AnnotationKind.ELLIPSE,
}
POINTS_NEEDED = {"point": 1, "arrow": 2, "length": 2, "angle": 3, "ellipse": 2}


class ViewerScreen(Screen[None]):
    BINDINGS = [  # noqa: RUF012 - Textual's API
        Binding("j,down", "step(1)", "next slice", show=False),
        Binding("k,up", "step(-1)", "prev slice", show=False),
        Binding("pagedown", "step(10)", "+10", show=False),
        Binding("pageup", "step(-10)", "-10", show=False),
        Binding("home", "goto(0)", "first", show=False),
        Binding("end", "goto(-1)", "last", show=False),
        *[Binding(str(i + 1), f"preset({i})", name, show=False)
          for i, (name, _) in enumerate(imaging.PRESETS)],
        Binding("i", "invert", "invert"),
        Binding("plus,equals_sign", "zoom(1.25)", "zoom in", show=False),
        Binding("minus", "zoom(0.8)", "zoom out", show=False),
        Binding("H", "pan(-8, 0)", "pan left", show=False),
        Binding("L", "pan(8, 0)", "pan right", show=False),
        Binding("K", "pan(0, -8)", "pan up", show=False),
        Binding("J", "pan(0, 8)", "pan down", show=False),
        Binding("r", "reset", "reset"),
        Binding("c", "cine", "cine"),
        Binding("n", "series(1)", "next series", show=False),
        Binding("N", "series(-1)", "prev series", show=False),
        Binding("P", "tool('point')", "point", show=False),
        Binding("A", "tool('arrow')", "arrow", show=False),
        Binding("M", "tool('length')", "length", show=False),
        Binding("G", "tool('angle')", "angle", show=False),
        Binding("E", "tool('ellipse')", "ellipse", show=False),
        Binding("escape", "tool('')", "no tool", show=False),
        Binding("left_square_bracket", "select(-1)", "prev mark", show=False),
        Binding("right_square_bracket", "select(1)", "next mark", show=False),
        Binding("x", "remove_mark", "remove mark", show=False),
        Binding("f9", "finalise", "finalise", show=False),
        Binding("q", "close", "close"),
    ]  # fmt: skip

    def __init__(self, node: NodeFacade, study: StudyInfo, live: bool = False) -> None:
        super().__init__()
        self.node = node
        self.study = study
        self.series_list: list[SeriesInfo] = node.series(study.study_uid)
        self.series_index = 0
        self.instances: list[InstanceRef] = []
        self.index = 0
        self.session = node.open_session(study.study_uid) if live else None
        self.tool = ""
        self.pending: list[Point] = []
        self.pointer: Point | None = None
        self._sent_cursor: Point | None = None
        self._cache: OrderedDict[tuple[str, int], Frame] = OrderedDict()
        self._window_set = False
        self._cine: Timer | None = None
        self._unsubscribe: Any = None
        self.message = ""

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            yield OptionList(
                *[f"{s.number:>3} {s.modality} {s.description} ({s.instance_count})"
                  for s in self.series_list],
                id="series",
            )  # fmt: skip
            yield ImageView(id="image")
            if self.session is not None:
                yield ConsultPanel(self.session)
        yield Footer()

    @property
    def view(self) -> ImageView:
        return self.query_one(ImageView)

    def on_mount(self) -> None:
        self.query_one("#series", OptionList).styles.width = 28
        self.view.focus()
        self.open_series(0)
        self.set_interval(CURSOR_PERIOD, self._flush_cursor)
        self.set_interval(LOADING_POLL, self._poll_loading)
        if self.session is not None:
            self._unsubscribe = self.session.subscribe(self._session_changed)

    def on_unmount(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()

    # slices
    def open_series(self, index: int) -> None:
        if not self.series_list:
            self.update_view()
            return
        self.series_index = index % len(self.series_list)
        self.instances = self.node.instances(self.series_list[self.series_index].series_uid)
        self.index = 0
        self.load_current()

    @property
    def current(self) -> InstanceRef | None:
        return self.instances[self.index] if self.instances else None

    def load_current(self) -> None:
        ref = self.current
        if ref is None:
            self.update_view()
            return
        cached = self._cache.get((ref.sop_uid, 0))
        if cached is not None:
            self._show(ref.sop_uid, cached)
            return
        self.run_worker(self._load(ref.sop_uid), exclusive=True, group="load")

    async def _load(self, sop_uid: str) -> None:
        frame = await self.app.run_blocking(self.node.load_frame, sop_uid, 0)  # type: ignore[attr-defined]
        if frame is None:
            self.node.request_first(sop_uid)
        else:
            self._cache[(sop_uid, 0)] = frame
            while len(self._cache) > FRAME_CACHE:
                self._cache.popitem(last=False)
        if self.current is not None and self.current.sop_uid == sop_uid:
            self._show(sop_uid, frame)

    def _show(self, sop_uid: str, frame: Frame | None) -> None:
        if frame is not None and not self._window_set:
            self.view.window = frame.window or imaging.window_from_data(frame.modality())
            self._window_set = True
        self.view.frame = frame
        self.view.show(frame)
        self.update_view()

    def _poll_loading(self) -> None:
        if self.view.waiting and self.current is not None:
            self.load_current()

    # drawing
    def update_view(self) -> None:
        view = self.view
        view.overlay_lines = self._overlay()
        view.marks = self._marks()
        view.tool_active = bool(self.tool)
        view.redraw()

    def _overlay(self) -> tuple[str, ...]:
        if not self.series_list:
            return ("no series in this study",)
        s = self.series_list[self.series_index]
        w = self.view.window
        lines = [
            f"{self.study.patient}  {self.study.description}",
            f"Se {s.number} {s.description}  Im {self.index + 1}/{len(self.instances)}",
            f"W {w.width:.0f} L {w.center:.0f}{'  INV' if self.view.invert else ''}"
            f"  zoom {self.view.zoom:.2f}",
        ]
        frame = self.view.frame
        if frame is not None and self.pointer is not None:
            pos = imaging.position_mm(self.pointer, frame.spacing, frame.origin, frame.orientation)
            lines.append("pos " + " ".join(f"{v:.1f}" for v in pos) + " mm")
        if self.tool:
            lines.append(f"tool: {self.tool} ({len(self.pending)}/{POINTS_NEEDED[self.tool]})")
        if self.message:
            lines.append(self.message)
        return tuple(lines)

    def _marks(self) -> tuple[Mark, ...]:
        ref = self.current
        if self.session is None or ref is None:
            return tuple(Mark("point", (p,), "#ffffff") for p in self.pending)
        colours = {p.node: p.colour for p in self.session.participants()}
        selected = self.query_one(ConsultPanel).selected
        marks = [
            Mark(
                a.kind.value,
                a.points,
                "#ffffff" if a.id == selected else colours.get(a.author, "#ffff00"),
                a.text,
            )
            for a in self.session.annotations()
            if a.sop_instance_uid == ref.sop_uid and a.frame == 0
        ]
        for p in self.session.participants():
            cursor = p.cursor
            if (
                p.node != self.session.local_node
                and cursor
                and cursor.sop_instance_uid == ref.sop_uid
            ):
                marks.append(Mark("cursor", ((cursor.x, cursor.y),), p.colour, p.name))
        marks.extend(Mark("point", (p,), "#ffffff") for p in self.pending)
        return tuple(marks)

    def _session_changed(self) -> None:
        self.query_one(ConsultPanel).update_from_session()
        self.update_view()

    # pointer and tools
    @on(ImageView.Step)
    def _on_step(self, event: ImageView.Step) -> None:
        self.action_step(event.delta)

    @on(ImageView.Pointer)
    def _on_pointer(self, event: ImageView.Pointer) -> None:
        self.pointer = event.point

    @on(ImageView.WindowDragged)
    def _on_drag(self, event: ImageView.WindowDragged) -> None:
        self.view.window = event.window
        self.update_view()

    @on(ImageView.Clicked)
    def _on_image_click(self, event: ImageView.Clicked) -> None:
        self.add_point(event.point)

    def _flush_cursor(self) -> None:
        ref = self.current
        if self.session is None or ref is None or self.pointer == self._sent_cursor:
            return
        self._sent_cursor = self.pointer
        cursor = Cursor(ref.sop_uid, 0, *self.pointer) if self.pointer else None
        self.session.move_cursor(cursor)

    def add_point(self, point: Point) -> None:
        if not self.tool:
            return
        self.pending.append(point)
        if len(self.pending) >= POINTS_NEEDED[self.tool]:
            points, tool = tuple(self.pending), self.tool
            self.pending = []
            if tool == "arrow":
                self.app.push_screen(
                    TextPrompt("Arrow text"), lambda text: self._commit(tool, points, text or "")
                )
            else:
                self._commit(tool, points, "")
        self.update_view()

    def _commit(self, tool: str, points: tuple[Point, ...], text: str) -> None:
        ref, frame = self.current, self.view.frame
        if self.session is None or ref is None or frame is None:
            self.message = "annotations need a live consult (open from the worklist)"
            self.update_view()
            return
        values: dict[str, float] = {}
        try:
            spacing = measure.PixelSpacing(*frame.spacing)
            if tool == "length":
                values["length_mm"] = measure.length_mm(points[0], points[1], spacing)
            elif tool == "angle":
                values["angle_deg"] = measure.angle_degrees(
                    points[0], points[1], points[2], spacing
                )
            elif tool == "ellipse":
                c, edge = points
                rx, ry = abs(edge[0] - c[0]), abs(edge[1] - c[1])
                points = (c, (rx, ry))
                stats = measure.ellipse_roi_stats(
                    frame.pixels, c, rx, ry, spacing, slope=frame.slope, intercept=frame.intercept
                )
                values.update(stats.to_wire())
            self.session.add_annotation(
                TOOLS[tool], ref.sop_uid, 0, points, text=text, values=values
            )
            self.message = ""
        except ConsultError as exc:
            self.message = str(exc)
        self.update_view()

    # actions
    def action_step(self, delta: int) -> None:
        if self.instances:
            self.index = max(0, min(len(self.instances) - 1, self.index + delta))
            self.load_current()

    def action_goto(self, index: int) -> None:
        if self.instances:
            self.index = index % len(self.instances)
            self.load_current()

    def action_preset(self, i: int) -> None:
        name, window = imaging.PRESETS[i]
        self.view.window = window
        self.message = f"preset {i + 1}: {name}"
        self.update_view()

    def action_invert(self) -> None:
        self.view.invert = not self.view.invert
        self.update_view()

    def action_zoom(self, factor: float) -> None:
        geom = self.view.geometry()
        if geom is not None:
            self.view.zoom = geom.zoomed(factor).zoom
        self.update_view()

    def action_pan(self, dx: float, dy: float) -> None:
        geom = self.view.geometry()
        if geom is not None:
            self.view.center = geom.panned(dx, dy).view_center
        self.update_view()

    def action_reset(self) -> None:
        frame = self.view.frame
        self.view.zoom, self.view.center, self.view.invert = 1.0, None, False
        if frame is not None:
            self.view.window = frame.window or imaging.window_from_data(frame.modality())
        self.message = ""
        self.update_view()

    def action_cine(self) -> None:
        if self._cine is None:
            self._cine = self.set_interval(CINE_PERIOD, lambda: self.action_goto(self.index + 1))
        else:
            self._cine.stop()
            self._cine = None

    def action_series(self, step: int) -> None:
        self.open_series(self.series_index + step)

    @on(OptionList.OptionSelected, "#series")
    def _series_chosen(self, event: OptionList.OptionSelected) -> None:
        self.open_series(event.option_index)
        self.view.focus()

    def action_tool(self, name: str) -> None:
        self.tool, self.pending = name, []
        self.update_view()

    def action_select(self, step: int) -> None:
        if self.session is not None:
            self.query_one(ConsultPanel).select(step)
            self.update_view()

    def action_remove_mark(self) -> None:
        if self.session is None:
            return
        selected = self.query_one(ConsultPanel).selected
        if selected:
            try:
                self.session.remove_annotation(selected)
            except ConsultError as exc:
                self.message = str(exc)
                self.update_view()

    def action_finalise(self) -> None:
        if self.session is not None and not self.session.finalised():
            self.session.finalise()

    def action_close(self) -> None:
        self.app.pop_screen()
