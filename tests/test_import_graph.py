"""Imports run downhill: no module of pacsys or workers imports a module that imports it back,
not even for type checking only or inside a function (a circle there is one a reader has to
untangle all the same). The one exception is the release-compatible lazy re-export of the
callback types: `pacsys.types.__getattr__` imports `pacsys.backends._subscription`."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _modules() -> dict[str, Path]:
    found = {}
    for package in ("pacsys", "workers"):
        for path in (ROOT / package).rglob("*.py"):
            if "_proto" in path.parts:  # generated code
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


# (module, function) whose imports are not counted: the pacsys release exports the callback
# types from pacsys.types, which the subscription module itself imports.
LAZY_REEXPORTS = {("pacsys.types", "__getattr__")}


def _imported(tree: ast.Module, name: str, is_package: bool) -> set[str]:
    """Module names a module imports anywhere: at module level, under `if TYPE_CHECKING:`, in functions."""
    names: set[str] = set()

    def visit(nodes: list[ast.AST]) -> None:
        for node in nodes:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and (name, node.name) in LAZY_REEXPORTS:
                continue
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level:
                    base = name.split(".")
                    base = base[: len(base) - node.level + (1 if is_package else 0)]
                    module = ".".join([*base, module] if module else base)
                names.add(module)
                names.update(f"{module}.{alias.name}" for alias in node.names)
            visit(list(ast.iter_child_nodes(node)))

    visit(list(tree.body))
    return names


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        edges = set()
        for imported in _imported(ast.parse(path.read_text()), name, path.name == "__init__.py"):
            while imported and imported not in modules:  # `from pkg.mod import Class`: pkg.mod
                imported = imported.rpartition(".")[0]
            while imported:  # importing a.b.c runs a and a.b first (our own packages excepted)
                if imported != name and imported not in ancestors:
                    edges.add(imported)
                imported = imported.rpartition(".")[0]
        graph[name] = edges
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def test_no_import_circle():
    graph = _graph()
    assert "pacsys.types" in graph and "workers.pool" in graph
    assert _circles(graph) == []


def test_the_circle_finder_finds_one():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_callback_types_are_still_importable_where_the_release_has_them():
    from pacsys.backends import ReadingCallback
    from pacsys.types import ErrorCallback
    from pacsys.types import ReadingCallback as FromTypes

    assert FromTypes is ReadingCallback and ErrorCallback is not None
