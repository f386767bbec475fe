"""The layering of the packages, read from the source: every import points down, and there are no cycles.

    core  <-  training  <-  engine  <-  service  <-  cli

A module may import from its own layer or a lower one; ``migrations`` sits beside ``cli`` (it reads the
service's tables). Imports inside functions and under ``TYPE_CHECKING`` count like any other.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS: dict[str, int] = {"core": 0, "training": 1, "engine": 2, "service": 3, "cli": 4, "migrations": 4}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    return {
        module_name(path, root): path
        for package in packages
        for path in sorted((root / package).rglob("*.py"))
        if "versions" not in path.parts
    }


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that ``name`` imports anywhere in its source (resolved to the deepest known module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def add(candidate: str) -> None:
        while candidate and candidate not in known:
            candidate = candidate.rpartition(".")[0]
        if candidate and candidate != name:
            found.add(candidate)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                add(full if full in known else base)
    return found


def import_graph(root: Path, packages: Iterable[str]) -> dict[str, set[str]]:
    modules = project_modules(root, packages)
    known = set(modules)
    return {name: imported_modules(name, path, known) for name, path in modules.items()}


def upward_imports(graph: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    def layer(module: str) -> int:
        return layers[module.split(".")[0]]

    return sorted(
        f"{importer} -> {imported}"
        for importer, targets in graph.items()
        for imported in targets
        if layer(imported) > layer(importer)
    )


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
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
        for w in graph.get(v, ()):
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

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_import_points_down() -> None:
    graph = import_graph(ROOT, LAYERS)
    assert len(graph) > 40, "the checker found too few modules to be looking at the project"
    assert upward_imports(graph, LAYERS) == []


def test_no_import_cycles() -> None:
    assert cycles(import_graph(ROOT, LAYERS)) == []


def test_the_checker_sees_an_upward_import_and_a_cycle(tmp_path: Path) -> None:
    (tmp_path / "low").mkdir()
    (tmp_path / "high").mkdir()
    (tmp_path / "low" / "__init__.py").write_text("")
    (tmp_path / "high" / "__init__.py").write_text("")
    (tmp_path / "low" / "a.py").write_text("def f():\n    from high.b import g\n")
    (tmp_path / "low" / "c.py").write_text("from . import d\n")
    (tmp_path / "low" / "d.py").write_text("from low import c\n")
    (tmp_path / "high" / "b.py").write_text("import low.a\n\ndef g():\n    pass\n")
    graph = import_graph(tmp_path, ["low", "high"])
    assert upward_imports(graph, {"low": 0, "high": 1}) == ["low.a -> high.b"]
    assert sorted(cycles(graph)) == [["high.b", "low.a"], ["low.c", "low.d"]]


PURE_PACKAGES = ("core", "engine")


def test_core_and_engine_import_no_web_stack_and_no_torch() -> None:
    """Import every module of the torch-free layers in one fresh interpreter and look at ``sys.modules``."""
    modules = sorted(m for m in project_modules(ROOT, PURE_PACKAGES))
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in ('fastapi', 'sqlalchemy', 'torch', 'starlette', 'service', 'cli')"
        " if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300, cwd=ROOT
    )
    assert len(modules) > 10
    assert out.stdout.strip() == "", f"importing {PURE_PACKAGES} pulled in: {out.stdout.strip()}"


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_each_layer_is_a_package(package: str) -> None:
    assert (ROOT / package).is_dir()
    if package != "migrations":
        assert (ROOT / package / "__init__.py").is_file()
