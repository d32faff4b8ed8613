"""The package's import graph has no cycle: every module can be read bottom-up.

Walks every ``import`` statement of every module (top-level and inside functions, since a
lazy import is still an arrow) with the standard library's ``ast`` and fails on any strongly
connected set of modules. ``from X import Y`` points at ``X.Y`` when that is a module,
else at ``X``. A submodule's implicit import of its own package ``__init__`` is not counted:
a package that re-exports its children is the ordinary layout, and Python runs the
``__init__`` first.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dermaclass"


def module_names(root: Path = PACKAGE) -> dict[str, Path]:
    names = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``name`` imports (anywhere in its body)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
    found = set()
    for t in targets:
        while t and t not in modules:
            t = t.rpartition(".")[0]
        if t and t != name:
            found.add(t)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected sets of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def package_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def test_the_package_has_no_import_cycle() -> None:
    graph = package_graph()
    found = cycles(graph)
    detail = "; ".join(
        " <-> ".join(c) + " (" + ", ".join(f"{v} -> {sorted(set(graph[v]) & set(c))}" for v in c) + ")" for c in found
    )
    assert not found, f"import cycles: {detail}"


def test_the_walk_finds_a_cycle_and_resolves_relative_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "dermaclass"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from dermaclass.sub import b\n")  # lazy: still an arrow
    (pkg / "sub" / "b.py").write_text("from . import c\n")
    (pkg / "sub" / "c.py").write_text("from ..a import f\nimport numpy\n")
    modules = module_names(pkg)
    graph = {n: imports_of(n, p, set(modules)) for n, p in modules.items()}
    assert graph["dermaclass.sub.b"] == {"dermaclass.sub.c"} and graph["dermaclass.sub.c"] == {"dermaclass.a"}
    assert cycles(graph) == [["dermaclass.a", "dermaclass.sub.b", "dermaclass.sub.c"]]
    (pkg / "sub" / "c.py").write_text("import numpy\n")
    graph = {n: imports_of(n, p, set(modules)) for n, p in modules.items()}
    assert cycles(graph) == []


def test_the_serving_package_points_down() -> None:
    """refer, backends and combine import nothing else of serving; the Predictor imports neither
    export nor refit."""
    graph = package_graph()
    serving = {m for m in graph if m.startswith("dermaclass.serving.")}
    assert graph["dermaclass.serving.refer"] & serving == set()
    assert graph["dermaclass.serving.backends"] & serving == set()
    assert graph["dermaclass.serving.combine"] & serving == set()
    assert graph["dermaclass.serving.predictor"] & serving == {
        "dermaclass.serving.backends",
        "dermaclass.serving.combine",
        "dermaclass.serving.explain",
        "dermaclass.serving.refer",
    }


def test_no_private_name_is_imported_across_modules() -> None:
    """A leading underscore means "this module's own": another module importing it says the
    name belongs somewhere shared, under a public name."""
    found = []
    for path in [*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "benchmarks").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in {"dermaclass", "common"}:
                found += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]  # fmt: skip
    assert not found, found
