"""The import graph of our packages has no circle: every import statement counts, those inside
functions too (a lazy import is a dependency all the same), so each module can be read, tested
and replaced from the bottom up (wrn_large at the bottom, pipelines beside it, engine above
both). A registry's import of its built-in members by name (``importlib.import_module``:
engine.engines, pipelines.base) is not an import statement and is not seen: those members
import the registry, never the other way round."""
from __future__ import annotations

import ast
from pathlib import Path

from trainer_utils import REPO

PACKAGES = ("wrn_large", "pipelines", "engine", "detection")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def our_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}


def imports(name: str, path: Path, modules: dict) -> set[str]:
    """The modules of ours that ``name`` imports (``from pkg import mod`` counts as ``pkg.mod``
    where that is a module, else as ``pkg``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:    # a name inside a module of ours
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
                found.update(outer_packages(name, target, modules))
    return found


def outer_packages(name: str, target: str, modules: dict) -> set[str]:
    """Importing ``a.b.c`` runs ``a/b/__init__.py`` first: a dependency on package ``a.b`` for a
    module outside it (one inside is already being imported with its package)."""
    found, package = set(), target.rpartition(".")[0]
    while package:
        if package in modules and not (name + ".").startswith(package + "."):
            found.add(package)
        package = package.rpartition(".")[0]
    return found


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_circle_finder_finds_one():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_our_packages():
    modules = our_modules()
    graph = {name: imports(name, path, modules) for name, path in modules.items()}
    assert graph["engine.build"] >= {"engine.trainer", "engine.hooks", "pipelines"}  # it reads
    assert circles(graph) == []


def test_the_model_registry_depends_on_nothing_of_ours():
    modules = our_modules()
    for name, path in modules.items():
        if name.startswith("wrn_large"):
            assert all(m.startswith("wrn_large") for m in imports(name, path, modules)), name
