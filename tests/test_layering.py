"""The import graph is the architecture (README, "How the code is laid out").

Layers, lowest first; a module may import its own layer and the ones below it:

    crypto <- node.core <- node.dicom <- registry <- peer_transport <- consult
           <- node.app <- tui <- node.cli, node.demo

Parsed from source, so every module is checked, including imports inside functions.
``from pkg import mod`` counts as an import of ``pkg.mod``. Any import cycle between
modules fails, as does an upward import (also one only the type checker reads; those
alone, under ``if TYPE_CHECKING:``, run never and so make no cycle).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("crypto", "node", "registry", "peer_transport", "consult", "tui")
LAYERS = (
    ("crypto",),
    ("node.core", "node.errors", "node"),
    ("node.dicom",),
    ("registry",),
    ("peer_transport",),
    ("consult",),
    ("node.app",),
    ("tui",),
    ("node.cli", "node.demo"),
)
# aiortc and zeroconf each have exactly one home (aiortc's SCTP adapter sits beside it).
SINGLE_IMPORTERS = {
    "aiortc": {"peer_transport.rtc", "peer_transport.sctp"},
    "zeroconf": {"registry.mdns"},
}


def layer(module: str) -> int:
    """The layer of a module: the longest prefix listed in LAYERS wins."""
    best, best_len = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best < 0:
        raise ValueError(f"{module} is in no layer")
    return best


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(p for p in parts if p not in ("__init__", "__main__"))] = path
    return found


@functools.cache
def parsed(path: Path) -> ast.Module:
    """The syntax tree of one source file, parsed once for all the checks (read only)."""
    return ast.parse(path.read_text(), filename=str(path))


def _type_only(tree: ast.Module) -> set[ast.AST]:
    """The import statements under ``if TYPE_CHECKING:`` (never run)."""
    found: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in (
            "TYPE_CHECKING",
            "typing.TYPE_CHECKING",
        ):
            for inner in node.body:
                found.update(ast.walk(inner))
    return found


def imports_of(
    path: Path, known: dict[str, Path], *, type_only: bool = True
) -> list[tuple[str, int]]:
    """Modules of this project that ``path`` imports, anywhere in the file (also inside
    functions); without ``type_only``, not those only the type checker reads."""
    tree = parsed(path)
    skip = set() if type_only else _type_only(tree)
    result: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if node in skip:
            continue
        if isinstance(node, ast.Import):
            result.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                result.append((sub if sub in known else node.module, node.lineno))
    return [(m, line) for m, line in result if m.split(".")[0] in PACKAGES]


def graph() -> dict[str, set[str]]:
    """Who imports whom when the code runs (an import under ``if TYPE_CHECKING:`` runs
    never, so it makes no cycle; it still has to point down)."""
    known = modules()
    return {
        name: {m for m, _ in imports_of(path, known, type_only=False) if m in known and m != name}
        for name, path in known.items()
    }


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_imports_point_down() -> None:
    known = modules()
    violations = sorted(
        {
            f"{path.relative_to(ROOT)}:{line} {name} imports {imported}"
            for name, path in known.items()
            for imported, line in imports_of(path, known)
            if layer(imported) > layer(name)
        }
    )
    assert not violations, "upward imports:\n" + "\n".join(violations)


def test_no_import_cycles() -> None:
    found = cycles(graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_crypto_does_no_io() -> None:
    forbidden = {"socket", "asyncio", "aiohttp", "sqlite3", "subprocess", "os.path", "pathlib"}
    for name, path in modules().items():
        if name.split(".")[0] != "crypto":
            continue
        for node in ast.walk(parsed(path)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            else:
                continue
            assert not set(names) & forbidden, f"{path}:{node.lineno} crypto imports {names}"


def test_aiortc_and_zeroconf_each_imported_by_one_module() -> None:
    for library, home in SINGLE_IMPORTERS.items():
        importers = set()
        for name, path in modules().items():
            for node in ast.walk(parsed(path)):
                if isinstance(node, ast.Import):
                    tops = {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module:
                    tops = {node.module.split(".")[0]}
                else:
                    continue
                if library in tops:
                    importers.add(name)
        assert importers <= home, f"{library} imported outside {home}: {importers - home}"


def test_the_checks_see_a_violation() -> None:
    """Guard the guards: layers order as drawn, submodule imports resolve, a cycle is found."""
    assert layer("crypto.identity") < layer("node.core.audit") < layer("node.dicom.store")
    assert layer("node.dicom.store") < layer("registry.server") < layer("consult.requests")
    assert layer("consult.requests") < layer("node.app.runtime") < layer("tui.app")
    assert layer("tui.app") < layer("node.cli.consult")
    known = modules()
    assert ("node.app.consults", 1) in [
        (m, 1) for m, _ in imports_of(ROOT / "tui" / "node_facade.py", known)
    ]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    runtime_only = imports_of(ROOT / "node" / "app" / "studies.py", known, type_only=False)
    assert "node.app.runtime" in [
        m for m, _ in imports_of(ROOT / "node" / "app" / "studies.py", known)
    ]
    assert "node.app.runtime" not in [m for m, _ in runtime_only]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_readmes_layer_line_is_this_tables() -> None:
    """The README draws the layers as one line; it must say what LAYERS says."""
    readme = (ROOT / "README.md").read_text()
    [line] = [ln.strip() for ln in readme.splitlines() if ln.strip().startswith("crypto ←")]
    drawn = [tuple(part.strip() for part in layer.split(",")) for layer in line.split("←")]
    table = [tuple(p for p in prefixes if p not in ("node", "node.errors")) for prefixes in LAYERS]
    assert drawn == table


LONG_MODULE_LINES = 600


def test_a_long_module_says_why_it_is_one() -> None:
    """A newcomer reads a module whole: over 600 lines it must say in its docstring why it
    is not split ("Why one module: ...")."""
    unexplained = []
    for name, path in modules().items():
        text = path.read_text()
        if text.count("\n") > LONG_MODULE_LINES:
            doc = ast.get_docstring(parsed(path)) or ""
            if "Why one module:" not in doc:
                unexplained.append(f"{name} ({text.count(chr(10))} lines)")
    assert not unexplained, "long modules without a reason:\n" + "\n".join(unexplained)
