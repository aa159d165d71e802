"""The package's structure: no import cycle among edgeport's modules (imports inside functions count; only
``if TYPE_CHECKING:`` blocks, which never run, do not), and where the shape is heading, the size of modules."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "edgeport"


def _module(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PKG) -> dict[str, set[str]]:
    """{module: the edgeport modules it imports}, TYPE_CHECKING blocks aside."""
    files = {_module(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        unreached = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and
                     "TYPE_CHECKING" in ast.unparse(node.test) for b in node.body for n in ast.walk(b)}
        for node in ast.walk(tree):
            if id(node) in unreached:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {f for f in found if f in files and f != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 60
    assert cycles(graph) == []


def test_the_cycle_finder_finds_one(tmp_path):
    pkg = tmp_path / "edgeport"
    pkg.mkdir()
    (pkg / "a.py").write_text("def f():\n    from edgeport.b import g\n")
    (pkg / "b.py").write_text("from edgeport.a import f\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from edgeport.a import f\n")
    (pkg / "__init__.py").write_text("")
    graph = import_graph(pkg)
    assert graph["edgeport.c"] == set() and cycles(graph) == [["edgeport.a", "edgeport.b"]]


def test_no_module_over_600_lines():
    sizes = {str(p.relative_to(PKG.parent)): len(p.read_text().splitlines()) for p in PKG.rglob("*.py")}
    assert not {f: n for f, n in sizes.items() if n > 600}, sorted(sizes.items(), key=lambda kv: -kv[1])[:5]
