"""The pipeline's shape, checked from the source (issue 15): no import cycle inside costlens/,
and the façade (api.py) imported by the CLI and the package ``__init__`` only. Imports inside
functions count too: a lazy import that closes a cycle is a cycle all the same."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "costlens"
FACADE_USERS = {"costlens", "costlens.cli"}


def _module_names() -> dict[str, Path]:
    names = {}
    for file in PACKAGE.rglob("*.py"):
        parts = list(file.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = file
    return names


def _imported(name: str, file: Path, modules: set[str]) -> set[str]:
    """The costlens modules ``name`` imports anywhere in its body (``from a import b`` counts
    ``a.b`` when that is a module, else ``a``)."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            candidates = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules] or [base]
        else:
            continue
        found.update(c for c in candidates if c in modules and c != name)
    return found


def _import_graph() -> dict[str, set[str]]:
    names = _module_names()
    return {name: _imported(name, file, set(names)) for name, file in names.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_costlens():
    assert _cycles(_import_graph()) == []


def test_only_the_cli_and_the_package_import_the_facade():
    graph = _import_graph()
    assert {name for name, imports in graph.items() if "costlens.api" in imports} <= FACADE_USERS


# Issue 15: a docstring (with units where the result is a number) on every public definition.

def _undocumented(source: str) -> list[str]:
    """Top-level public functions and classes (name not starting with "_") without a docstring."""
    return [node.name for node in ast.parse(source).body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and not node.name.startswith("_") and not ast.get_docstring(node)]


def _undocumented_in_package() -> list[str]:
    return [f"{file.relative_to(PACKAGE).as_posix()}:{name}" for file in sorted(PACKAGE.rglob("*.py"))
            for name in _undocumented(file.read_text())]


def test_the_docstring_finder_finds_a_missing_docstring():
    source = 'def f():\n    return 1\n\ndef g():\n    """Doc."""\n\ndef _h():\n    pass\n\nclass C:\n    x: int\n'
    assert _undocumented(source) == ["f", "C"]


def test_every_public_definition_has_a_docstring():
    assert _undocumented_in_package() == []

