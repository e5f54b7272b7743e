"""The import graph of ``cnnkit``: no cycles, and no module imports a higher floor.

The graph is read from the source with :mod:`ast`, not by importing: every ``import``
and ``from ... import`` in every module under ``src/cnnkit``, including those inside
functions, with relative imports resolved. ``import cnnkit.a.b`` and
``from cnnkit.a import b`` are edges to the module ``cnnkit.a.b`` when it exists, else
to the package ``cnnkit.a`` (its ``__init__``), whose name ``b`` is then imported.

Floors (docs/architecture.md): 0 reference, _validation, _files, _shapes, windowed_sum;
1 ops, tables, runtime, kernels, _native; 2 nn, data, tying; 3 models; 4 training,
experiments, analysis, figures, report, export; 5 cli. ``cnnkit/__init__.py`` is the
public face and ``cnnkit/__main__.py`` the command's door: neither is a source of
edges. Every edge counts, including a submodule's edge into its own package's
``__init__``; no exception is needed today.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "cnnkit"

FLOORS = {
    "reference": 0,
    "_validation": 0,
    "_files": 0,
    "_shapes": 0,
    "windowed_sum": 0,
    "ops": 1,
    "tables": 1,
    "runtime": 1,
    "kernels": 1,
    "_native": 1,
    "nn": 2,
    "data": 2,
    "tying": 2,
    "models": 3,
    "training": 4,
    "experiments": 4,
    "analysis": 4,
    "figures": 4,
    "report": 4,
    "export": 4,
    "cli": 5,
}
NOT_SOURCES = {"cnnkit", "cnnkit.__main__"}
# (importer, imported): reason. Edges allowed although they climb a floor.
KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _target(name: str, modules: dict[str, Path]) -> str | None:
    """The module ``name`` is, or the nearest package above it that exists."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _edges(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            names = [f"{origin}.{alias.name}" for alias in node.names]
            if not any(name in modules for name in names):
                names = [origin]
        else:
            continue
        for name in names:
            if name == "cnnkit" or name.startswith("cnnkit."):
                target = _target(name, modules)
                if target is not None and target != module:
                    found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: _edges(name, path, modules)
        for name, path in modules.items()
        if name not in NOT_SOURCES
    }


def _floor(module: str) -> int:
    top = module.split(".")[1]
    return FLOORS[top]


def test_every_module_has_a_floor():
    unplaced = [m for m in _modules() if m not in NOT_SOURCES and m.split(".")[1] not in FLOORS]
    assert unplaced == [], f"modules with no floor (add them to FLOORS and the doc): {unplaced}"


def test_the_graph_is_read_from_real_imports():
    graph = _graph()
    # Edges that exist today, one per kind of import statement, so a parser that
    # found nothing could not pass the checks below.
    assert "cnnkit.models.spec" in graph["cnnkit.models.serialize"]  # from a.b import C
    assert "cnnkit.models._codec" in graph["cnnkit.models.spec"]  # from package import module
    assert "cnnkit.models" in graph["cnnkit.cli._common"]  # from package import name, in a function


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1 on the path being walked, 2 finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, set())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if state.get(nxt) is None:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_climbs_a_floor():
    climbs = []
    for module, targets in _graph().items():
        for target in sorted(targets):
            if target in NOT_SOURCES or (module, target) in KNOWN_EXCEPTIONS:
                continue
            if _floor(target) > _floor(module):
                climbs.append(
                    f"{module} (floor {_floor(module)}) imports {target} (floor {_floor(target)})"
                )
    assert climbs == [], "\n".join(climbs)


@pytest.mark.parametrize("edge", sorted(KNOWN_EXCEPTIONS))
def test_known_exceptions_still_exist(edge):
    module, target = edge
    assert target in _graph()[module], f"{edge} no longer imported: drop the exception"
