"""The package's shape: no import cycles, and one place that builds a worker.

The import graph is read from the source with ``ast`` (nothing is imported): an edge A -> B for
every ``import``/``from ... import`` of a jwtproxy module in A, at module level or inside a
function (a lazy import is still a dependency, only a later one). Imports under
``if TYPE_CHECKING:`` are annotations only; they are checked separately, with the one known
type-level cycle allowed.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "jwtproxy"

# connection.py names Gateway and RouteRuntime in annotations while gateway.py builds
# ClientConnection objects: a type-only cycle, no import-time one.
ALLOWED_TYPE_ONLY_CYCLES = {frozenset({"jwtproxy.connection", "jwtproxy.gateway"})}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for statement in node.body:
                inside.update(id(n) for n in ast.walk(statement))
    return inside


def _imported(module: str, path: Path, node: ast.Import | ast.ImportFrom, modules: dict[str, Path]) -> Iterator[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module if path.name == "__init__.py" else module.rpartition(".")[0]
            parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            base = ".".join(parts + ([base] if base else []))
        # "from pkg import sub" imports the submodule; "from mod import name" the module.
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != module:
            yield name


def import_graph(*, with_type_checking: bool) -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = set() if with_type_checking else _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skip:
                graph[module].update(_imported(module, path, node, modules))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
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
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def test_the_graph_reader_sees_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    graph = import_graph(with_type_checking=False)
    # Lazy imports count: the supervisor starts workers through a function-level import.
    assert "jwtproxy.worker" in graph["jwtproxy.supervisor"]
    assert "jwtproxy.revocation.sqlite" in graph["jwtproxy.revocation"]


def test_no_import_cycles() -> None:
    assert cycles(import_graph(with_type_checking=False)) == []


def test_no_type_level_cycles_but_the_known_one() -> None:
    found = [frozenset(c) for c in cycles(import_graph(with_type_checking=True))]
    assert [c for c in found if c not in ALLOWED_TYPE_ONLY_CYCLES] == []


def test_revocation_backends_do_not_import_their_package() -> None:
    graph = import_graph(with_type_checking=True)
    for backend in ("sqlite", "redis", "memory", "request", "core"):
        assert "jwtproxy.revocation" not in graph[f"jwtproxy.revocation.{backend}"]


def test_only_build_worker_constructs_a_gateway() -> None:
    builders = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Gateway":
                builders.append(module)
    assert builders == ["jwtproxy.worker"]
