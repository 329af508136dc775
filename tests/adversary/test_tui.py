"""Attacks through what the TUI and the CLI show: peer text as markup, terminal escapes,
bidi overrides, endless lines, and a victim's display name on another key.

Every string a peer can set (consult question, names, institution, chat, annotation text,
report, error texts it sends back, series descriptions) is fed through each place it is
shown; the app must not crash and the text must appear literally, with no ESC byte and no
bidi override in what reaches the terminal.
"""

from __future__ import annotations

import html
import logging
import math
import re
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from rich.cells import cell_len
from rich.segment import Segment
from textual.geometry import Region

from consult.errors import LocalConsultError
from consult.presence import Cursor, Viewport
from consult.requests import ConsultRequest, Priority
from consult.shared import Annotation, AnnotationKind
from consult.store import ConsultDB
from crypto.errors import InvalidNodeId
from crypto.identity import Identity, NodeId
from node.cli import main
from node.cli.ids import open_directory, resolve_id
from node.core.config import NodeHome
from node.core.display import MAX_LINE_CHARS, PrintableFormatter, peer_label, printable
from node.demo.phantom import generate_ct
from registry.records import NodeRecord
from tests.consult.test_live import wait_for
from tests.tui.pilots import open_viewer, press
from tests.tui.test_node_facade import consult_pair, form_to
from tui.app import RadmeshApp
from tui.facade import ConsultItem, PeerInfo, SeriesInfo, StudyInfo, TransferInfo
from tui.memory import SERIES_UID, STUDY_UID, InMemoryNode, MemoryPeer
from tui.screens.viewer import ViewerScreen
from tui.widgets.consult_panel import ConsultPanel
from tui.widgets.image_view import Mark

SIZE = (220, 60)
MARKUP = ("[/]", "[bold red]", "[link=file:///etc/passwd]x[/link]", "[@click=app.quit]x[/]")
ESC = "\x1b"
CONTROLS = ("\x1b[2J\x1b]0;pwned\x07", "\r", "\b", "\x9b31m", "\u202e", "\u2066")


def hostile(tag: str) -> str:
    """A peer string carrying every markup trick and control character, labelled by field."""
    return f"{tag} Please read [/] urgently {' '.join(MARKUP)} {''.join(CONTROLS)}end"


LONG = "Q" * 5000  # one line of a consult question, far wider than any screen


def screen_lines(app: RadmeshApp) -> list[str]:
    """The screen row by row: the SVG export renders the segments the terminal would get,
    one <text> per run of equal style; they are joined back by their row."""
    rows: dict[int, list[tuple[float, str]]] = defaultdict(list)
    svg = app.export_screenshot()
    for m in re.finditer(r'<text [^>]*?x="([\d.]+)"[^>]*?line-(\d+)\)">([^<]*)</text>', svg):
        rows[int(m.group(2))].append((float(m.group(1)), html.unescape(m.group(3))))
    return ["".join(t for _, t in sorted(rows[k])).replace("\xa0", " ") for k in sorted(rows)]


def screen_text(app: RadmeshApp) -> str:
    """The whole screen, rows joined; plus the raw export, so no stray byte hides."""
    raw = html.unescape(app.export_screenshot()).replace("\xa0", " ")
    return "\n".join(screen_lines(app)) + "\n" + raw


def assert_clean(text: str) -> None:
    """None of the attack's control characters got through (placeholders are fine)."""
    found = sorted({f"U+{ord(c):04X}" for c in text if c in "\x1b\x9b\r\b\x07\u202e\u2066"})
    assert not found, f"control characters reached the screen: {found}"


def assert_literal(app: RadmeshApp, *tags: str) -> None:
    text = screen_text(app)
    assert_clean(text)
    for tag in tags:
        assert f"{tag} Please read [/] urgently" in text, tag
    assert "␛" in text  # the escape is shown as a placeholder, not dropped silently


ID_A, ID_B = Identity.generate(), Identity.generate()  # two peers; they join live sessions
KEY_A, KEY_B = ID_A.node_id, ID_B.node_id


