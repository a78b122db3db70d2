"""The package as a whole: no import cycle among yolozu_ttt's modules, counting module-level
imports, imports inside functions and ``importlib.import_module`` (those under ``TYPE_CHECKING`` are
for annotations only)."""
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
    """The package's modules ``name`` imports: at module level, inside functions, and through
    ``importlib.import_module`` of a literal name or of ``f"{__package__}.sub.{...}"`` (every module
    under ``sub``); those under ``TYPE_CHECKING`` (annotations only) aside."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    skipped = {id(n) for stmt in ast.walk(tree) if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test)
               for n in ast.walk(stmt)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            base = f"{base}.{node.module}" if node.level and node.module else (node.module if not node.level else base)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call) and ast.unparse(node.func) == "importlib.import_module" and node.args:
            targets = dynamic_targets(node.args[0], package, known)
        else:
            continue
        # a module's own packages are imported before it anyway: not an edge
        out.update(t for t in targets if t in known and t != name and not name.startswith(t + "."))
    return out


def dynamic_targets(arg: ast.expr, package: str, known: set[str]) -> list[str]:
    """The modules an ``importlib.import_module`` argument can name."""
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return [arg.value]
    if isinstance(arg, ast.JoinedStr) and arg.values and ast.unparse(arg.values[0]) == "{__package__}":
        prefix = package + "".join(v.value for v in arg.values[1:2] if isinstance(v, ast.Constant))
        return [m for m in known if m.startswith(prefix)]
    # any other name is computed: here only the seam's table of YOLOZU's modules, checked below
    return []


def test_no_import_cycle():
    """No module reaches one that imports it back, counting imports inside functions and through
    importlib (they run later, but are still a cycle of the design)."""
    found = modules()
    graph = {name: imports_of(name, path, set(found)) for name, path in found.items()}
    assert "yolozu_ttt.methods.loop" in graph["yolozu_ttt.run"]  # the walk sees relative imports
    assert "yolozu_ttt.methods.eata" in graph["yolozu_ttt.run"]  # and importlib's f-string names
    assert "yolozu_ttt.export" in graph["yolozu_ttt.cli"]  # and imports inside functions
    from yolozu_ttt import seam

    assert not [m for m in (*seam.PRIVATE, *seam.REBOUND) if m.startswith("yolozu_ttt")]  # the seam's names
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




def test_a_cpu_run_does_not_import_triton():
    """Importing the package and what a CPU run and the command line use, and the engine summary an
    export records in its meta (``build_info``: Triton's version from its metadata), leave Triton
    unimported (its import is ~80 ms of every export process); the kernels import it when they run."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import sys, yolozu_ttt, yolozu_ttt.run, yolozu_ttt.cli, yolozu_ttt.parallel\n"
            "from yolozu_ttt import common\n"
            "info = yolozu_ttt.build_info()\n"
            "assert 'triton' not in sys.modules, 'triton imported'\n"
            "assert (info['triton'] is not None) == common.HAVE_TRITON, info\n"
            "print(common.HAVE_TRITON)")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == str(importlib.util.find_spec("triton") is not None)


def test_each_method_is_written_once():
    """Each method file defines one class, its ``METHOD``, which both a run alone and a
    sample-parallel group step (``methods.replica.ReplicaMethod`` drives its passes over K
    replicas): no second, K-replica form of it."""
    found = modules()
    for name in ("tent", "eata", "sar", "mim", "cotta"):
        tree = ast.parse(found[f"yolozu_ttt.methods.{name}"].read_text())
        classes = [node.name for node in tree.body if isinstance(node, ast.ClassDef)]
        module = importlib.import_module(f"yolozu_ttt.methods.{name}")
        assert classes == [module.METHOD.__name__], (name, classes)
        assert not hasattr(module, "REPLICA"), name
