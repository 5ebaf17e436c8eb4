"""layerchain.model imports in one direction: no cycle, and no import hidden in a function.

Reads the package's source with ``ast`` (nothing is imported), so it checks the structure the
model/__init__ docstring draws: every module imports only modules above it.
"""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import layerchain.model

PACKAGE = "layerchain.model"
MODEL_DIR = Path(layerchain.model.__file__).parent


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(MODEL_DIR.glob("*.py"))}


def _imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The layerchain.model submodules an import statement names."""
    if isinstance(node, ast.ImportFrom):
        if node.module == PACKAGE:  # from layerchain.model import span
            return [alias.name for alias in node.names]
        names = [node.module or ""]
    else:
        names = [alias.name for alias in node.names]
    return [n.split(".")[2] for n in names if n.startswith(PACKAGE + ".")]


def _runtime_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import, at any depth, but those under ``if TYPE_CHECKING:`` (annotations only)."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name):
            if node.test.id == "TYPE_CHECKING":
                continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def test_model_modules_import_each_other_without_a_cycle():
    graph = {
        name: {m for node in _runtime_imports(tree) for m in _imported(node)}
        for name, tree in _modules().items()
        if name != "__init__"
    }
    assert graph["spec"] <= {"families", "shape", "dtypes"}, "the record must stay importable by every module"
    assert graph["shape"] <= {"families"} and not graph["dtypes"], "parts of the record"
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as error:  # pragma: no cover - the failure message is the point
        raise AssertionError(f"import cycle in layerchain.model: {error.args[1]}") from None
    assert order.index("spec") < order.index("weights") < order.index("resolve")


def test_no_layerchain_import_inside_a_function():
    hidden = [
        f"{name}.py:{node.lineno}"
        for name, tree in _modules().items()
        for func in ast.walk(tree)
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(func)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        and any(n.startswith("layerchain") for n in _names(node))
    ]
    assert not hidden, f"imports of layerchain inside functions (a cycle held together?): {hidden}"


def _names(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.ImportFrom):
        return [node.module or ""]
    return [alias.name for alias in node.names]
