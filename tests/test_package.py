"""The package's structure: its modules import one another without a cycle, deferred imports
included (a layered package: a module can be read knowing only those below it)."""
import ast
import pathlib

import lowrank_manifolds

ROOT = pathlib.Path(lowrank_manifolds.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = ("lowrank_manifolds",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(path: pathlib.Path, modules: set) -> set:
    """The package's modules that ``path`` imports, wherever the statement is (a function's
    deferred import is a dependency too), except under ``if TYPE_CHECKING``."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def visit(body):
        for node in body:
            if isinstance(node, ast.If) and _is_type_checking(node):
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("lowrank_manifolds"))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                if not base.startswith("lowrank_manifolds"):
                    continue
                for a in node.names:  # `from . import nn` imports the module nn
                    found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
            else:
                visit(ast.iter_child_nodes(node))

    visit(ast.parse(path.read_text()).body)
    found.discard(name)
    return found


def test_no_import_cycle():
    paths = sorted(ROOT.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    graph = {_module_name(p): _imports(p, modules) for p in paths}
    assert "lowrank_manifolds.manifold" in graph["lowrank_manifolds.integrators.baselines"]  # it sees imports
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, f"import cycles: {cycles}"


def test_importing_the_package_warns_nothing():
    """geoopt's 73 torch.jit.script deprecation warnings at its import are not the user's:
    importing this package (which imports geoopt) shows none, and leaves the user's warning
    filters as they were."""
    import subprocess
    import sys

    code = ("import warnings; "
            "import lowrank_manifolds, lowrank_manifolds.nn, lowrank_manifolds.optim, lowrank_manifolds.testing; "
            "assert not any(f[1] is not None and 'jit' in f[1].pattern for f in warnings.filters), 'a filter left'")
    proc = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
