"""The package's layout: subpackages by concern, layered, with no import cycle.

Every ``import`` counts, the ones inside functions too: a lazy import may save start-up time, but
never hides a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

SRC = REPO / "src"
# lowest first: a subpackage imports from its own layer and the ones before it only
LAYERS = ("models", "data", "method", "train", "tools", "demo")
TOP_LEVEL = {"vlsi", "vlsi.errors", "vlsi.files", "vlsi.cli_types"}  # shared by every layer


def _modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "vlsi").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(path: Path, package: str) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of every vlsi name ``path`` imports, nested imports included."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names += [(node.lineno, f"{base}.{a.name}") for a in node.names] + [(node.lineno, base)]
    return [(line, name) for line, name in names if name == "vlsi" or name.startswith("vlsi.")]


def _graph() -> dict[str, set[str]]:
    modules = _modules()

    def owner(name: str) -> str:
        while name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        graph[module] = {owner(name) for _, name in _imports(path, package)} - {module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle() -> None:
    assert _cycles(_graph()) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_subpackages_import_only_their_layer_and_below() -> None:
    wrong = []
    for module, path in _modules().items():
        layer = module.split(".")[1] if module.count(".") else ""
        if layer not in LAYERS:
            continue
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for line, name in _imports(path, package):
            other = name.split(".")[1] if name.count(".") else ""
            if other == "cli" or (other in LAYERS and LAYERS.index(other) > LAYERS.index(layer)):
                wrong.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert wrong == []


def test_every_module_lives_in_a_subpackage_or_is_shared() -> None:
    flat = {m for m in _modules() if m.count(".") == 1 and m.split(".")[1] not in LAYERS}
    assert flat <= TOP_LEVEL | {"vlsi.cli"}


def test_every_import_names_an_existing_module() -> None:
    """Lazy imports run only when their function does: a stale module path is caught here."""
    modules = _modules()
    files = [*(SRC / "vlsi").rglob("*.py"), *(REPO / "tests").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py"),
             *(REPO / "examples").rglob("*.py")]
    stale = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            stale += [f"{path.relative_to(REPO)}:{node.lineno} {name}" for name in names
                      if (name == "vlsi" or name.startswith("vlsi.")) and name not in modules]
    assert stale == []
