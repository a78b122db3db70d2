"""The package as a whole: no import cycle among yolozu_ttt's modules at import time (module-level
imports; those under ``TYPE_CHECKING`` are for annotations only, and imports inside functions run
later and do not count)."""
from __future__ import annotations

import ast
import importlib.util
import pathlib


def modules() -> dict[str, pathlib.Path]:
    """Every module of the package by name (the kernels are shipped from the top-level kernels/)."""
    found = {}
    for package in ("yolozu_ttt", "yolozu_ttt.kernels"):
        root = pathlib.Path(importlib.util.find_spec(package).origin).parent
        for path in root.rglob("*.py"):
            parts = [p for p in path.relative_to(root).with_suffix("").parts if p != "__init__"]
            if package == "yolozu_ttt" and parts[:1] == ["kernels"]:
                continue
            found[".".join([package, *parts])] = path
    return found


def imports_of(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    top = [n for n in tree.body if not (isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test))]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in (n for stmt in top for n in ast.walk(stmt) if not isinstance(stmt, (ast.FunctionDef, ast.ClassDef))):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            base = f"{base}.{node.module}" if node.level and node.module else (node.module if not node.level else base)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        # a module's own packages are imported before it anyway: not an edge
        out.update(t for t in targets if t in known and t != name and not name.startswith(t + "."))
    return out


def test_no_import_cycle():
    found = modules()
    graph = {name: imports_of(name, path, set(found)) for name, path in found.items()}
    assert "yolozu_ttt.methods.loop" in graph["yolozu_ttt.run"]  # the walk sees relative imports
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [node, nxt]))
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
