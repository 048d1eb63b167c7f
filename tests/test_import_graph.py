"""Imports run downhill, and the parts stay apart.

- No circle: no module of pacsys or workers imports a module that imports it back, not even
  for type checking only or inside a function (a circle there is one a reader has to
  untangle all the same). The one exception is the release-compatible lazy re-export of the
  callback types: `pacsys.types.__getattr__` imports `pacsys.backends._subscription`.
- The worker runtime (`workers/`) imports nothing of `pacsys`: a worker may run under
  another interpreter whose `pacsys` is the release's.
- The front's pool (`pacsys/pool/`) never imports the gRPC service (`pacsys.supervised`).
- No module is longer than 700 lines, but the DRF grammar (`pacsys/drf.py`).
"""

import ast
import functools
import subprocess
import sys
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


@functools.cache
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


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for imported in graph[todo.pop()]:
            if imported not in seen:
                seen.add(imported)
                todo.append(imported)
    return seen


def test_no_import_circle():
    graph = _graph()
    assert "pacsys.types" in graph and "pacsys.pool.pool" in graph
    assert _circles(graph) == []


def test_the_worker_runtime_imports_nothing_of_pacsys():
    graph = _graph()
    runtime = [name for name in graph if name.split(".")[0] == "workers"]
    assert "workers.worker" in runtime and "workers.backend_spec" in runtime
    for name in runtime:
        assert not {m for m in _reachable(graph, name) if m.startswith("pacsys")}, name


def test_the_pool_never_imports_the_grpc_service():
    graph = _graph()
    pool = [name for name in graph if name == "pacsys.pool" or name.startswith("pacsys.pool.")]
    assert "pacsys.pool.calls" in pool and "pacsys.pool.supervision" in pool
    for name in pool:
        assert not {m for m in _reachable(graph, name) if m.startswith("pacsys.supervised")}, name
    # and so importing it loads no gRPC server
    code = "import sys, pacsys.pool; print(sorted({m.split('.')[0] for m in sys.modules} & {'grpc', 'grpc_health'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out


def test_no_module_is_longer_than_700_lines_but_the_drf_grammar():
    long = {
        str(path.relative_to(ROOT)): n
        for path in _modules().values()
        if (n := len(path.read_text().splitlines())) > 700 and path != ROOT / "pacsys" / "drf.py"
    }
    assert long == {}


def test_the_circle_finder_finds_one_also_through_a_function_level_import():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    tree = ast.parse("def f():\n    import x.y\n")
    assert "x.y" in _imported(tree, "m", False)


def test_the_callback_types_are_still_importable_where_the_release_has_them():
    from pacsys.backends import ReadingCallback
    from pacsys.types import ErrorCallback
    from pacsys.types import ReadingCallback as FromTypes

    assert FromTypes is ReadingCallback and ErrorCallback is not None
