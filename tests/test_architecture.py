"""The house rules of osp's layout, checked on the source (every import, function-level ones included):
no import cycles, library code never imports the command line, and the plain-PyTorch layers import neither
Lightning, Hydra nor the training package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "osp"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py") if "modeling" not in p.relative_to(ROOT).parts}


def imports_of(name: str) -> set[str]:
    """Every module `name` imports anywhere in its body (absolute names; `from pkg import sub` counts sub)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES)
    return found


GRAPH = {name: {m for m in imports_of(name) if m in MODULES and m != name} for name in MODULES}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components with more than one module (import cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_the_checker_finds_a_cycle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_not_even_lazy_ones():
    # A package and the modules it re-exports point at each other by nature; those edges are left out.
    graph = {name: {m for m in deps if not name.startswith(m + ".")} for name, deps in GRAPH.items()}
    assert strongly_connected(graph) == []


def test_library_code_never_imports_the_command_line():
    offenders = {name for name, deps in GRAPH.items()
                 if not (name == "osp.__main__" or name.startswith("osp.cli")) and any(
                     d == "osp.cli" or d.startswith("osp.cli.") for d in deps)}
    assert offenders == set()


@pytest.mark.parametrize("layer", ["osp.model", "osp.optim", "osp.metrics", "osp.quant"])
def test_plain_pytorch_layers_import_no_framework(layer):
    """The model does not know Lightning; Lightning does not know the kernels (DESIGN.md)."""
    for name in (n for n in MODULES if n == layer or n.startswith(layer + ".")):
        forbidden = {m for m in imports_of(name) if m.split(".")[0] in ("lightning", "hydra")
                     or m.startswith(("osp.training", "osp.cli", "osp.bench"))}
        assert forbidden == set(), name
