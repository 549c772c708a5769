"""The package's layout rules, read from the source: no import cycle between modules or between packages (lazy
imports in functions and under TYPE_CHECKING included: hiding a cycle in a function does not remove it), the
layers point down (protocol does not import transport; peft and metering do not import wire; strategies do not
import the codec), and paho / fedml are imported only in transport/ (the one place that talks MQTT)."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "fedpeft_edge"


@functools.cache
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


def _all_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import in the module: at load, in functions, under TYPE_CHECKING."""
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


@functools.cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


def _graph(lazy: bool = False) -> dict[str, set[str]]:
    """Module -> the package modules it imports (`lazy`: wherever the import stands, else at load only)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps: set[str] = set()
        tree = _tree(path)
        for n in _all_imports(tree) if lazy else _top_level_imports(tree):
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


def _package(module: str) -> str:
    """The package a module belongs to: fedpeft_edge.<first part> (a top-level module is its own)."""
    return ".".join(module.split(".")[:2])


def _package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for mod, deps in graph.items():
        out.setdefault(_package(mod), set()).update(_package(d) for d in deps if _package(d) != _package(mod))
    return out


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _package_graph({"fedpeft_edge.x.a": {"fedpeft_edge.y.b", "fedpeft_edge.x.c"},
                           "fedpeft_edge.y.b": {"fedpeft_edge.x.c"}, "fedpeft_edge.x.c": set()}) == \
        {"fedpeft_edge.x": {"fedpeft_edge.y"}, "fedpeft_edge.y": {"fedpeft_edge.x"}}


def test_the_lazy_graph_sees_imports_in_functions_and_under_type_checking() -> None:
    lazy = _graph(lazy=True)
    assert all(lazy[m] >= deps for m, deps in _graph().items())
    tree = ast.parse("if TYPE_CHECKING:\n    import a\ndef f():\n    import b\nimport c\n")
    assert [ast.unparse(n) for n in _top_level_imports(tree)] == ["import c"]
    assert sorted(ast.unparse(n) for n in _all_imports(tree)) == ["import a", "import b", "import c"]


def test_no_module_level_import_cycle() -> None:
    assert _cycles(_graph()) == []


def test_no_import_cycle_between_modules_lazy_imports_included() -> None:
    assert _cycles(_graph(lazy=True)) == []


def test_no_import_cycle_between_packages_lazy_imports_included() -> None:
    assert _cycles(_package_graph(_graph(lazy=True))) == []


# (importer, imported): a lower layer never imports a higher one, not even lazily.
_FORBIDDEN = (
    ("fedpeft_edge.protocol", "fedpeft_edge.transport"),
    ("fedpeft_edge.wire", "fedpeft_edge.transport"),
    ("fedpeft_edge.peft", "fedpeft_edge.wire"),
    ("fedpeft_edge.metering", "fedpeft_edge.wire"),
    ("fedpeft_edge.server.strategy", "fedpeft_edge.wire"),  # strategies see tensors, not codec types
)


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_layers_point_down() -> None:
    offenders = sorted(f"{mod} -> {dep}" for mod, deps in _graph(lazy=True).items() for dep in deps
                       for low, high in _FORBIDDEN if _within(mod, low) and _within(dep, high))
    assert offenders == []


def test_only_transport_imports_paho_or_fedml() -> None:
    offenders = []
    for name, path in _modules().items():
        if name.startswith("fedpeft_edge.transport"):
            continue
        for n in ast.walk(_tree(path)):  # lazy imports in functions too
            if not isinstance(n, (ast.Import, ast.ImportFrom)):
                continue
            names = [n.module or ""] if isinstance(n, ast.ImportFrom) else [a.name for a in n.names]
            if any(x.split(".")[0] in ("paho", "fedml") for x in names):
                offenders.append(name)
    assert offenders == []
