"""zoo's import graph has no cycles, between modules or between packages, and an import inside a
function exists only to defer a heavy dependency, never to break a cycle.

Read from the source with `ast` (nothing is imported): every `import` statement counts, at module
level or inside a function, so an import moved into a function to hide a cycle still closes it here.
"""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Third-party packages slow to import or optional (extras): a function may import a zoo module that
# needs one, so that modules which do not need it load without it (`zoo --help` loads no torch).
HEAVY = {
    "torch",
    "torchvision",
    "numpy",
    "matplotlib",
    "diffusers",
    "modal",
    "trackio",
    "cleanfid",
    "triton",
    "sklearn",
    "huggingface_hub",
}


def module_names() -> dict[str, Path]:
    names = {}
    for path in sorted((ROOT / "zoo").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


MODULES = module_names()


def imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The names an import statement loads: `from a.b import c` loads a.b.c if that is a module."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    assert node.level == 0, "zoo uses absolute imports"
    return [
        f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module
        for alias in node.names
    ]


def zoo_module(name: str) -> str | None:
    """The zoo module an imported name belongs to (its longest known prefix)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def parse_imports() -> dict[str, list[tuple[str, bool, int]]]:
    """Module -> (imported name, at module level?, line) for each name every import statement loads."""
    imports: dict[str, list[tuple[str, bool, int]]] = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        top = {id(node) for node in tree.body}
        found = imports.setdefault(name, [])
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                found += [(target, id(node) in top, node.lineno) for target in imported(node)]
    return imports


IMPORTS = parse_imports()


def edges(at_module_level_only: bool = False) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, found in IMPORTS.items():
        for target, top, _ in found:
            if (module := zoo_module(target)) not in (None, name) and (top or not at_module_level_only):
                graph[name].add(module)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while (member := stack.pop()) != node:
                component.append(member)
            component.append(node)
            if len(component) > 1:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph)))
    try:
        for node in sorted(graph):
            if node not in index:
                visit(node)
    finally:
        sys.setrecursionlimit(limit)
    return found


def package(module: str) -> str:
    """zoo.training.trainer -> zoo.training; zoo.devices -> zoo.devices; zoo -> zoo."""
    return ".".join(module.split(".")[:2])


def test_no_module_imports_itself_through_others() -> None:
    assert cycles(edges()) == []


def test_no_package_imports_itself_through_others() -> None:
    graph: dict[str, set[str]] = {}
    for module, targets in edges().items():
        graph.setdefault(package(module), set()).update(
            package(t) for t in targets if package(t) != package(module)
        )
    for targets in list(graph.values()):
        for target in targets:
            graph.setdefault(target, set())
    assert cycles(graph) == []


def heavy_at_import(module: str, graph: dict[str, set[str]], memo: dict[str, set[str]]) -> set[str]:
    """The heavy packages importing `module` loads (module-level imports, followed through zoo)."""
    if module not in memo:
        memo[module] = set()  # the graph is acyclic (tested above); this only ends a malformed walk
        own = {t.split(".")[0] for t, top, _ in IMPORTS[module] if top and not t.startswith("zoo")}
        memo[module] = (own & HEAVY).union(*(heavy_at_import(t, graph, memo) for t in graph[module]))
    return memo[module]


def test_a_function_imports_a_zoo_module_only_to_defer_a_heavy_dependency() -> None:
    graph, memo = edges(at_module_level_only=True), {}
    unjustified = []
    for name, found in IMPORTS.items():
        for target, top, line in found:
            module = zoo_module(target)
            if top or module in (None, name):
                continue
            deferred = heavy_at_import(module, graph, memo) - heavy_at_import(name, graph, memo)
            if not deferred:
                unjustified.append(f"{MODULES[name].relative_to(ROOT)}:{line} imports {module}")
    assert unjustified == [], "move these imports to the top of their module"


def test_the_graphs_are_read_from_every_import() -> None:
    """The checks above see real edges: the trainer's imports, a function's import, a package's."""
    graph = edges()
    assert {"zoo.training.jvp_plan", "zoo.distributed", "zoo.losses"} <= graph["zoo.training.trainer"]
    assert "zoo.training.trainer" in graph["zoo.remote.worker"]  # imported inside a function
    assert "zoo.training.trainer" not in edges(at_module_level_only=True)["zoo.remote.worker"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
