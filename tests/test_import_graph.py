"""No import cycle inside ``src/sparseattn``, counting function-level (lazy) imports too.

The graph is read from the source (AST), not from ``sys.modules``: every ``import`` / ``from ... import``
statement of a module, at any depth (inside functions, methods, ``try`` and ``if`` blocks), is an edge
to the module it names (``from pkg import name`` goes to ``pkg.name`` when that is a module, else to
``pkg``). Imports under ``if TYPE_CHECKING:`` are not executed and are left out (their ``else:`` branch
is kept). A package's ``__init__`` running before its modules is not an edge: only the statements count.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, tuple[Path, bool]]:
    mods: dict[str, tuple[Path, bool]] = {}
    for path in sorted((SRC / "sparseattn").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(tree: ast.AST, module: str, is_pkg: bool, mods: dict[str, tuple[Path, bool]]) -> list[tuple[str, int]]:
    """(imported module, line) of every import statement executed by some path through ``module``."""
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for stmt in node.orelse:  # the else branch runs; the TYPE_CHECKING body never does
                visit(stmt)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            record(node)
        else:
            for child in ast.iter_child_nodes(node):
                visit(child)

    def record(node: ast.Import | ast.ImportFrom) -> None:
        if isinstance(node, ast.Import):
            found.extend((a.name, node.lineno) for a in node.names)
            return
        if node.level:  # relative: from the package of this module, level - 1 packages up
            base = module.split(".") if is_pkg else module.split(".")[:-1]
            src = ".".join(base[:len(base) - (node.level - 1)] + ([node.module] if node.module else []))
        else:
            src = node.module or ""
        # ``from pkg import name``: the module ``pkg.name`` when there is one, else ``pkg`` itself
        found.extend((f"{src}.{a.name}" if f"{src}.{a.name}" in mods else src, node.lineno) for a in node.names)

    visit(tree)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    """``{module: {imported sparseattn module: first line}}`` for every module of ``src/sparseattn``."""
    mods = _modules()

    def resolve(name: str) -> str | None:  # ``import a.b.c`` of a name inside a module: that module
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {}
    for mod, (path, is_pkg) in mods.items():
        edges: dict[str, int] = {}
        for name, line in _imported(ast.parse(path.read_text(encoding="utf-8"), str(path)), mod, is_pkg, mods):
            target = resolve(name) if name == "sparseattn" or name.startswith("sparseattn.") else None
            if target and target != mod:
                edges.setdefault(target, line)
        graph[mod] = edges
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]`` (depth-first search), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                got = visit(nxt)
                if got:
                    return got
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            got = visit(start)
            if got:
                return got
    return None


def test_graph_sees_lazy_imports():
    graph = import_graph()
    assert len(graph) > 50
    # function-level imports are edges: the registry's users import it lazily
    assert "sparseattn.ops.registry" in graph["sparseattn.ops.decode"]
    # the package wires the built-in operators into the registry; the registry imports neither
    assert {"sparseattn.ops.registry", "sparseattn.ops._builtin_ops"} <= set(graph["sparseattn.ops"])
    assert "sparseattn.ops._builtin_ops" not in graph["sparseattn.ops.registry"]


def test_find_cycle_reports_one():
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {}}) is None


def test_no_import_cycle():
    graph = import_graph()
    cycle = find_cycle(graph)
    if cycle:
        steps = [f"{a} (line {graph[a][b]}) -> {b}" for a, b in zip(cycle, cycle[1:])]
        print("import cycle:\n  " + "\n  ".join(steps))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
