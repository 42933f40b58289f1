"""zoo.models' modules import each other without cycles.

Checked on the source: every import statement of every module, at any depth (an import inside a
function closes a cycle as surely as one at the top, only later), gives the edges of the graph,
which must be acyclic; and no module imports a zoo module inside a function.
"""

import ast
import graphlib
from pathlib import Path

import pytest

MODELS = Path(__file__).resolve().parents[1] / "zoo" / "models"


def module_name(path: Path, package: str) -> str:
    return package if path.name == "__init__.py" else f"{package}.{path.stem}"


def imported_modules(node: ast.Import | ast.ImportFrom, modules: set[str], package: str) -> set[str]:
    """The package's modules an import statement loads (the package itself: its __init__)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif node.level:
        raise AssertionError(f"relative import at line {node.lineno}: use absolute imports")
    elif node.module == package:
        # `from zoo.models import layers` loads zoo.models.layers; `from zoo.models import X`
        # for a name defined in __init__ loads the package's __init__.
        names = [f"{package}.{alias.name}" for alias in node.names]
        names = [name if name in modules else package for name in names]
    else:
        names = [node.module]
    return {name for name in names if name in modules}


def import_graph(directory: Path, package: str) -> dict[str, set[str]]:
    paths = sorted(directory.glob("*.py"))
    modules = {module_name(path, package) for path in paths}
    graph = {}
    for path in paths:
        name = module_name(path, package)
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[name] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                graph[name] |= imported_modules(node, modules, package) - {name}
    return graph


def imports_inside_functions(directory: Path, root: str) -> list[str]:
    """'module:line' of every import of a `root` module inside a function."""
    found = []
    for path in sorted(directory.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    targets = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    targets = [node.module or ""]
                else:
                    continue
                if any(t == root or t.startswith(f"{root}.") for t in targets):
                    found.append(f"{path.name}:{node.lineno}")
    return found


def test_zoo_models_has_no_import_cycle():
    graph = import_graph(MODELS, "zoo.models")
    # The tangent formulas are a leaf the layers, the Duals and the Triton kernel all import.
    assert graph["zoo.models.tangents"] == set()
    assert {"zoo.models.tangents", "zoo.models.dual"} <= graph["zoo.models.layers"]
    assert "zoo.models.tangents" in graph["zoo.models.group_norm_tangent_kernel"]
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle


def test_zoo_models_imports_no_zoo_module_inside_a_function():
    assert imports_inside_functions(MODELS, "zoo") == []


def test_the_checks_find_a_cycle_closed_inside_a_function(tmp_path):
    (tmp_path / "__init__.py").write_text("from pkg.a import A\n")
    (tmp_path / "a.py").write_text("from pkg import b\n\nA = 1\n")
    (tmp_path / "b.py").write_text("def f():\n    from pkg.a import A\n\n    return A\n")
    (tmp_path / "c.py").write_text("from pkg import A\n")  # a name from __init__: __init__ -> a
    graph = import_graph(tmp_path, "pkg")
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg"}}
    with pytest.raises(graphlib.CycleError):
        graphlib.TopologicalSorter(graph).prepare()
    assert imports_inside_functions(tmp_path, "pkg") == ["b.py:2"]
