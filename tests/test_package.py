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


def _all_imports_of(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """Every import of ``name``'s, those inside functions included (``TYPE_CHECKING`` ones aside)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    skipped = {id(n) for stmt in ast.walk(tree) if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test)
               for n in ast.walk(stmt)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skipped or not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            base = f"{base}.{node.module}" if node.level and node.module else (node.module if not node.level else base)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        out.update(t for t in targets if t in known and t != name and not name.startswith(t + "."))
    return out


def test_no_import_cycle_through_the_command_line_and_the_export_counting_function_level_imports():
    """The command line (cli, orchestrate, flags) and the export package reach no module that
    imports them back, even through imports inside functions (they run later, but are still a
    cycle of the design)."""
    found = modules()
    graph = {name: _all_imports_of(name, path, set(found)) for name, path in found.items()}
    ours = [n for n in found if n in ("yolozu_ttt.cli", "yolozu_ttt.orchestrate", "yolozu_ttt.flags")
            or n.startswith("yolozu_ttt.export")]
    assert "yolozu_ttt.export.pipeline" in ours and "yolozu_ttt.export" in graph["yolozu_ttt.cli"]

    def reaches(start: str) -> dict[str, list[str]]:
        trail = {start: [start]}
        todo = [start]
        while todo:
            node = todo.pop()
            for nxt in sorted(graph[node]):
                if nxt not in trail:
                    trail[nxt] = trail[node] + [nxt]
                    todo.append(nxt)
        return trail

    for name in ours:
        for nxt, path in reaches(name).items():
            if nxt != name and name in graph[nxt]:
                raise AssertionError("import cycle: " + " -> ".join(path + [name]))
