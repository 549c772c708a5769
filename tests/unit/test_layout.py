"""The package's layout rules, read from the source: no module-level import cycle, and paho / fedml are
imported only in transport/ (the one place that talks MQTT)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "fedpeft_edge"


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports run when the module loads (not those in functions or under TYPE_CHECKING)."""
    out: list[ast.Import | ast.ImportFrom] = []
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for n in node.body if isinstance(node, (ast.If, ast.Try)) else [node]:
            if isinstance(n, (ast.Import, ast.ImportFrom)):
                out.append(n)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps: set[str] = set()
        for n in _top_level_imports(ast.parse(path.read_text())):
            if isinstance(n, ast.ImportFrom) and n.module:
                for a in n.names:
                    deps.add(f"{n.module}.{a.name}" if f"{n.module}.{a.name}" in mods else n.module)
            elif isinstance(n, ast.Import):
                deps.update(a.name for a in n.names)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_level_import_cycle() -> None:
    assert _cycles(_graph()) == []


def test_only_transport_imports_paho_or_fedml() -> None:
    offenders = []
    for name, path in _modules().items():
        if name.startswith("fedpeft_edge.transport"):
            continue
        for n in ast.walk(ast.parse(path.read_text())):  # lazy imports in functions too
            if not isinstance(n, (ast.Import, ast.ImportFrom)):
                continue
            names = [n.module or ""] if isinstance(n, ast.ImportFrom) else [a.name for a in n.names]
            if any(x.split(".")[0] in ("paho", "fedml") for x in names):
                offenders.append(name)
    assert offenders == []
