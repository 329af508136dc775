"""Studies on this node: pick one, see its series, open it in the viewer."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Header, Static

from tui import safe_text
from tui.facade import NodeFacade, StudyInfo
from tui.safe_text import MAX_LINE_CHARS, MAX_NAME_CHARS
from tui.screens.compare import CompareScreen, priors_of
from tui.screens.share import ShareScreen
from tui.screens.viewer import ViewerScreen
from tui.widgets.footer import Footer


class StudiesScreen(Screen[None]):
    BINDINGS = [  # noqa: RUF012
        Binding("enter", "open(False)", "view"),
        Binding("l", "open(True)", "live consult"),
        Binding("s", "share", "request consult"),
        Binding("p", "compare", "compare with prior"),
    ]

    def __init__(self, node: NodeFacade) -> None:
        super().__init__()
        self.node = node
        self.studies: list[StudyInfo] = []

    def compose(self) -> ComposeResult:
        yield Header()
        yield DataTable(id="studies", cursor_type="row")
        yield Static(id="series-info")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#studies", DataTable)
        table.add_columns("patient", "date", "description", "modality", "series", "images")
        self.reload()

    def on_screen_resume(self) -> None:
        self.reload()

    def reload(self) -> None:
        table = self.query_one("#studies", DataTable)
        table.clear()
        self.studies = self.node.studies()
        for s in self.studies:
            table.add_row(
                safe_text.name(s.patient),
                safe_text.name(s.date),
                safe_text.line(s.description, MAX_NAME_CHARS),
                safe_text.name(s.modalities),
                s.series_count,
                s.instance_count,
            )
        if not self.studies:
            self.query_one("#series-info", Static).update(
                "No studies yet: send some by DICOM or put files in the node's data/inbox."
            )
        table.focus()

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if not (0 <= event.cursor_row < len(self.studies)):
            return
        study = self.studies[event.cursor_row]
        lines = [
            f"  Se {s.number:>3}  {safe_text.plain(s.modality, 16):<3} "
            f"{safe_text.plain(s.description, MAX_LINE_CHARS)}  ({s.instance_count} images)"
            for s in self.node.series(study.study_uid)
        ]
        self.query_one("#series-info", Static).update(Text("\n".join(lines)))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_open(False)

    def selected(self) -> StudyInfo | None:
        row = self.query_one("#studies", DataTable).cursor_row
        return self.studies[row] if 0 <= row < len(self.studies) else None

    def action_open(self, live: bool) -> None:
        study = self.selected()
        if study is not None:
            self.node.record_view(study.study_uid, live=live)
            self.app.push_screen(ViewerScreen(self.node, study, live=live))

    def action_compare(self) -> None:
        study = self.selected()
        if study is None:
            return
        priors = priors_of(self.studies, study)
        if not priors:
            self.notify("no earlier study of this patient on this node", timeout=5)
            return
        self.node.record_view(study.study_uid, live=False)
        self.node.record_view(priors[0].study_uid, live=False)
        self.app.push_screen(CompareScreen(self.node, study, priors[0]))

    def action_share(self) -> None:
        study = self.selected()
        if study is None:
            self.notify("select a study to share first", severity="warning")
            return

        def done(outcome: str | None) -> None:
            if outcome:
                self.notify(outcome, timeout=10)
                self.query_one("#series-info", Static).update(safe_text.safe(f"Request: {outcome}"))

        self.app.push_screen(ShareScreen(self.node, study), done)
