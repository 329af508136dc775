"""The viewer: series list, the image, and (in a consult) the live panel.

Why one module: One screen: the image, its tools and the live panel react to the same
keys and the same slice; the drawing is in tui/widgets and the maths in tui/imaging.
"""

from __future__ import annotations

import gc
import time
from collections import Counter, OrderedDict
from typing import Any

from textual import events, on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.geometry import Region
from textual.screen import Screen
from textual.strip import Strip
from textual.timer import Timer
from textual.widget import Widget
from textual.widgets import Input, OptionList, Static, TextArea
from textual.worker import Worker, WorkType

from consult import measure, report_draft
from consult.errors import ConsultError
from consult.presence import Cursor, Participant, Viewport
from consult.shared import Annotation, AnnotationKind
from tui import hittest, imaging, kbcursor, safe_text
from tui.facade import ActionError, Frame, InstanceRef, NodeFacade, SeriesInfo, StudyInfo
from tui.imaging import Point
from tui.screens.prompt import TextPrompt
from tui.screens.sign_preview import SignPreview
from tui.widgets.consult_panel import ConsultPanel, describe, mark_label
from tui.widgets.footer import Footer
from tui.widgets.image_view import ImageView, Mark
from tui.widgets.kept import KeptHeader, KeptHorizontal, KeptStatic, KeptVertical, kept_lines
from tui.widgets.overlay import (
    EdgeMarker,
    OverlayBar,
    OverlayFacts,
    orientation_markers,
    overlay_lines,
)

CURSOR_PERIOD = 0.05  # own cursor goes out at most 20 times a second
CINE_PERIOD = 0.1
LOADING_POLL = 0.5
FRAME_CACHE = 64
READ_AHEAD = 8  # slices read in one go ahead of the one shown, the way the user is going
TRUST_REFRESH = 5.0  # seconds between reads of the peers' trust for the participant list
# Below this many columns the series list and the consult panel fold away (s and t, or r/c,
# bring them back) and the image takes the width they leave.
NARROW_COLUMNS = 120
TOOLS = {
    "point": AnnotationKind.POINT,
    "arrow": AnnotationKind.ARROW,
    "length": AnnotationKind.LENGTH,
    "angle": AnnotationKind.ANGLE,
    "ellipse": AnnotationKind.ELLIPSE,
}
POINTS_NEEDED = {"point": 1, "arrow": 2, "length": 2, "angle": 3, "ellipse": 2}
# The mode line: what the keys do now, by the id of the focused widget.
MODES = {
    "image": "VIEW   r report  c chat  t panel  s series  P/A/M/G/E tools  ? help",
    "report": "REPORT   ctrl+t template   F9 preview & sign   Esc back to the image",
    "chat-input": "CHAT   enter sends   Esc back to the image",
    "series": "SERIES   ↑/↓ enter picks a series   Esc back to the image",
}


class HeapFreeze:
    """While a viewer is open, the objects that were there before it (the app, Textual's CSS,
    the modules: some 230,000) stay out of the garbage collector's full passes (``gc.freeze``).

    A slice step makes short-lived objects (strips, segments, messages), and every few dozen
    steps that set off a full pass over the whole heap: 100 ms of CPU at once (a tenth of the
    app's CPU per key on average, and a burst a transfer on the same cores feels). Frozen
    objects are still freed by reference counting; only cycles among them wait for the
    viewer to close (then they are collected as before). Counted, for viewers open at once.
    """

    holders = 0

    @classmethod
    def hold(cls) -> None:
        if cls.holders == 0:
            gc.freeze()
        cls.holders += 1

    @classmethod
    def release(cls) -> None:
        cls.holders = max(0, cls.holders - 1)
        if cls.holders == 0:
            gc.unfreeze()


