"""The code's layout: no import cycle among frrn_dist's modules, and no .py file too long to hold in one's head.

Imports are read with `ast`, not by importing: every `import` / `from ... import` counts wherever it stands (module
level, inside a function, under `if TYPE_CHECKING:`), because a cycle that only a lazy import keeps from failing
is still two modules that each need the other. `from pkg import name` is an edge to the module pkg.name when there
is one, else to pkg. Importing a submodule runs its package's __init__ too, but that implicit edge is not counted:
a package that re-exports its submodules would otherwise always be a cycle.

    python tests/test_layout.py    # prints the import graph's cycles and the long files
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "frrn_dist"
MAX_LINES = 500
LINE_CHECKED = ("frrn_dist", "launch", "benchmarks")


def module_names(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under root/package (a package is named by its __init__.py)."""
    names = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is one of our modules (None for numpy, torch, ...)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Our modules that `module` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from its package (or from the package itself for an __init__.py)
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found |= {m for m in (_resolve(t, modules) for t in targets) if m is not None and m != module}
    return found


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    modules = module_names(root, package)
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) through every strongly connected group of more than one module (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v: str) -> None:  # recursion depth = longest import chain: a few dozen at most
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(group, graph) for group in groups]


def _cycle_in(group: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest path from the group's first module back to itself, staying inside the group (BFS)."""
    start = min(group)
    paths = {w: [start, w] for w in sorted(graph[start] & group)}
    frontier = list(paths)
    while start not in paths:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return paths[start]


def long_files(root: Path = ROOT, folders=LINE_CHECKED, max_lines: int = MAX_LINES) -> dict[str, int]:
    """'folder/file.py' -> line count, for every .py file over max_lines lines."""
    counts = {}
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            n = len(path.read_text().splitlines())
            if n > max_lines:
                counts[str(path.relative_to(root))] = n
    return counts


def test_no_import_cycle_in_frrn_dist():
    graph = import_graph()
    assert len(graph) > 20 and "frrn_dist.data.loaders" in graph  # really read the package
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_cycles(tmp_path: Path):
    """On a package written here: a module-level cycle, a function-level one through a relative import, and a
    package that re-exports its submodules (not a cycle)."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "import pkg.b\n",
        "b.py": "from pkg import c\n",
        "c.py": "import numpy\ndef f():\n    from pkg.a import thing\n",
        "d.py": "def g():\n    from .e import h\n",
        "e.py": "from . import d\n",
        "sub/__init__.py": "from pkg.sub.x import y\nfrom .z import w\n",
        "sub/x.py": "import os\n",
        "sub/z.py": "from pkg.sub import x\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.sub"] == {"pkg.sub.x", "pkg.sub.z"} and graph["pkg.sub.z"] == {"pkg.sub.x"}
    assert sorted(find_cycles(graph)) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"], ["pkg.d", "pkg.e", "pkg.d"]]


def test_no_python_file_over_500_lines():
    assert long_files() == {}


MAX_FUNCTION_LINES = 100


def long_functions(root: Path = ROOT, folders=("frrn_dist", "launch", "benchmarks")) -> dict[str, int]:
    """'file:function' -> lines, for every function or method longer than MAX_FUNCTION_LINES."""
    found = {}
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_FUNCTION_LINES:
                        found[f"{path.relative_to(root)}:{node.name}"] = n
    return found


def test_no_function_over_100_lines(tmp_path: Path):
    assert long_functions() == {}
    (tmp_path / "pkg").mkdir()
    body = "def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES
    (tmp_path / "pkg" / "m.py").write_text(body)
    assert long_functions(tmp_path, ("pkg",)) == {"pkg/m.py:f": MAX_FUNCTION_LINES + 1}


def test_the_line_count_sees_long_files(tmp_path: Path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "short.py").write_text("x = 1\n" * MAX_LINES)
    (tmp_path / "pkg" / "long.py").write_text("x = 1\n" * (MAX_LINES + 1))
    assert long_files(tmp_path, ("pkg",)) == {"pkg/long.py": MAX_LINES + 1}


if __name__ == "__main__":
    for cycle in find_cycles(import_graph()):
        print("cycle:", " -> ".join(cycle))
    for name, n in long_files().items():
        print(f"{name}: {n} lines (> {MAX_LINES})")
