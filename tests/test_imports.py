"""The floors of the package (README "Layout"): the import graph of dsv3 has no cycle, and the
lower floors never import the upper ones. Imports inside functions count as much as top-level ones:
a late import hides a cycle, it does not remove it.

    python -m pytest tests/test_imports.py
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "dsv3"

# package (or top-level module) -> the packages it must never import
FORBIDDEN = {
    "dsv3.config": ("dsv3.model", "dsv3.kernels", "dsv3.checkpoints", "dsv3.training", "dsv3.inference",
                    "dsv3.distributed", "dsv3.posttrain", "dsv3.cli"),
    "dsv3.kernels": ("dsv3.model", "dsv3.checkpoints", "dsv3.training", "dsv3.inference", "dsv3.distributed",
                     "dsv3.posttrain", "dsv3.cli"),
    "dsv3.model": ("dsv3.checkpoints", "dsv3.training", "dsv3.inference", "dsv3.distributed", "dsv3.posttrain",
                   "dsv3.cli", "torch.distributed"),
    # arithmetic accounting and memory checks: they never build a model (issue 13: 10^12 layers cost nothing)
    "dsv3.info": ("dsv3.model", "dsv3.kernels", "dsv3.checkpoints", "dsv3.training", "dsv3.inference",
                  "dsv3.distributed", "dsv3.posttrain", "dsv3.cli"),
    "dsv3.memory": ("dsv3.model", "dsv3.kernels", "dsv3.checkpoints", "dsv3.training", "dsv3.inference",
                    "dsv3.distributed", "dsv3.posttrain", "dsv3.cli"),
    "dsv3.tokenizer": ("dsv3.model", "dsv3.training", "dsv3.inference", "dsv3.distributed", "dsv3.posttrain"),
    "dsv3.checkpoints": ("dsv3.training", "dsv3.inference", "dsv3.distributed", "dsv3.posttrain", "dsv3.cli"),
    "dsv3.inference": ("dsv3.training", "dsv3.distributed", "dsv3.posttrain", "dsv3.cli"),
    "dsv3.training": ("dsv3.inference", "dsv3.posttrain", "dsv3.cli"),
    "dsv3.distributed": ("dsv3.inference", "dsv3.posttrain", "dsv3.cli"),
}


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the dsv3 (and torch.distributed) modules it imports anywhere in its source."""
    mods = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps: set[str] = set()
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                # `from dsv3.x import y`: y may be a submodule
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for t in targets:
                if t.startswith("dsv3") or t.startswith("torch.distributed"):
                    deps.add(t)
        deps.discard(name)
        graph[name] = deps
    return graph


def _within(mod: str, pkg: str) -> bool:
    return mod == pkg or mod.startswith(pkg + ".")


def test_no_import_cycle():
    graph = {m: {d for d in deps if d in import_graph_modules()} for m, deps in import_graph().items()}
    # package __init__ re-exports are edges too; a cycle through them is still a cycle
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def import_graph_modules() -> set[str]:
    return {_module_name(p) for p in ROOT.rglob("*.py")}


def test_floors():
    bad = []
    for mod, deps in import_graph().items():
        for floor, banned in FORBIDDEN.items():
            if not _within(mod, floor):
                continue
            for d in deps:
                for b in banned:
                    if _within(d, b):
                        bad.append(f"{mod} imports {d} ({floor} must not import {b})")
    assert not bad, "\n".join(sorted(bad))


def test_the_checker_sees_edges():
    """The graph is not empty and finds a known edge (a checker that parses nothing passes anything)."""
    g = import_graph()
    assert "dsv3.model.transformer" in g["dsv3.checkpoints.hf"]
    assert "dsv3.tokenizer" in g["dsv3.inference.engine"]
