"""The house of docs/layout.md, checked on the source: imports point down the layers only, no
module imports itself back through others (no circle, lazy imports included), and
``ume_retriever`` never imports ``ume_train``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ume_retriever", "ume_train")

# ume_retriever's layers, lowest first; a module may import its own layer and those below.
LAYERS = [
    ("ground", ("errors", "results", "fusion", "faults")),
    ("inputs", ("inputs",)),
    ("store", ("store",)),
    ("model", ("model",)),
    ("index", ("index", "ingest_points", "ray_ingest", "ray_backfill", "previews", "ingest_journal", "backfill", "query_vectors",
               "client")),
    # the framework adapters sit on the index and the encoder; the facade hands them out
    ("adapters", ("integrations",)),
    ("facade", ("retriever",)),
    ("surfaces", ("cli", "evaluation", "serve")),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (top level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import sub`` imports the submodule when there is one
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "ume_retriever" or len(parts) == 1:
        return None  # ume_train, and ume_retriever/__init__ (it re-exports the public classes)
    for rank, (_, tops) in enumerate(LAYERS):
        if parts[1] in tops:
            return rank
    raise AssertionError(f"{module} is in no layer of LAYERS: add it")


def test_the_serving_package_never_imports_training(graph):
    arrows = sorted(f"{a} -> {b}" for a, deps in graph.items() if a.startswith("ume_retriever")
                    for b in deps if b.startswith("ume_train"))
    assert arrows == []


def test_imports_point_down_the_layers(graph):
    upward = []
    for module, deps in graph.items():
        rank = _layer(module)
        if rank is None:
            continue
        for dep in deps:
            dep_rank = _layer(dep)
            if dep_rank is not None and dep_rank > rank:
                upward.append(f"{module} ({LAYERS[rank][0]}) -> {dep} ({LAYERS[dep_rank][0]})")
    assert sorted(upward) == []


def test_no_import_circle(graph):
    edges = graph
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    circles: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert circles == []


def test_the_checker_sees_an_upward_import_and_a_circle():
    """The checks above can fail: a synthetic graph with both faults is caught."""
    fake = {"ume_retriever.index": {"ume_retriever.retriever"}, "ume_retriever.retriever": {"ume_retriever.index"}}
    assert _layer("ume_retriever.index") < _layer("ume_retriever.retriever")
    with pytest.raises(AssertionError):
        test_imports_point_down_the_layers(fake)
    with pytest.raises(AssertionError):
        test_no_import_circle(fake)
