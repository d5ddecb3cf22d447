"""The package's shape: no import cycles between its modules, and lists kept in step with the API they mirror."""

from __future__ import annotations

import ast
import inspect
import pathlib

import networkx as nx

import fxmemopt

PACKAGE = pathlib.Path(fxmemopt.__file__).parent


def _import_graph() -> nx.DiGraph:
    """Module -> the package modules it imports (top-level and inside functions alike)."""
    modules = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir() if p.is_dir()
                                                         and (p / "__init__.py").exists()}
    graph = nx.DiGraph()
    for path in PACKAGE.glob("*.py"):
        graph.add_node(path.stem)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom) or node.level != 1:
                continue
            if node.module:
                graph.add_edge(path.stem, node.module.split(".")[0])
            else:  # `from . import x`: the module x, or a name the package's __init__ defines
                for alias in node.names:
                    graph.add_edge(path.stem, alias.name if alias.name in modules else "__init__")
    return graph


def test_no_import_cycles_between_modules():
    # (__init__ imports the public modules; a module that imports a name from the package itself closes a cycle)
    cycles = list(nx.simple_cycles(_import_graph()))
    assert cycles == [], f"import cycles: {cycles}"


def test_distributed_search_only_options_are_optimize_parameters():
    from fxmemopt.distributed import _SEARCH_ONLY

    parameters = set(inspect.signature(fxmemopt.optimize).parameters)
    assert set(_SEARCH_ONLY) <= parameters, set(_SEARCH_ONLY) - parameters