class HostileNode(InMemoryNode):
    """The in-memory node, with every peer-supplied field set by an attacker."""

    def __init__(self, home: bool = True, studies: bool = True) -> None:
        """``home``: the worklist, transfers and notifications are hostile; ``studies``: the
        study and series descriptions (so each screen's test fails on its own)."""
        super().__init__(Identity.generate())
        self.home = home
        self.hostile_studies = studies
        self.note = hostile("NOTE") if home else "a new request"
        self.answer = hostile("ANSWER")

    def consults(self) -> list[ConsultItem]:
        now = time.time()
        first = (
            ConsultItem("c-1", True, hostile("QUESTION"), KEY_A.short(), "stat", "offered",
                        now + 1800, STUDY_UID, hostile("NAME"), "verified")
            if self.home
            else ConsultItem("c-1", True, "CT head", KEY_A.short(), "stat", "offered",
                             now + 1800, STUDY_UID, "Dr Victim", "verified")
        )  # fmt: skip
        return [
            first,
            ConsultItem("c-2", True, LONG, KEY_B.short(), "routine", "offered", now + 3600,
                        "", "Dr Victim", "unverified"),
        ]  # fmt: skip

    def peers(self) -> list[PeerInfo]:
        return [
            PeerInfo(str(KEY_A), "Dr Victim", hostile("INST"), ("neuro",), ("GB",), True,
                     "verified"),
            PeerInfo(str(KEY_B), "Dr Victim", "Evil Clinic", (hostile("SUB"),), ("FR",), True),
        ]  # fmt: skip

    def notifications(self) -> list[str]:
        return [self.note]

    def transfers(self) -> list[TransferInfo]:
        return [TransferInfo("t-1", hostile("TPEER") if self.home else "peer", "CT", 1, 2)]

    def studies(self) -> list[StudyInfo]:
        desc = hostile("DESC") if self.hostile_studies else "CT CHEST"
        return [StudyInfo(STUDY_UID, "ANON-0001", "20260101", desc, "CT", 2, 24)]

    def series(self, study_uid: str) -> list[SeriesInfo]:
        desc = hostile("SERIES") if self.hostile_studies else "Axial"
        return [SeriesInfo(SERIES_UID, STUDY_UID, 1, "CT", desc, 12)]

    def safety_number(self, peer_node_id: str) -> str:
        return "12345 67890"

    async def respond(self, consult_id: str, accept: bool, reason: str = "") -> str:
        return self.answer


# --- the sanitiser itself ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("\x1b[31mred", "␛[31mred"),
        ("a\rb\bc\x00d\x7fe", "a␍b␈c␀d␡e"),
        ("\x9b2J", "<U+009B>2J"),
        ("x\u202eevil\u202cy", "x<U+202E>evil<U+202C>y"),
        ("\u2066\u2067\u2068\u2069\u200f", "<U+2066><U+2067><U+2068><U+2069><U+200F>"),
        ("line\nbreak\u2028", "line␊break<U+2028>"),
        ("tab\there", "tab here"),
        ("\ud800", "\ufffd"),
        ("Dr Ünïcödé 中文 [b]", "Dr Ünïcödé 中文 [b]"),  # markup is the widget's business
    ],
)
def test_printable_replaces_every_control_character_with_a_visible_placeholder(
    raw: str, shown: str
) -> None:
    assert printable(raw) == shown


def test_printable_keeps_newlines_only_when_asked_and_cuts_long_lines() -> None:
    assert printable("a\nb\r\n", multiline=True) == "a\nb␍\n"
    cut = printable(LONG, MAX_LINE_CHARS)
    assert len(cut) == MAX_LINE_CHARS
    assert cut.endswith("…")
    assert printable("short", 10) == "short"
    assert printable(42) == "42"


def test_a_peer_label_never_shows_a_name_without_its_key_and_trust() -> None:
    assert peer_label("Dr Neuro", "ABCDEFG", "verified") == "Dr Neuro (ABCDEFG, verified)"
    assert peer_label("", "ABCDEFG", "unverified") == "(ABCDEFG, unverified)"
    label = peer_label("Dr\x1b[2J" + "N" * 500, "ABCDEFG", "unverified")
    assert ESC not in label
    assert label.endswith("… (ABCDEFG, unverified)")


