"""The command line as a script and a person meet it: quick to start, quiet in a pipe,
refusals in plain words, help that names the real options."""

from __future__ import annotations

import ast
import itertools
import subprocess
import sys
from pathlib import Path

import pytest

from consult.errors import IllegalTransition
from consult.requests import TRANSITIONS, Event, State, next_state, refusal
from crypto.identity import NodeId
from node.cli import main

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("aiortc", "textual", "pydicom", "pynetdicom", "highdicom", "aiohttp", "zeroconf")


def _radmesh(*args: str) -> list[str]:
    return [sys.executable, "-c", "from node.cli import run; run()", *args]


def init(home: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> NodeId:
    assert main(["--home", str(home), "init", "--no-passphrase", *extra]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("Node id:"))
    return NodeId.parse(line.split(":", 1)[1])


# -- startup: the parser and `consult list` need none of the network or imaging stack --------
def test_building_the_parser_imports_no_heavy_package() -> None:
    code = (
        "import sys, node.cli\n"
        "node.cli.build_parser()\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"imported while building the parser: {done.stdout}"


def test_consult_list_imports_no_heavy_package(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    init(tmp_path / "h", capsys)
    code = (
        "import sys\n"
        "from node.cli import main\n"
        f"code = main(['--home', {str(tmp_path / 'h')!r}, 'consult', 'list'])\n"
        f"print(code, ','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].strip() == "0", done.stdout


def _type_checking_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for stmt in ast.walk(node):
                if isinstance(stmt, ast.ImportFrom | ast.Import):
                    names.update(a.asname or a.name.split(".")[0] for a in stmt.names)
    return names


def _runtime_uses(node: ast.AST, ann: bool = False) -> set[str]:
    """Names a node reads when it runs (annotations are strings: not read)."""
    used: set[str] = set()
    if isinstance(node, ast.Name) and not ann:
        used.add(node.id)
    for field, value in ast.iter_fields(node):
        in_ann = ann or field in ("annotation", "returns")
        for child in value if isinstance(value, list) else [value]:
            if isinstance(child, ast.AST):
                used |= _runtime_uses(child, in_ann)
    return used


def _local_imports(fn: ast.AST) -> set[str]:
    return {
        a.asname or a.name.split(".")[0]
        for stmt in ast.walk(fn)
        if isinstance(stmt, ast.ImportFrom | ast.Import)
        for a in stmt.names
    }


@pytest.mark.parametrize(
    "path", sorted(p for p in (ROOT / "node" / "cli").glob("*.py") if p.stem != "__main__"), ids=str
)
def test_command_modules_import_heavy_names_where_they_run(path: Path) -> None:
    """A command module imports the heavy stack only inside the functions that need it
    (names under TYPE_CHECKING are for annotations). A handler added later that uses one
    of those names without importing it would fail only when run: this finds it."""
    tree = ast.parse(path.read_text())
    lazy = _type_checking_names(tree)
    wrong: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            at_def = set().union(
                *(_runtime_uses(d) for d in node.decorator_list),
                *(_runtime_uses(d) for d in getattr(getattr(node, "args", None), "defaults", [])),
            )
            body = set().union(*(_runtime_uses(s) for s in node.body)) - _local_imports(node)
            wrong += [f"{node.name}: {n}" for n in sorted((at_def | body) & lazy)]
        else:
            wrong += [f"line {node.lineno}: {n}" for n in sorted(_runtime_uses(node) & lazy)]
    assert not wrong, f"{path.name} uses TYPE_CHECKING-only names at run time: {wrong}"


# -- a closed pipe ends the command quietly -------------------------------------------------
@pytest.mark.parametrize("args", [("consult", "list"), ("--help",)])
def test_a_reader_that_leaves_gets_no_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: tuple[str, ...]
) -> None:
    home = tmp_path / "h"
    init(home, capsys)
    # `radmesh consult list | head -0`: the reader is gone before the first line is written.
    proc = subprocess.Popen(
        _radmesh("--home", str(home), *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) in (0, 141), err
    assert "Traceback" not in err
    assert "BrokenPipe" not in err
    assert "Exception ignored" not in err


def test_a_reader_that_reads_one_line_then_leaves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`radmesh --help | head -1`: one line read, then the pipe closes under the writer."""
    home = tmp_path / "h"
    init(home, capsys)
    proc = subprocess.Popen(
        _radmesh("--home", str(home), "consult", "list", "--all"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert first.strip() == b"No consults."
    assert proc.wait(timeout=60) in (0, 141), err
    assert "Traceback" not in err


# -- help names the options that exist ------------------------------------------------------
def test_id_help_names_the_peer_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["id", "--help"])
    text = capsys.readouterr().out
    assert "--peer-key" not in text
    assert "--peer ID" in text


# -- refusals in the user's words -----------------------------------------------------------
JARGON = ("state '", "event '", "cannot take event", "start_transfer", "in_review")


@pytest.mark.parametrize(("state", "event"), list(itertools.product(State, Event)))
@pytest.mark.parametrize("tui", [False, True])
def test_every_refusal_is_a_plain_sentence(state: State, event: Event, tui: bool) -> None:
    if (state, event) in TRANSITIONS:
        return
    text = refusal(state, event, "1234abcd", tui=tui)
    assert not any(word in text for word in JARGON), text
    assert text[0].isupper()
    assert text.endswith(".")
    situation, step = text[:-1].split("; ", 1)
    assert situation
    assert step
    if not tui:
        assert "press " not in text


def test_accepting_twice_says_it_is_accepted_and_how_to_fetch() -> None:
    assert refusal(State.ACCEPTED, Event.ACCEPT, tui=True) == (
        "This consult is already accepted; press f to fetch the study."
    )
    with pytest.raises(IllegalTransition) as info:
        next_state(State.ACCEPTED, Event.ACCEPT)
    assert str(info.value).startswith("This consult is already accepted; run `radmesh consult")
    assert (info.value.state, info.value.event) == ("accepted", "accept")


def test_fetch_before_accepting_says_accept_first_and_report_says_fetch_first() -> None:
    assert refusal(State.OFFERED, Event.START_TRANSFER, tui=True) == (
        "This consult is not accepted yet; press a to accept it first."
    )
    assert "press f to fetch the study" in refusal(State.ACCEPTED, Event.REPORT, tui=True)


def test_cli_accept_twice_is_refused_in_plain_words(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hospital, specialist = tmp_path / "hospital", tmp_path / "specialist"
    init(hospital, capsys, "--jurisdictions", "FR")
    specialist_id = init(specialist, capsys, "--subspecialties", "neuro")
    request_file = tmp_path / "req.bin"
    assert main([
        "--home", str(hospital), "consult", "request", "--study", "2.25.1",
        "--question", "Bleed?", "--priority", "stat", "--subspecialty", "neuro",
        "--jurisdiction", "FR", "--to", str(specialist_id), "--out", str(request_file),
    ]) == 0  # fmt: skip
    consult_id = capsys.readouterr().out.split()[1]
    assert main(["--home", str(specialist), "consult", "import", str(request_file)]) == 0
    accept = ["--home", str(specialist), "consult", "accept", consult_id[:8]]
    assert main([*accept, "--out", str(tmp_path / "resp.bin")]) == 0
    capsys.readouterr()
    assert main(accept) == 1
    err = capsys.readouterr().err
    assert "This consult is already accepted; run `radmesh consult fetch" in err
    assert "cannot take event" not in err


async def test_tui_pressing_a_twice_and_f_too_early_say_what_to_press(tmp_path: Path) -> None:
    from tests.consult.test_live import wait_for
    from tests.tui.test_node_facade import consult_pair, form_to
    from tui.facade import ActionError

    async with consult_pair(tmp_path, slices=2, rows=32) as (_, neuro, ask, answer, study_uid):
        await ask.request_consult(form_to(neuro, study_uid))
        await wait_for(lambda: bool(answer.consults()))
        consult_id = answer.consults()[0].consult_id
        with pytest.raises(ActionError) as early:
            answer.fetch(consult_id)  # f before a
        assert str(early.value) == "This consult is not accepted yet; press a to accept it first."
        with pytest.raises(IllegalTransition) as cli:  # `radmesh consult fetch` runs this
            await neuro.consulting.studies.fetch(consult_id)
        accept = f"`radmesh consult accept {consult_id[:8]}`"
        assert str(cli.value) == f"This consult is not accepted yet; run {accept} first."
        await answer.respond(consult_id, True)
        with pytest.raises(ActionError) as twice:
            await answer.respond(consult_id, True)  # a again
        assert str(twice.value) == "This consult is already accepted; press f to fetch the study."
