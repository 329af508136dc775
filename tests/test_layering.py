"""Imports point one way: crypto <- node core <- registry <- peer_transport <- consult
<- runtime/CLI <- tui (../shared/DESIGN.md). Parsed from source, so it checks every module."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("crypto", "node", "registry", "peer_transport", "consult", "tui")
TOP_LAYER_NODE_MODULES = (
    "node.runtime",
    "node.workflow",
    "node.cli",
    "node.commands",
    "node.demo",
    "node.transfers",
    "node.control",
    "node.alerts",
    "node.guests",
    "node.retention",
)
# The CLI commands that open the TUI are the only places allowed to reach up into it.
ALLOWED_UPWARD = {("node.commands.tui", "tui"), ("node.commands.demo", "tui")}
# aiortc and zeroconf each have exactly one home.
SINGLE_IMPORTERS = {"aiortc": "peer_transport.rtc", "zeroconf": "registry.mdns"}


def layer(module: str) -> int:
    top = module.split(".")[0]
    if top == "node":
        if any(module == m or module.startswith(m + ".") for m in TOP_LAYER_NODE_MODULES):
            return 5
        return 1
    return {"crypto": 0, "registry": 2, "peer_transport": 3, "consult": 4, "tui": 6}[top]


def modules() -> list[tuple[str, Path]]:
    found: list[tuple[str, Path]] = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(p for p in parts if p != "__init__")
            found.append((name, path))
    return found


def imports_of(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    result: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            result.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            result.append((node.module, node.lineno))
    return result


def test_imports_point_one_way() -> None:
    violations = []
    for name, path in modules():
        own = layer(name)
        for imported, line in imports_of(path):
            if imported.split(".")[0] not in PACKAGES:
                continue
            if layer(imported) > own and (name, imported.split(".")[0]) not in ALLOWED_UPWARD:
                violations.append(f"{path.relative_to(ROOT)}:{line} {name} imports {imported}")
    assert not violations, "upward imports:\n" + "\n".join(violations)


def test_crypto_does_no_io() -> None:
    forbidden = {"socket", "asyncio", "aiohttp", "sqlite3", "subprocess", "os.path", "pathlib"}
    for name, path in modules():
        if name.split(".")[0] != "crypto":
            continue
        for imported, line in imports_of(path):
            assert imported not in forbidden, f"{path}:{line} crypto imports {imported}"


def test_aiortc_and_zeroconf_each_imported_by_one_module() -> None:
    for library, home in SINGLE_IMPORTERS.items():
        importers = {
            name
            for name, path in modules()
            for imported, _ in imports_of(path)
            if imported.split(".")[0] == library
        }
        assert importers <= {home}, f"{library} imported outside {home}: {importers - {home}}"


def test_layering_check_sees_a_violation() -> None:
    """Guard the guard: an upward import is classified as one."""
    assert layer("crypto.identity") < layer("node.store") < layer("registry.server")
    assert layer("node.cli") > layer("consult.requests")
    assert layer("tui.app") > layer("node.runtime")