@pytest.mark.parametrize(
    "name",
    [
        "Dr Neuro (ABCDEFG, verified)",
        "Dr Neuro \uff08ABCDEFG, verified\uff09",  # fullwidth brackets
        "Dr Neuro \u2768ABCDEFG, verified\u2769",  # ornament brackets
        "Dr Neuro (ABCDEFG, verified)" + "\u3000" * 11 + "x",  # padding pushes the key out
        "Dr Neuro (ABCDEFG,\u200b verified)\u2060",  # invisible format characters
    ],
)
def test_a_name_cannot_pass_for_a_label_with_another_key_and_trust(name: str) -> None:
    """Red team: a peer whose display name mimics "(ABCDEFG, verified)". Before the fix
    the label read "Dr Neuro (ABCDEFG, verified) (XYZ1234, unverified)", with the real
    key and trust pushed off a narrow column by padding."""
    label = peer_label(name, "XYZ1234", "unverified")
    assert label.endswith(" (XYZ1234, unverified)")
    shown = label.removesuffix(" (XYZ1234, unverified)")
    assert not any(ch in shown for ch in "()\uff08\uff09\u2768\u2769\u200b\u2060")
    assert "  " not in shown
    assert "\u3000" not in shown


# --- the app, screen by screen -----------------------------------------------------------------


async def test_markup_and_escapes_in_home_worklist_transfers_and_notifications() -> None:
    """A stored question `Please read [/] urgently` crashed the app at every start."""
    node = HostileNode()
    app = RadmeshApp(node)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await pilot.pause()
        assert_literal(app, "NOTE", "TPEER")
        text = screen_text(app)
        assert "QUESTION Please read [/]" in text  # cut with an ellipsis in its column
        assert "NAME Please read [/]" in text
        assert "Q" * 200 not in text
        assert "Q…" in text
        assert app.is_running
        # A toast whose text came from a peer (its answer, an error it sent back).
        app.screen.query_one("#worklist").focus()
        await pilot.press("a")
        await app.workers.wait_for_complete()
        await pilot.pause()
        shown = [n.message for n in app._notifications]
        assert any("ANSWER Please read [/] urgently" in m for m in shown)
        assert_clean("".join(shown))
        assert not any(n.markup for n in app._notifications)
        text = screen_text(app)  # the toast wraps in its box: check it is there, escapes not
        assert "ANSWER Please read [/]" in text
        assert_clean(text)
        assert app.is_running  # [@click=app.quit] bound nothing


async def test_markup_and_escapes_in_peers_studies_and_series() -> None:
    node = HostileNode(home=False)
    app = RadmeshApp(node)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await press(pilot, "f4")
        text = screen_text(app)
        assert "INST Please read [/]" in text
        assert "SUB Please read [/]" in text
        assert_clean(text)
        await press(pilot, "v")  # the verify dialog names the peer too
        text = " ".join(line.strip(" │╭╮╰╯─") for line in screen_lines(app))
        assert f"Verify Dr Victim ({KEY_A.short()}, verified) INST Please read [/]" in text
        assert ESC not in text
        await press(pilot, "n", "f3")
        text = screen_text(app)
        assert "DESC Please read [/]" in text
        assert "SERIES Please read [/] urgently" in text
        assert_clean(text)
        await pilot.press("enter")  # the viewer lists the series and overlays the study
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert isinstance(app.screen, ViewerScreen)
        text = screen_text(app)
        assert "SERIES Please read [/]" in text
        assert_clean(text)


