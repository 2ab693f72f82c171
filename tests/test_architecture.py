"""The package's layering: each sub-package imports only those below it, function-level imports included."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"

# Lowest first: a package may import itself and the packages before it, never one after it.
LAYERS = ("rows", "io", "demo", "models", "config", "evaluation", "crf", "inference", "outputs", "dag")
ENTRY_POINTS = {"cli", "job"}  # the package root: nothing inside a sub-package imports these
LEAF_ROOT = {"observability"}  # the root's Prometheus module: imports no other pipeline module


def _imports(path: Path) -> set[str]:
    """Every ``pipeline.*`` module a file imports, at any depth (function-level and TYPE_CHECKING too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pipeline"))
    return found


def _unit(module: str) -> str | None:
    """The layer or root module a dotted ``pipeline.*`` name belongs to (None: the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _edges() -> dict[tuple[str, str], list[str]]:
    edges: dict[tuple[str, str], list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        source = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for module in _imports(path):
            target = _unit(module)
            known = target is not None and ((PACKAGE / target).is_dir() or (PACKAGE / f"{target}.py").exists())
            if known and target != source:
                edges.setdefault((source, target), []).append(str(rel))
    return edges


def test_the_root_holds_entry_points_only():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == ENTRY_POINTS | LEAF_ROOT
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(LAYERS)


def test_sub_packages_import_only_downwards():
    upward = []
    for (source, target), files in sorted(_edges().items()):
        if source in LAYERS and target in LAYERS and LAYERS.index(target) > LAYERS.index(source):
            upward.append(f"{source} -> {target} ({', '.join(sorted(set(files)))})")
        if source in LAYERS and target in ENTRY_POINTS:
            upward.append(f"{source} -> root {target} ({', '.join(sorted(set(files)))})")
        if source in LEAF_ROOT and target != source:
            upward.append(f"{source} -> {target}")
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_no_module_import_cycle():
    graph: dict[str, set[str]] = {}
    names = {".".join(("pipeline", *p.relative_to(PACKAGE).with_suffix("").parts)): p for p in PACKAGE.rglob("*.py")}
    for name, path in names.items():
        name = name.removesuffix(".__init__")
        graph[name] = {m for m in _imports(path) if m in names or f"{m}.__init__" in names} - {name}
    seen: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        seen[node] = 1
        stack.append(node)
        for nxt in graph.get(node, ()):
            if seen.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in seen and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        seen[node] = 2
        return None

    for node in sorted(graph):
        if node not in seen:
            cycle = visit(node)
            assert cycle is None, " -> ".join(cycle)