class ViewerScreen(Screen[None]):
    AUTO_FOCUS = "#image"  # not the first focusable widget: the series list may be folded away
    DEFAULT_CSS = """
    /* In the flow, not docked: docked to the bottom it sat under the Footer, unseen. */
    ViewerScreen #mode { height: 1; background: $accent; color: $text; }
    /* Always a border, so focus changes its colour and weight, never the image size. On a
       frame around the image, not the image: a plain ImageView hands the compositor its
       own lines (ImageView.render_lines). */
    ViewerScreen #image-frame { border: round $panel; width: 1fr; }
    ViewerScreen #image-frame:focus-within { border: heavy $accent; }
    ViewerScreen #series { border: round $panel; }
    ViewerScreen #series:focus { border: heavy $accent; }
    ViewerScreen #image-area { width: 1fr; }
    ViewerScreen.-narrow #series { display: none; }
    ViewerScreen.-narrow.-series #series { display: block; }
    ViewerScreen.-narrow ConsultPanel { display: none; width: 40; }
    ViewerScreen.-narrow.-panel ConsultPanel { display: block; }
    """
    BINDINGS = [  # noqa: RUF012 - Textual's API
        # With a tool: the arrows/hjkl move the keyboard cursor (shift: 8 steps), space places.
        # j/k first (priority: no trip down to the focused widget and back up, about a
        # sixth of a slice step's CPU); check_action hands them to a report or chat field.
        # The arrows stay ordinary: the series list moves its highlight with them.
        Binding("j", "key_move(0, 1)", "next slice", show=False, priority=True),
        Binding("k", "key_move(0, -1)", "prev slice", show=False, priority=True),
        Binding("down", "key_move(0, 1)", "next slice", show=False),
        Binding("up", "key_move(0, -1)", "prev slice", show=False),
        Binding("h,left", "key_move(-1, 0)", "cursor left", show=False),
        Binding("l,right", "key_move(1, 0)", "cursor right", show=False),
        Binding("space", "place", "place point", show=False),
        Binding("pagedown", "step(10)", "+10", show=False),
        Binding("pageup", "step(-10)", "-10", show=False),
        Binding("home", "goto(0)", "first", show=False),
        Binding("end", "goto(-1)", "last", show=False),
        *[Binding(str(i + 1), f"preset({i})", name, show=False)
          for i, (name, _) in enumerate(imaging.PRESETS)],
        Binding("i", "invert", "invert"),
        Binding("plus,equals_sign", "zoom(1.25)", "zoom in", show=False),
        Binding("minus", "zoom(0.8)", "zoom out", show=False),
        Binding("H,shift+left", "key_move(-1, 0, True)", "pan left", show=False),
        Binding("L,shift+right", "key_move(1, 0, True)", "pan right", show=False),
        Binding("K,shift+up", "key_move(0, -1, True)", "pan up", show=False),
        Binding("J,shift+down", "key_move(0, 1, True)", "pan down", show=False),
        Binding("r", "focus_text('report')", "report"),
        Binding("c", "focus_text('chat-input')", "chat"),
        Binding("t", "toggle_panel", "panel", show=False),
        Binding("s", "toggle_series", "series list", show=False),
        Binding("R", "reset", "reset", show=False),
        Binding("C", "cine", "cine", show=False),
        Binding("n", "series(1)", "next series", show=False),
        Binding("N", "series(-1)", "prev series", show=False),
        Binding("P", "tool('point')", "point", show=False),
        Binding("A", "tool('arrow')", "arrow", show=False),
        Binding("M", "tool('length')", "length", show=False),
        Binding("G", "tool('angle')", "angle", show=False),
        Binding("E", "tool('ellipse')", "ellipse", show=False),
        Binding("escape", "escape", "back to the image / no tool", show=False),
        Binding("left_square_bracket", "select(-1)", "prev mark", show=False),
        Binding("right_square_bracket", "select(1)", "next mark", show=False),
        Binding("x,delete", "remove_mark", "remove mark", show=False),
        Binding("p", "present", "present"),
        Binding("f", "follow", "follow"),
        Binding("f9", "finalise", "finalise", show=False),
        Binding("ctrl+t", "template", "report template", show=False),
        Binding("g", "propose_guest", "propose a guest", show=False),
        Binding("f8", "critical", "critical result", show=False),
        Binding("q", "close", "close"),
    ]  # fmt: skip

    def __init__(self, node: NodeFacade, study: StudyInfo, live: bool = False) -> None:
        super().__init__()
        self.node = node
        self.study = study
        self.series_list: list[SeriesInfo] = node.series(study.study_uid)
        self.series_index = 0
        self.instances: list[InstanceRef] = []
        # What j/k walk: (instance, frame), every frame of a multi-frame instance in turn.
        self.slices: list[tuple[InstanceRef, int]] = []
        self.index = 0
        self.session = node.open_session(study.study_uid) if live else None
        self.tool = ""
        self.pending: list[Point] = []
        self.pointer: Point | None = None
        self._sent_cursor: Point | None = None
        self._cache: OrderedDict[tuple[str, int], Frame] = OrderedDict()
        self._window_set = False
        # Per series (uid): the window and slice it was left at, restored on coming back.
        self._series_state: dict[str, tuple[imaging.Window, int]] = {}
        self.kb: Point | None = None  # the keyboard cursor, while a tool is active
        self._cine: Timer | None = None
        self._unsubscribe: Any = None
        self._sent_viewport: Viewport | None = None
        self._user_moved = False
        self.message = ""
        self._critical = False  # F8: the report to sign is a critical result
        self._trust: dict[str, str] = {}
        self._loading: Worker[None] | None = None
        self._trust_at = float("-inf")
        self._frozen = False  # holds HeapFreeze while mounted

    def compose(self) -> ComposeResult:
        yield KeptHeader()
        # Kept* (tui.widgets.kept): on a slice step only the image and the bar above it
        # change; the rest hands the compositor the lines it gave it before.
        with KeptHorizontal():
            yield OptionList(
                *[safe_text.line(f"{s.number:>3} {s.modality} {s.description} "
                                 f"({s.instance_count})") for s in self.series_list],
                id="series",
            )  # fmt: skip
            with KeptVertical(id="image-area"):
                yield OverlayBar(id="overlay-top")
                with KeptHorizontal(id="image-row"):
                    yield EdgeMarker(id="mark-left")
                    with KeptVertical(id="image-frame"):
                        yield ImageView(id="image")
                    yield EdgeMarker(id="mark-right")
                yield OverlayBar(id="overlay-bottom", classes="-fixed")
            if self.session is not None:
                yield ConsultPanel(self.session, self._trust_of)
        yield KeptStatic(MODES["image"], id="mode")
        yield Footer()

    def render_lines(self, crop: Region) -> list[Strip]:
        return kept_lines(self, crop, super().render_lines)  # tui.widgets.kept

    def _trust_of(self, node_id: str) -> str:
        """This node's trust in a participant's key, as the Peers screen shows it (read
        again every few seconds, not on every cursor move)."""
        now = time.monotonic()
        if now - self._trust_at > TRUST_REFRESH:
            self._trust = {p.node_id: p.trust for p in self.node.peers()}
            self._trust_at = now
        return self._trust.get(node_id, "")

    def _label(self, participant: Participant) -> str:
        """A participant as every place shows them: name, short id, trust."""
        panel = self.query(ConsultPanel)
        names = panel.first().names() if panel else {}
        return names.get(participant.node, safe_text.plain(participant.name, 40))

    @property
    def view(self) -> ImageView:
        return self.query_one(ImageView)

    def on_mount(self) -> None:
        HeapFreeze.hold()
        self._frozen = True
        self.query_one("#series", OptionList).styles.width = 28
        self._fit(self.app.size.width)
        self.view.focus()
        self.open_series(0)
        self.set_interval(CURSOR_PERIOD, self._flush_cursor)
        self.set_interval(LOADING_POLL, self._poll_loading)
        if self.session is not None:
            self._unsubscribe = self.session.subscribe(self._session_changed)
            self._follow_presenter()

    def on_unmount(self) -> None:
        if self._frozen:
            self._frozen = False
            HeapFreeze.release()
        if self._unsubscribe is not None:
            self._unsubscribe()

    # slices
    def open_series(
        self, index: int, slice_index: int | None = None, window: imaging.Window | None = None
    ) -> None:
        """Show a series: at ``slice_index`` and ``window`` when given (following), else
        where this series was left, else its first slice in its own default window."""
        if not self.series_list:
            self.update_view()
            return
        self._remember_series()
        self.series_index = index % len(self.series_list)
        uid = self.series_list[self.series_index].series_uid
        saved = self._series_state.get(uid)
        if slice_index is None:
            slice_index = saved[1] if saved is not None else 0
        if window is None and saved is not None:
            window = saved[0]
        if window is not None:
            self.view.window = window
        self._window_set = window is not None  # else the first frame shown sets it
        self.instances = self.node.instances(uid)
        self.slices = [(ref, f) for ref in self.instances for f in range(max(1, ref.frames))]
        self.index = max(0, min(len(self.slices) - 1, slice_index))
        self.pending, self.kb = [], None
        self.load_current()

    def _remember_series(self) -> None:
        if self.series_list and self.slices and self._window_set:
            uid = self.series_list[self.series_index].series_uid
            self._series_state[uid] = (self.view.window, self.index)

    def _default_window(self, frame: Frame) -> imaging.Window:
        series = self.series_list[self.series_index]
        return imaging.default_window(
            frame.window, series.modality, series.description, frame.modality()
        )

    @property
    def current(self) -> InstanceRef | None:
        return self.slices[self.index][0] if self.slices else None

    @property
    def frame_no(self) -> int:
        return self.slices[self.index][1] if self.slices else 0

    def load_current(self) -> None:
        ref = self.current
        if ref is None:
            self.update_view()
            return
        key = (ref.sop_uid, self.frame_no)
        cached = self._cache.get(key)
        if cached is not None:
            self._show(key, cached)
            self._read_ahead()
            return

        async def load() -> None:
            await self._load(key)

        # A function, not a coroutine: a load cancelled before it starts leaves nothing behind.
        work: WorkType[None] = load  # mypy cannot solve run_worker's union for an async def
        self._loading = self.run_worker(work, exclusive=True, group="load")

    async def _load(self, key: tuple[str, int]) -> None:
        frame = await self.app.run_blocking(self.node.load_frame, *key)  # type: ignore[attr-defined]
        if not self.query(ImageView):  # the viewer closed while the frame was being read
            return
        if frame is None:
            self.node.request_first(key[0])
        else:
            self._cache[key] = frame
            while len(self._cache) > FRAME_CACHE:
                self._cache.popitem(last=False)
            self._expand_frames(key[0], frame.frames)
        if self.current is not None and (self.current.sop_uid, self.frame_no) == key:
            self._show(key, frame)
        if frame is not None:
            self._read_ahead()

    _ahead: Worker[None] | None = None  # the read-ahead under way
    _last_index = 0  # the slice shown before: which way the user is going

    def _read_ahead(self) -> None:
        """The next READ_AHEAD slices the way the user is going, read into the cache in one
        go on a worker thread (again once half of them were shown): a step then shows its frame
        at once, without a worker, a thread hop and a wait per key. Its errors are left to
        the slice's own load, when the user gets there."""
        step = -1 if self.index < self._last_index else 1
        self._last_index = self.index
        if self._ahead is not None and not self._ahead.is_finished:
            return
        indices = range(self.index + step, self.index + step * (READ_AHEAD + 1), step)
        ahead = [self.slices[i] for i in indices if 0 <= i < len(self.slices)]
        keys = [(ref.sop_uid, f) for ref, f in ahead if (ref.sop_uid, f) not in self._cache]
        if not keys or len(ahead) - len(keys) >= READ_AHEAD // 2:
            return
        node = self.node

        def read() -> list[tuple[tuple[str, int], Frame]]:  # on a worker thread
            frames = ((key, node.load_frame(*key)) for key in keys)
            return [(key, frame) for key, frame in frames if frame is not None]

        async def store() -> None:
            read_ahead = await self.app.run_blocking(read)  # type: ignore[attr-defined]
            if not self.is_attached:
                return
            for key, frame in read_ahead:
                self._cache[key] = frame
                self._expand_frames(key[0], frame.frames)
            while len(self._cache) > FRAME_CACHE:
                self._cache.popitem(last=False)

        work: WorkType[None] = store
        self._ahead = self.run_worker(work, group="ahead", exit_on_error=False)

    def _expand_frames(self, sop_uid: str, frames: int) -> None:
        """A multi-frame instance we knew as one slice: its frames become slices in place."""
        at = [i for i, (ref, _) in enumerate(self.slices) if ref.sop_uid == sop_uid]
        if not at or len(at) >= frames:
            return
        ref, first = self.slices[at[0]], at[0]
        self.slices[first : first + len(at)] = [(ref[0], f) for f in range(frames)]
        if self.index > at[-1]:
            self.index += frames - len(at)

    def _show(self, key: tuple[str, int], frame: Frame | None) -> None:
        if frame is not None and not self._window_set:
            self.view.window = self._default_window(frame)
            self._window_set = True
        self.view.frame = frame
        self.view.show(frame)
        self.update_view()

    def _poll_loading(self) -> None:
        if not self.is_attached:  # the app is closing; the widgets may be gone already
            return
        self._catch_up_listing()
        # Not while a load is under way: restarting it would only cancel it (and its waiters).
        busy = self._loading is not None and not self._loading.is_finished
        if self.view.waiting and self.current is not None and not busy:
            self.load_current()

    def _catch_up_listing(self) -> None:
        """A study still streaming in lists its slices as the sender reads them: a series
        opened before they were all listed takes in the rest as they come, and the slice on
        screen stays the one shown."""
        if all(ref.present for ref in self.instances):
            return  # stored: nothing more to list
        refs = self.node.instances(self.series_list[self.series_index].series_uid)
        if [(r.sop_uid, r.present) for r in refs] == [
            (r.sop_uid, r.present) for r in self.instances
        ]:
            return
        frames = Counter(ref.sop_uid for ref, _ in self.slices)  # multi-frame ones expanded
        at = self.slices[self.index] if self.slices else None
        self.instances = refs
        self.slices = [
            (ref, f) for ref in refs for f in range(max(1, ref.frames, frames[ref.sop_uid]))
        ]
        if at is not None:
            key = (at[0].sop_uid, at[1])
            self.index = next(
                (i for i, (ref, f) in enumerate(self.slices) if (ref.sop_uid, f) == key), 0
            )
        self._show_overlay()

    # drawing
    def update_view(self) -> None:
        view = self.view
        self._show_overlay()
        view.marks = self._marks()
        view.tool_active = bool(self.tool)
        view.redraw()
        self._publish_viewport()

    def _show_overlay(self) -> None:
        """The text around the image (tui.widgets.overlay): study, slice, view, cursor value
        and the orientation letters; redrawn without redrawing the picture."""
        facts = self._overlay()
        top_left, top_right, bottom_left, bottom_right = overlay_lines(facts)
        markers = orientation_markers(facts.frame.orientation if facts.frame else None)
        self.query_one("#overlay-top", OverlayBar).show(
            top_left, markers.top if markers else "", top_right
        )
        self.query_one("#overlay-bottom", OverlayBar).show(
            bottom_left, markers.bottom if markers else "", bottom_right, facts.notes
        )
        self.query_one("#mark-left", EdgeMarker).show(markers.left if markers else " ")
        self.query_one("#mark-right", EdgeMarker).show(markers.right if markers else " ")

    def _overlay(self) -> OverlayFacts:
        view = self.view
        series = self.series_list[self.series_index] if self.series_list else None
        ref = self.current
        position = f"Im {self.instances.index(ref) + 1}/{len(self.instances)}" if ref else "Im -"
        frames = sum(1 for r, _ in self.slices if ref is not None and r.sop_uid == ref.sop_uid)
        if frames > 1:
            position += f"  Fr {self.frame_no + 1}/{frames}"
        lines: list[str] = []
        if self.tool:
            lines.append(f"tool: {self.tool} ({len(self.pending)}/{POINTS_NEEDED[self.tool]})")
        if self.session is not None:
            presenter = self._presenter()
            if self._presenting():
                lines.append("presenting (p stops)")
            elif self.session.following():
                who = self._label(presenter) if presenter else "nobody presents yet"
                lines.append(f"following {who} (f or any move stops)")
        if self.message:
            lines.append(self.message)
        return OverlayFacts(
            self.study,
            series,
            position,
            view.window,
            view.zoom,
            view.invert,
            view.frame,
            self.kb or self.pointer,
            tuple(lines),
        )

    def _marks(self) -> tuple[Mark, ...]:
        ref = self.current
        kb = self._keyboard_marks()
        if self.session is None or ref is None:
            return (*[Mark("point", (p,), "#ffffff") for p in self.pending], *kb)
        colours = {p.node: safe_text.colour(p.colour) for p in self.session.participants()}
        selected = self.query_one(ConsultPanel).selected
        marks = [
            Mark(
                a.kind.value,
                a.points,
                "#ffffff" if a.id == selected else colours.get(a.author, "#ffff00"),
                mark_label(a),
            )
            for a in self._annotations_here()
            if safe_text.finite(a.points)
        ]
        for p in self.session.participants():
            cursor = p.cursor
            if (
                p.node != self.session.local_node
                and cursor
                and cursor.sop_instance_uid == ref.sop_uid
                and cursor.frame == self.frame_no
                and safe_text.finite([(cursor.x, cursor.y)])
            ):
                marks.append(
                    Mark("cursor", ((cursor.x, cursor.y),), colours[p.node], self._label(p))
                )
        marks.extend(Mark("point", (p,), "#ffffff") for p in self.pending)
        marks.extend(kb)
        return tuple(marks)

    def _keyboard_marks(self) -> tuple[Mark, ...]:
        """The keyboard cursor and, while placing, a line to it from the last point placed
        (with the length so far, for the length tool)."""
        if self.kb is None or not self.tool:
            return ()
        marks = [Mark("kbcursor", (self.kb,), "#00ff00")]
        frame = self.view.frame
        if self.pending and self.tool in ("arrow", "length", "angle") and frame is not None:
            label = ""
            if self.tool == "length":
                try:
                    spacing = measure.PixelSpacing(*frame.spacing)
                    label = f"{measure.length_mm(self.pending[-1], self.kb, spacing):.1f} mm"
                except (ConsultError, ValueError):
                    label = ""
            marks.append(Mark("length", (self.pending[-1], self.kb), "#00ff00", label))
        return tuple(marks)

    def _annotations_here(self) -> list[Annotation]:
        ref = self.current
        if self.session is None or ref is None:
            return []
        return [
            a
            for a in self.session.annotations()
            if a.sop_instance_uid == ref.sop_uid and a.frame == self.frame_no
        ]

    def _session_changed(self) -> None:
        self.query_one(ConsultPanel).update_from_session()
        if not self._follow_presenter():
            self.update_view()

    # presence: own viewport out, the presenter's in
    def _presenting(self) -> bool:
        """Whether this participant presents (sessions list their own participant first)."""
        return self.session is not None and self.session.participants()[0].presenting

    def _presenter(self) -> Participant | None:
        if self.session is None:
            return None
        local = self.session.local_node
        return next(
            (p for p in self.session.participants() if p.presenting and p.node != local), None
        )

    def viewport(self) -> Viewport | None:
        """What this person looks at, as presence carries it (pan: image pixels from the
        image centre)."""
        if not self.series_list:
            return None
        view, frame = self.view, self.view.frame
        pan = (0.0, 0.0)
        if frame is not None and view.center is not None:
            rows, cols = frame.pixels.shape[:2]
            pan = (view.center[0] - (cols - 1) / 2, view.center[1] - (rows - 1) / 2)
        return Viewport(
            self.series_list[self.series_index].series_uid,
            self.index,
            round(view.window.width, 2),
            round(view.window.center, 2),
            round(view.zoom, 4),
            round(pan[0], 2),
            round(pan[1], 2),
        )

    def _publish_viewport(self) -> None:
        """Own viewport to presence when it changed (presence coalesces what it sends)."""
        user, self._user_moved = self._user_moved, False
        viewport = self.viewport()
        if self.session is None or viewport is None or viewport == self._sent_viewport:
            return
        self._sent_viewport = viewport
        self.session.set_viewport(viewport, by_user=user)

    def _follow_presenter(self) -> bool:
        """When following, move to the presenter's viewport; True if the view moved."""
        presenter = self._presenter()
        if self.session is None or not self.session.following() or presenter is None:
            return False
        target = presenter.viewport
        if target is None or target == self._sent_viewport:
            return False
        uids = [s.series_uid for s in self.series_list]
        if target.series_uid not in uids:
            self.message = f"{self._label(presenter)}'s series is not in this study here"
            return False
        numbers = (target.window, target.level, target.zoom, target.pan_x, target.pan_y)
        if not safe_text.finite([numbers]):
            self.message = f"{self._label(presenter)}'s view has invalid numbers: not followed"
            return False
        self._sent_viewport = target
        self.session.set_viewport(target, by_user=False)
        view = self.view
        view.window = imaging.Window(target.level, max(1.0, target.window))
        self._window_set = True
        view.zoom = min(imaging.MAX_ZOOM, max(imaging.MIN_ZOOM, target.zoom))
        view.center = None
        index = uids.index(target.series_uid)
        if index != self.series_index:
            self.open_series(index, target.slice_index, view.window)
        else:
            self.index = max(0, min(len(self.slices) - 1, target.slice_index))
            self.load_current()
        frame = view.frame
        if frame is not None and (target.pan_x or target.pan_y):
            rows, cols = frame.pixels.shape[:2]
            pan_x, pan_y = (
                min(cols, max(-cols, target.pan_x)),
                min(rows, max(-rows, target.pan_y)),
            )
            view.center = ((cols - 1) / 2 + pan_x, (rows - 1) / 2 + pan_y)
        self.update_view()
        return True

    # pointer and tools
    @on(ImageView.Step)
    def _on_step(self, event: ImageView.Step) -> None:
        self.action_step(event.delta)

    @on(ImageView.Pointer)
    def _on_pointer(self, event: ImageView.Pointer) -> None:
        self.pointer = event.point
        self._show_overlay()  # the value under the pointer: text only, not the picture

    @on(ImageView.WindowDragged)
    def _on_drag(self, event: ImageView.WindowDragged) -> None:
        self.view.window = event.window
        self._user_moved = True
        self.update_view()

    @on(ImageView.Picked)
    def _on_pick(self, event: ImageView.Picked) -> None:
        """A click near an annotation on this slice selects it (in the list too)."""
        if self.session is None:
            return
        here = self._annotations_here()
        hit = hittest.pick([(a.kind.value, a.points) for a in here], event.point, event.tolerance)
        if hit is not None:
            self.query_one(ConsultPanel).select_id(here[hit].id)
            self.message = ""
            self.update_view()

    @on(ImageView.Clicked)
    def _on_image_click(self, event: ImageView.Clicked) -> None:
        self.add_point(event.point)

    def _flush_cursor(self) -> None:
        ref = self.current
        if self.session is None or ref is None or self.pointer == self._sent_cursor:
            return
        self._sent_cursor = self.pointer
        cursor = Cursor(ref.sop_uid, self.frame_no, *self.pointer) if self.pointer else None
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
                TOOLS[tool], ref.sop_uid, self.frame_no, points, text=text, values=values
            )
            self.message = ""
            self._refresh_panel()  # a live session does not call back for its own edits
        except ConsultError as exc:
            self.message = str(exc)
        self.update_view()

    # actions
    def _refresh_panel(self) -> None:
        panel = self.query(ConsultPanel)
        if panel:
            panel.first().update_from_session()

    # keyboard: cursor, focus, mode line
    def action_key_move(self, dx: int, dy: int, big: bool = False) -> None:
        """Arrows/hjkl: with a tool, move the keyboard cursor (shift/HJKL: 8 steps);
        without one, j/k walk the slices and HJKL pan."""
        frame, geom = self.view.frame, self.view.geometry()
        if self.tool and frame is not None and geom is not None:
            shape = frame.pixels.shape[:2]
            start = self.kb or kbcursor.start(shape, self.pointer)
            step = kbcursor.step_pixels(geom.cell[0], geom.scale[0])
            self.kb = self.pointer = kbcursor.moved(start, dx, dy, shape, step, big)
            self.update_view()
        elif big:
            self.action_pan(8 * dx, 8 * dy)
        elif dy:
            self.action_step(dy)

    def action_place(self) -> None:
        """Space: place a point of the active tool at the keyboard cursor."""
        if not self.tool:
            self.message = "pick a tool first: P point, A arrow, M length, G angle, E ellipse"
            self.update_view()
        elif self.kb is not None:
            self.add_point(self.kb)

    def action_escape(self) -> None:
        """Esc: from the report, chat or series list back to the image (on a narrow
        terminal the pane folds away again); on the image, drop the tool and its
        unfinished points."""
        if not self.view.has_focus:
            self.view.focus()
            self.remove_class("-panel", "-series")
        elif self.tool or self.pending:
            self.action_tool("")
        else:
            self.remove_class("-panel", "-series")

    def action_focus_text(self, widget_id: str) -> None:
        """``r``/``c``: type into the report or the chat (Esc comes back)."""
        if self.session is None:
            self.message = "the report and chat belong to a live consult (open it from Home)"
            self.update_view()
            return
        target = self.query_one(f"#{widget_id}")
        if self.has_class("-narrow") and not self.has_class("-panel"):
            self.add_class("-panel")  # folded away: shown first, focused once laid out
            self.call_after_refresh(target.focus)
        else:
            target.focus()

    # layout: the image takes what the panels leave
    def on_resize(self, event: events.Resize) -> None:
        self._fit(event.size.width)

    def _fit(self, width: int) -> None:
        """Below NARROW_COLUMNS the series list and consult panel fold away."""
        self.set_class(width < NARROW_COLUMNS, "-narrow")

    def action_toggle_panel(self) -> None:
        """``t``: on a narrow terminal, show or fold away the consult panel (annotations,
        chat, report); on a wide one it is always beside the image."""
        if self.session is None:
            self.message = "the consult panel belongs to a live consult (open it from Home)"
        elif not self.has_class("-narrow"):
            self.message = "the consult panel is always shown at this width"
        else:
            self.toggle_class("-panel")
            self.message = ""
        self.update_view()

    def action_toggle_series(self) -> None:
        """``s``: pick a series from the list (on a narrow terminal it folds away again)."""
        if self.has_class("-narrow") and self.has_class("-series"):
            self.remove_class("-series")
            self.view.focus()
            return
        series = self.query_one("#series", OptionList)
        if self.has_class("-narrow"):
            self.add_class("-series")
            self.call_after_refresh(series.focus)
        else:
            series.focus()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """While the report or chat has the keys, none of the viewer's letter keys act."""
        if isinstance(self.focused, Input | TextArea) and action != "escape":
            return action in ("finalise", "critical", "template")  # ctrl+t, F8, F9: not text keys
        return True

    def on_descendant_focus(self, event: events.DescendantFocus) -> None:
        if self._folded(event.widget):  # keys must never go to a pane nobody sees
            self.view.focus()
        self._show_mode()

    def _folded(self, widget: Widget) -> bool:
        """Whether a widget sits in a pane folded away on this narrow terminal."""
        if not self.has_class("-narrow"):
            return False
        if widget.id == "series":
            return not self.has_class("-series")
        in_panel = any(isinstance(node, ConsultPanel) for node in widget.ancestors_with_self)
        return in_panel and not self.has_class("-panel")

    def on_descendant_blur(self, event: events.DescendantBlur) -> None:
        self.call_after_refresh(self._show_mode)

    def _show_mode(self) -> None:
        if not self.is_attached:
            return
        focused = self.focused
        mode = MODES.get(focused.id or "", MODES["image"]) if focused else MODES["image"]
        self.query_one("#mode", Static).update(mode)

    def action_step(self, delta: int) -> None:
        if self.slices:
            self._user_moved = True
            self.index = max(0, min(len(self.slices) - 1, self.index + delta))
            self.load_current()

    def action_goto(self, index: int) -> None:
        if self.slices:
            self._user_moved = True
            self.index = index % len(self.slices)
            self.load_current()

    def action_preset(self, i: int) -> None:
        name, window = imaging.PRESETS[i]
        self._user_moved = True
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
        self._user_moved = True
        self.update_view()

    def action_pan(self, dx: float, dy: float) -> None:
        geom = self.view.geometry()
        if geom is not None:
            self.view.center = geom.panned(dx, dy).view_center
        self._user_moved = True
        self.update_view()

    def action_reset(self) -> None:
        frame = self.view.frame
        self.view.zoom, self.view.center, self.view.invert = 1.0, None, False
        if frame is not None:
            self.view.window = self._default_window(frame)
        self.message = ""
        self._user_moved = True
        self.update_view()

    def action_cine(self) -> None:
        if self._cine is None:
            self._cine = self.set_interval(CINE_PERIOD, self._cine_step)
        else:
            self._cine.stop()
            self._cine = None

    def _cine_step(self) -> None:
        if self.is_attached:  # not while the app tears the widgets down
            self.action_goto(self.index + 1)

    def action_series(self, step: int) -> None:
        self._user_moved = True
        self.open_series(self.series_index + step)

    @on(OptionList.OptionSelected, "#series")
    def _series_chosen(self, event: OptionList.OptionSelected) -> None:
        if event.option_index != self.series_index:
            self._user_moved = True
            self.open_series(event.option_index)
        self.view.focus()
        self.remove_class("-series")

    def action_tool(self, name: str) -> None:
        self.tool, self.pending = name, []
        frame = self.view.frame
        if name and frame is not None:
            self.kb = kbcursor.start(frame.pixels.shape[:2], self.kb or self.pointer)
        else:
            self.kb = None
        if self.session is not None:
            self.session.set_tool(name or "pointer")
        self.update_view()

    def action_present(self) -> None:
        if self.session is None:
            self.message = "presenting needs a live consult (open it from the worklist)"
        else:
            self.session.present(not self._presenting())
            self._sent_viewport = None  # say where we are now, for followers
            self.message = ""
        self.update_view()

    def action_follow(self) -> None:
        if self.session is None:
            self.message = "following needs a live consult (open it from the worklist)"
            self.update_view()
            return
        if self.session.following():
            self.session.follow(False)
        else:
            if self._presenting():
                self.session.present(False)
            self.session.follow(True)
        self.message = ""
        if not self._follow_presenter():
            self.update_view()

    def action_select(self, step: int) -> None:
        if self.session is not None:
            self.query_one(ConsultPanel).select(step)
            self.update_view()

    def action_remove_mark(self) -> None:
        if self.session is None:
            return
        panel = self.query_one(ConsultPanel)
        chosen = next((a for a in self.session.annotations() if a.id == panel.selected), None)
        if chosen is None:
            self.message = "select an annotation first: click it, or [ and ]"
        elif chosen.author != self.session.local_node:
            who = panel.names().get(chosen.author, chosen.author[:8])
            self.message = f"only the author, {who}, can remove this annotation: ask them"
        else:
            try:
                self.session.remove_annotation(chosen.id)
                panel.selected = None
                self.message = ""
                self._refresh_panel()
            except ConsultError as exc:
                self.message = str(exc)
        self.update_view()

    def action_critical(self) -> None:
        """Mark the report a critical result (or not) before F9 signs it."""
        self._critical = not self._critical
        self.message = (
            "report marked CRITICAL: the hospital is paged until someone acknowledges it (F8 undo)"
            if self._critical
            else "report not marked critical"
        )
        self.update_view()

    def _spacing_of(self, a: Annotation) -> tuple[float, float]:
        """The pixel spacing (mm) of an annotation's slice, from a frame read already."""
        frame = self._cache.get((a.sop_instance_uid, a.frame)) or self.view.frame
        return (frame.spacing[0], frame.spacing[1]) if frame is not None else (1.0, 1.0)

    def _slice_name(self, a: Annotation) -> str:
        numbers = {
            ref.sop_uid: ref.number
            for s in self.series_list
            for ref in self.node.instances(s.series_uid)
        }
        number = numbers.get(a.sop_instance_uid)
        name = f"image {number}" if number is not None else f"image …{a.sop_instance_uid[-12:]}"
        return name + (f", frame {a.frame + 1}" if a.frame else "")

    def action_finalise(self) -> None:
        """F9: show what will be signed and sent; enter/y signs it, escape/n goes back."""
        session = self.session
        if session is None or session.finalised():
            return
        # Every participant's annotations go into the report, oldest first (report_items).
        measured = sorted(session.annotations(), key=lambda a: (a.at, a.id))
        dropped = report_draft.duplicates(measured, self._spacing_of)
        sent = [a for a in measured if a not in dropped]

        def line(a: Annotation) -> str:
            return f"{describe(a)} ({self._slice_name(a)})"

        sections = report_draft.preview_sections(
            session.report_text(),
            [line(a) for a in sent],
            critical=self._critical,
            dropped=[line(a) for a in dropped],
        )

        def answered(sign: bool | None) -> None:
            if sign and not session.finalised():
                session.finalise(critical=self._critical, drop=frozenset(a.id for a in dropped))
                self._refresh_panel()
                self.message = "report signed and sent"
                self.update_view()

        self.app.push_screen(SignPreview(sections), answered)

    def action_template(self) -> None:
        """ctrl+t: an empty report gets the Findings/Impression skeleton for this study."""
        session = self.session
        if session is None or session.finalised():
            return
        if session.report_text().strip():
            self.message = "templates go into an empty report only"
        else:
            series = self.series_list[self.series_index] if self.series_list else None
            modality = series.modality if series else ""
            where = f"{self.study.description} {series.description if series else ''}"
            template = report_draft.template_for(modality, where)
            text = template.text() if template else report_draft.join_report("", "")
            session.set_report_text(text)
            self.query_one("#report", TextArea).text = text
            self.message = f"template: {template.name if template else 'Findings/Impression'}"
        self.update_view()

    def action_propose_guest(self) -> None:
        """``g``: propose a trusted peer as a guest of this consult's live session."""
        session = self.session
        if session is None:
            self.message = "guests join a live consult: open the study from the worklist"
            self.update_view()
            return
        from tui.screens.guests import GuestPicker, guest_candidates

        peers = guest_candidates(self.node.peers())
        if not peers:
            self.notify("no verified peer to propose: verify one on the Peers screen (F4, v)")
            return

        def chosen(node_id: str | None) -> None:
            if node_id is None:
                return

            async def propose() -> None:
                try:
                    self.notify(await self.node.propose_guest(session.consult_id, node_id))
                except ActionError as exc:
                    self.notify(str(exc), severity="error", timeout=10)

            job: WorkType[None] = propose  # mypy cannot solve run_worker's union otherwise
            self.run_worker(job, group="guest")

        self.app.push_screen(GuestPicker(session.consult_id, peers), chosen)

    def action_close(self) -> None:
        self.app.pop_screen()