async def test_markup_and_escapes_in_the_live_consult_panel_and_image_labels() -> None:
    node = HostileNode(home=False, studies=False)
    app = RadmeshApp(node)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        viewer = await open_viewer(pilot, node)
        sop = viewer.current.sop_uid  # type: ignore[union-attr]
        peer = node.live.join(hostile("PNAME"), "#ff00ff", ID_A)  # cut to 100 characters
        peer.live.say(hostile("CHAT"))
        peer.live.add_annotation(
            AnnotationKind.ARROW, sop, 0, ((10.0, 10.0), (30.0, 30.0)), text=hostile("LABEL")
        )
        peer.live.set_report_text(hostile("REPORT") + "\nsecond line")
        await node.live.settle()
        await pilot.pause()
        assert node.live.refused == []  # all of it is legal to send: the TUI must cope
        panel = viewer.query_one(ConsultPanel)
        assert_literal(app, "CHAT")
        text = screen_text(app)
        assert "PNAME Please read [/]" in text  # participants (cut to one line)
        assert "LABEL Please read [/]" in text  # the annotation list
        assert "REPORT Please read [/] urgently" in text  # the report editor
        report = panel.query_one("#report").text  # type: ignore[attr-defined]
        assert ESC not in report
        assert "\nsecond line" in report
        labels = "".join(ch for strip in viewer.view._strips for seg in strip for ch in seg.text)
        assert_clean(labels)  # the tags drawn on the image


async def test_hostile_and_double_width_names_on_the_image_reach_the_compositor_clean() -> None:
    """The image hands the compositor its rows itself (ImageView.render_lines, no Textual
    styling on the way): peers' names drawn on it (escapes, bidi overrides, double-width
    text that would overflow a row counted a cell per character) arrive clean, and every
    row is exactly the view's width."""
    node = HostileNode(home=False, studies=False)
    app = RadmeshApp(node)
    async with app.run_test(size=SIZE) as pilot:
        viewer = await open_viewer(pilot, node)
        sop = viewer.current.sop_uid  # type: ignore[union-attr]
        view = viewer.view
        width = view.size.width
        for i, name in enumerate((hostile("PNAME"), "頭部CT" * 40, "\u202eevil\x1b[2J")):
            peer = node.live.join(name, "#ff00ff", Identity.generate())
            peer.live.move_cursor(Cursor(sop, 0, 40.0 + 30 * i, 60.0 + 20 * i))
        await node.live.settle()
        for _ in range(100):  # bounded: the three name tags drawn, or give up after 2 s
            if sum(m.kind == "cursor" for m in view.marks) == 3 and not view._pending:
                break
            await pilot.pause(0.02)
        await pilot.pause()
        assert view._plain()  # the direct path, not Textual's
        lines = view.render_lines(Region(0, 0, width, view.size.height))
        # the cells the terminal gives them, not the length the rows declare
        assert [sum(cell_len(seg.text) for seg in line) for line in lines] == [width] * len(lines)
        drawn = "".join(seg.text for line in lines for seg in line)
        assert_clean(drawn)
        assert "頭" in drawn  # the names are there, cut to fit, not dropped


# --- one name, two keys ------------------------------------------------------------------------


async def test_two_peers_publishing_the_same_name_are_told_apart_with_their_trust() -> None:
    node = HostileNode(home=False)
    app = RadmeshApp(node)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await pilot.pause()
        text = screen_text(app)  # the worklist
        assert KEY_A.short() != KEY_B.short()
        assert f"Dr Victim ({KEY_A.short()}, verified)" in text
        assert f"Dr Victim ({KEY_B.short()}, unverified)" in text
        await press(pilot, "f4")
        rows = [line for line in screen_lines(app) if "Dr Victim" in line]
        assert len(rows) == 2
        a = next(r for r in rows if KEY_A.short() in r)
        b = next(r for r in rows if KEY_B.short() in r)
        assert "✔ verified" in a
        assert "! unverified" in b
        await pilot.press("f3", "l")  # live consult: the participant list and the chat
        await app.workers.wait_for_complete()
        await pilot.pause()
        node.live.join("Dr Victim", "#ff00ff", ID_A)
        impostor = node.live.join("Dr Victim", "#00ffff", ID_B)
        impostor.live.say("it is me, trust me")
        await node.live.settle()
        await pilot.pause()
        text = screen_text(app)
        assert f"Dr Victim ({KEY_A.short()}, verified)" in text
        assert f"Dr Victim ({KEY_B.short()}, unverified)" in text


# --- the CLI: `radmesh peers`, `trust`, `consult list/show` ------------------------------------

EVIL_NAME = "Dr Victim\x1b]0;pwned\x07\x1b[2J [/]\u202e"


