"""The package's shape: no import cycles between its modules, and lists kept in step with the API they mirror."""

from __future__ import annotations

import ast
import inspect
import pathlib

import networkx as nx

import fxmemopt

PACKAGE = pathlib.Path(fxmemopt.__file__).parent
STAGES = ("analysis", "planning", "runtime", "profiling", "report", "tools", "snn")
_FX_IMPORTS = ("torch.fx",)


def _module_name(path: pathlib.Path) -> str:
    parts = ("fxmemopt",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a relative ``from ... import`` names."""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> tuple[set[str], set[str]]:
    """(package modules ``name`` imports, external modules it imports), top-level and inside functions alike.
    Importing a package module also loads each subpackage ``__init__`` on the way."""
    inside, outside = set(), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            outside |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            outside |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(name, path.name == "__init__.py", node)
            # `from . import x`: the module x if there is one, else a name the package defines
            targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]
            for t in targets:
                parts = t.split(".")
                inside |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)} & set(modules)
    # (a package enclosing the importing module is already being loaded: not an edge)
    inside -= {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
    return inside, outside


def _import_graph() -> tuple[nx.DiGraph, dict[str, set[str]]]:
    """Module -> the package modules it imports; and each module's external imports."""
    modules = _modules()
    graph, external = nx.DiGraph(), {}
    for name, path in modules.items():
        inside, external[name] = _imports(name, path, modules)
        graph.add_node(name)
        graph.add_edges_from((name, m) for m in inside)
    return graph, external


def test_no_import_cycles_between_modules():
    # (__init__ imports the public modules; a module that imports a name from the package itself closes a cycle)
    graph, _ = _import_graph()
    cycles = list(nx.simple_cycles(graph))
    assert cycles == [], f"import cycles: {cycles}"


def test_the_layout_shows_the_pipeline():
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top <= {"__init__", "__main__", "_version", "api", "compat", "errors", "distributed"}, top
    assert {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()} == set(STAGES)


def test_nothing_under_planning_imports_torch_fx():
    # Planning sees names and numbers (shared/design.md, rule 1): neither its modules nor any package module they
    # load may import torch.fx. (The top-level package __init__ is the public facade and is not followed.)
    graph, external = _import_graph()
    planning = [m for m in graph if m.startswith("fxmemopt.planning")]
    assert len(planning) >= 5, planning
    for module in planning:
        reached = {module} | nx.descendants(graph, module)
        assert "fxmemopt" not in reached, f"{module} imports the package facade"
        fx_users = {m: sorted(i for i in external[m] if i == "torch.fx" or i.startswith("torch.fx."))
                    for m in reached}
        fx_users = {m: i for m, i in fx_users.items() if i}
        assert not fx_users, f"{module} loads modules that import torch.fx: {fx_users}"


def test_distributed_search_only_options_are_optimize_parameters():
    from fxmemopt.distributed import _SEARCH_ONLY

    parameters = set(inspect.signature(fxmemopt.optimize).parameters)
    assert set(_SEARCH_ONLY) <= parameters, set(_SEARCH_ONLY) - parameters