def _cli(home: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["--home", str(home), *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _remember(home: Path, *records: NodeRecord) -> None:
    now = int(time.time())
    directory = open_directory(NodeHome(home))
    try:
        for record in records:
            assert directory.remember(record, "test", now)
    finally:
        directory.close()
        directory.trust.close()


def _record(
    identity: Identity,
    name: str,
    institution: str = "Clinic",
    endpoints: tuple[str, ...] = ("lan:http://127.0.0.1:9",),
) -> NodeRecord:
    return NodeRecord.create(
        identity, now=int(time.time()), sequence=1, display_name=name, institution=institution,
        subspecialties=("neuro\x1b[31m",), endpoints=endpoints,
    )  # fmt: skip


def test_cli_peers_list_tells_same_named_peers_apart_and_prints_no_escapes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "me"
    assert _cli(home, capsys, "init", "--no-passphrase", "--name", "Me")[0] == 0
    real, fake = Identity.generate(), Identity.generate()
    _remember(home, _record(real, EVIL_NAME, "St Elsewhere\u202e"), _record(fake, EVIL_NAME))
    assert _cli(home, capsys, "trust", "allow", str(real.node_id))[0] == 0

    code, out = _cli(home, capsys, "peers", "list")
    assert code == 0
    assert_clean(out)
    assert "\x07" not in out
    lines = [line for line in out.splitlines() if "Dr Victim" in line]
    assert len(lines) == 2
    real_line = next(line for line in lines if line.startswith(real.node_id.short()))
    fake_line = next(line for line in lines if line.startswith(fake.node_id.short()))
    assert " verified " in real_line
    assert " unknown " in fake_line
    assert "␛]0;pwned␇" in real_line  # shown, harmless

    # The short id `peers list` printed is what a person types next.
    code, out = _cli(home, capsys, "peers", "show", fake.node_id.short())
    assert code == 0, out
    assert f"Node id:        {fake.node_id}" in out
    assert "Trust:          unknown" in out
    assert_clean(out)
    code, out = _cli(home, capsys, "trust", "verify", fake.node_id.short().lower(), "--yes")
    assert code == 0, out
    assert f"Peer:      {fake.node_id}" in out  # the full id, and the safety number, first
    code, out = _cli(home, capsys, "trust", "allow", real.node_id.short())
    assert code == 1
    assert "only the full node id" in out


def test_cli_consult_request_to_takes_the_short_id_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "hospital"
    assert _cli(home, capsys, "init", "--no-passphrase")[0] == 0
    consultant = Identity.generate()
    _remember(home, _record(consultant, "Dr Neuro", endpoints=()))  # offline: written to a file
    code, out = _cli(
        home, capsys, "consult", "request", "--study", "2.25.1", "--question", "Bleed?",
        "--subspecialty", "neuro", "--jurisdiction", "FR", "--to", consultant.node_id.short(),
        "--out", str(tmp_path / "req.bin"),
    )  # fmt: skip
    assert code == 0, out
    with ConsultDB.in_data_dir(NodeHome(home).data_dir) as db:
        assert db.offered(db.resolve(out.split()[1])) == [consultant.node_id]


def test_a_short_id_is_taken_only_when_exactly_one_known_peer_has_it() -> None:
    a = NodeId(bytes(5) + b"\x01" * 27)
    b = NodeId(bytes(5) + b"\x02" * 27)  # the same first 40 bits: the same short id
    other = NodeId(b"\xff" * 32)
    assert a.short() == b.short()
    assert resolve_id(other.short(), [a, b, other]) == other
    assert resolve_id(str(a), []) == a  # a full id needs no lookup
    with pytest.raises(InvalidNodeId, match="2 known peers"):
        resolve_id(a.short(), [a, b, other])
    assert resolve_id(str(a)[:15], [a, b]) == a  # a longer prefix tells them apart
    with pytest.raises(InvalidNodeId, match="no known peer"):
        resolve_id(a.short(), [other])
    with pytest.raises(InvalidNodeId, match="56 letters"):
        resolve_id("ABC", [a])  # too short to mean anything


def test_cli_consult_list_and_show_print_a_hostile_question_literally(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "consultant"
    assert _cli(home, capsys, "init", "--no-passphrase")[0] == 0
    sender = Identity.generate()
    _remember(home, _record(sender, EVIL_NAME))
    now = int(time.time())
    question = "Please read [/] urgently\x1b]0;pwned\x07\r\x08\u202eevil\x9b2J\n" + "Q" * 3000
    request = ConsultRequest.new(
        requester=sender.node_id, study_uid="2.25.1", question=question,
        priority=Priority.STAT, subspecialty="neuro\x1b[5m", jurisdiction="FR", language="en",
        deadline=now + 3600, now=now,
    )  # fmt: skip
    wire_file = tmp_path / "req.bin"
    wire_file.write_bytes(request.to_wire(sender))
    assert _cli(home, capsys, "consult", "import", str(wire_file))[0] == 0

    code, out = _cli(home, capsys, "consult", "list")
    assert code == 0
    assert_clean(out)
    assert "Please read [/] urgently␛]0;pwned␇" in out
    assert "Q" * 100 not in out  # one line per consult, the question cut

    code, out = _cli(home, capsys, "consult", "show", request.id[:8])
    assert code == 0
    assert_clean(out)
    assert "\x07" not in out
    assert "question:      Please read [/] urgently␛]0;pwned␇␍␈<U+202E>evil<U+009B>2J" in out
    assert f"({sender.node_id.short()}, unknown)" in out  # the peer: name with id and trust


# --- numbers and styles from presence ---------------------------------------------------------


def hostile_mark(
    peer: MemoryPeer, kind: AnnotationKind, sop: str, points: tuple[tuple[float, float], ...]
) -> Annotation:
    """An annotation signed by ``peer`` whose points are then replaced by ``points``, past
    every local check: what a modified client writes into the shared state."""
    legal = ((0.0, 0.0),) * len(points)
    mark = Annotation(f"h-{kind}", kind, sop, 0, legal, peer.node, 1.0, "bad")
    mark = mark.signed(peer.identity, peer.live.consult_id)
    object.__setattr__(mark, "points", points)
    return mark


def refusals(node: InMemoryNode) -> list[str]:
    return [str(exc) for exc in node.live.refused]


async def test_nan_points_and_style_strings_from_a_peer_do_not_take_the_viewer_down() -> None:
    node = HostileNode(home=False, studies=False)
    app = RadmeshApp(node)
    async with app.run_test(size=SIZE) as pilot:
        viewer = await open_viewer(pilot, node)
        sop = viewer.current.sop_uid  # type: ignore[union-attr]
        node.live.join("Dr A", "link file:///etc/passwd", ID_A)  # sent cut to 16 characters
        b = node.live.join("Dr B", "not a colour", ID_B)
        # Numbers that are not numbers, each from a peer of its own: the session refuses the
        # message and drops that peer (the live hub closes such a connection).
        node.live.join("Dr C", "#ff0000").cursor(Cursor(sop, 0, math.nan, math.inf))
        marker = node.live.join("Dr D", "#ff0000")
        nan_points = ((math.nan, 1.0), (math.inf, 3.0))
        marker.write_raw(hostile_mark(marker, AnnotationKind.LENGTH, sop, nan_points))
        presenter = node.live.join("Dr E", "#ff0000")
        presenter.viewport(
            Viewport(SERIES_UID, 3, math.nan, math.inf, math.nan, 1e308, 0.0), presenting=True
        )
        b.cursor(Cursor(sop, 0, 40.0, 40.0))  # the canary, sent after: drawn
        await node.live.settle()
        viewer.view.focus()
        await press(pilot, "f")  # follow the presenter: the one with such numbers was dropped
        assert app.is_running
        refused = refusals(node)
        assert len(refused) == 3, refused
        for reason in (
            "presence cursor field 'x' is out of range",
            "annotation(s) or chat message(s) that are malformed",  # undone, peer dropped
            "presence viewport field 'window' is out of range",
        ):
            assert any(reason in r for r in refused), (reason, refused)
        assert [m.kind for m in viewer.view.marks] == ["cursor"]  # Dr B's, the finite one
        assert viewer.view.marks[0].colour == "#ffff00"  # "not a colour" is not a style
        assert math.isfinite(viewer.view.zoom)
        styles = repr(getattr(viewer.query_one("#participants").render(), "spans", None))
        assert "Color(255, 255, 0)" in styles  # the default colour stands in for both
        assert "file:" not in styles


# An ellipse of a huge radius must not go through an undefined float-to-int cast (numpy
# warns "invalid value encountered in cast" and the pixels it gives are unspecified).
@pytest.mark.filterwarnings("error::RuntimeWarning")
async def test_huge_but_finite_points_from_a_peer_do_not_take_the_viewer_down() -> None:
    """Red team: points that are finite but whose difference is not ((-1e308, y) to
    (1e308, y)): the line maths made a NaN and int(nan) raised in the viewer, and the app
    stopped on a ValueError. The session now refuses them (consult.shared MAX_COORD,
    consult.presence MAX_NUMBER); the viewer still survives them if they get past."""
    node = HostileNode(home=False, studies=False)
    app = RadmeshApp(node)
    async with app.run_test(size=SIZE) as pilot:
        viewer = await open_viewer(pilot, node)
        sop = viewer.current.sop_uid  # type: ignore[union-attr]
        huge = (
            (AnnotationKind.LENGTH, ((-1e308, 5.0), (1e308, 5.0))),
            (AnnotationKind.ARROW, ((-1e308, -1e308), (1e308, 1e308))),
            (AnnotationKind.ELLIPSE, ((5.0, 5.0), (1e308, 1e308))),
        )
        for kind, points in huge:
            marker = node.live.join(f"Dr {kind}", "#ff0000")
            marker.write_raw(hostile_mark(marker, kind, sop, points))
        node.live.join("Dr C", "#ff0000").cursor(Cursor(sop, 0, 1e308, -1e308))
        canary = node.live.join("Dr A", "#ff0000", ID_A)
        canary.cursor(Cursor(sop, 0, 40.0, 40.0))  # sent after the others: drawn
        await node.live.settle()
        viewer.view.focus()
        await pilot.pause()
        assert app.is_running
        refused = refusals(node)
        assert len(refused) == 4, refused
        assert sum("annotation(s) or chat message(s) that are malformed" in r for r in refused) == 3
        assert any("presence cursor field 'x' is out of range" in r for r in refused), refused
        assert [m.kind for m in viewer.view.marks] == ["cursor"]
        viewer.view.marks = tuple(
            Mark(kind.value, points, "#ff0000", "huge") for kind, points in huge
        )
        viewer.view.marks += (Mark("cursor", ((1e308, -1e308),), "#ff0000"),)
        viewer.view.redraw()
        await pilot.pause()
        assert app.is_running


@pytest.mark.filterwarnings("ignore:Found unknown escape sequence")  # pydicom, on the ESC
def test_cli_studies_errors_and_log_lines_carry_no_raw_escapes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "me"
    assert _cli(home, capsys, "init", "--no-passphrase")[0] == 0
    # A study fetched from a peer: its DICOM text is the peer's.
    files = generate_ct(tmp_path / "ct", slices=1, rows=16, seed=1)
    ds = pydicom.dcmread(files[0])
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8, so the bidi override survives
    ds.StudyDescription = "HEAD\x1b]0;pwned\x07\u202e"
    ds.SeriesDescription = "AX\x1b[2J"
    ds.save_as(files[0])
    assert _cli(home, capsys, "import", str(files[0]))[0] == 0
    code, out = _cli(home, capsys, "studies", "--series")
    assert code == 0
    assert_clean(out)
    assert "HEAD␛]0;pwned␇<U+202E>" in out
    assert "AX␛[2J" in out

    # Any error printed as `radmesh: ...` (they may quote what a peer sent).
    def refused(self: ConsultDB, prefix: str) -> str:
        raise LocalConsultError("the peer said: \x1b]0;pwned\x07\x1b[2J")

    monkeypatch.setattr(ConsultDB, "resolve", refused)
    code, out = _cli(home, capsys, "consult", "show", "abcd")
    assert code == 1
    assert_clean(out)
    assert "radmesh: the peer said: ␛]0;pwned␇␛[2J" in out

    # Log lines on the terminal.
    formatter = PrintableFormatter("%(levelname)s %(message)s")
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "refused %s", ("\x1b[2J",), None)
    assert formatter.format(record) == "WARNING refused ␛[2J"


# --- end to end: a request stored by a real node ----------------------------------------------


async def test_a_stored_request_with_markup_opens_in_the_consultants_tui(tmp_path: Path) -> None:
    """The reported crash: the request is kept, so the TUI died at every start."""
    async with consult_pair(tmp_path, slices=1, rows=32) as (rural, neuro, ask, answer, study_uid):
        question = "Please read [/] urgently [@click=app.quit]x[/] [link=file:///etc/passwd]y"
        outcome = await ask.request_consult(replace(form_to(neuro, study_uid), question=question))
        neuro_id = neuro.identity.node_id
        assert f"sent to {neuro.config.display_name} ({neuro_id.short()}, verified)" in outcome
        await wait_for(lambda: bool(answer.consults()))
        [item] = answer.consults()
        rural_id = rural.identity.node_id
        assert (item.peer, item.peer_trust) == (rural_id.short(), "verified")
        app = RadmeshApp(answer)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            text = screen_text(app)
            assert "Please read [/] urgently [@click=app.quit]x[/]" in text
            assert f"{rural.config.display_name} ({rural_id.short()}, verified)" in text
            assert app.is_running


# The bar above the image has a fast path that builds its segments by hand instead of
# through Rich (tui.widgets.overlay.one_line_segments): a peer's study text must not reach
# the terminal through it as an escape, a bidi override or a line longer than the bar.
HOSTILE_BAR_TEXT = (
    "\x1b[2J\x1b]52;c;cHduZWQ=\x07",
    "PATIENT\u202eFDP.exe",
    "[bold red]not markup[/]",
    "\u200b" * 10,
    "頭部CT" * 40,
    "x" * 500,
    "tab\there",
    "line\nbreak",
)


@pytest.mark.parametrize("text", HOSTILE_BAR_TEXT)
def test_the_top_bars_fast_path_never_passes_a_hostile_text_through(text: str) -> None:
    from rich.cells import cell_len

    from tui.widgets.overlay import one_line_segments

    width = 120
    for left, centre, right in ((text, "A", "Se 2"), ("PATIENT", "A", text), (text, "", text)):
        segments = one_line_segments(left, centre, right, width)
        if segments is None:  # the table path, which takes the sanitised text
            continue
        drawn = "".join(s.text for s in segments if not s.control)
        assert drawn.rstrip("\n").isprintable()
        assert cell_len(drawn.rstrip("\n")) == width
    assert one_line_segments("PATIENT", "A", "Se 2", width) is not None  # canary: it is used


@pytest.mark.parametrize(
    "name", ["頭部CT" * 40, "a\u0301\u200b" * 30, "x頭" * 9, "😀" * 3 + "\u202e", "頭"]
)
def test_double_and_zero_width_labels_keep_every_row_as_wide_as_the_view(name: str) -> None:
    """A peer's name over half-blocks and over a kitty image: the row the terminal gets is
    exactly the view's width whatever the name's characters' widths (each label starts on
    the cell another may cover, and one lands on the last cell)."""
    from rich.style import Style

    from tui.halfblock import HalfBlockRenderer, label_cells, labels_by_row
    from tui.widgets.protocol_image import PLACEHOLDER_CODEPOINTS, KittyImage

    width, style = 30, Style(color="#ff00ff")
    labels = {
        **label_cells(name, 0, 3, style, width),
        **label_cells(name, 0, 4, style, width),  # over the second half of a wide cell
        **label_cells("頭", 0, width - 1, style, width),  # no room for two cells
    }
    row = labels_by_row(labels, 1, width)[0]
    renderer = HalfBlockRenderer()
    keys = renderer.keys(np.full((2, width), 90, dtype=np.uint8))
    renderer.prepare(keys)
    cell = "\U0010eeee" + "\u0305" * (PLACEHOLDER_CODEPOINTS - 1)  # kitty's, one cell wide
    placeholder = Segment(cell * width, Style())
    for strip in (renderer.row(keys[0], row), KittyImage.row([placeholder], 0, width, row)):
        drawn = [seg.text for seg in strip]
        assert sum(cell_len(text) for text in drawn) == width, drawn
        assert_clean("".join(drawn))
