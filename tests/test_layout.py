"""The package's shape: no import cycle between modules or between packages (lazy imports included),
no file past a generous size, no dangling citations."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "vitmoe"
# Files are split by concept, not by length: one idea may take more than 400 lines. This only
# catches a file that has grown into several ideas without anyone noticing.
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:` (annotations only: never executed)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *runtime_nodes(child)])
            continue
        yield node
        yield from runtime_nodes(node)


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """vitmoe modules `name` imports anywhere in its file (module level and inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the submodule when one of that name exists.
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known)
    found.discard(name)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def test_import_graph_has_no_cycle():
    mods = modules()
    graph = {name: imports_of(name, path, set(mods)) for name, path in mods.items()}
    # The reader must see real edges, or an empty graph would pass.
    assert "vitmoe.moe.layer" in graph["vitmoe.moe"] and "vitmoe.moe" in graph["vitmoe.models.config"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def package_graph(graph: dict[str, set[str]], node) -> dict[str, set[str]]:
    """`graph` with every module replaced by `node(module)` (edges inside one node dropped)."""
    out: dict[str, set[str]] = {}
    for name, deps in graph.items():
        out.setdefault(node(name), set()).update(node(d) for d in deps)
    for name, deps in out.items():
        deps.discard(name)
    return out


def top_level(name: str) -> str:
    """vitmoe.training.loop.trainer -> vitmoe.training; vitmoe.rundir.layout -> vitmoe.rundir."""
    return ".".join(name.split(".")[:2])


def folder(name: str) -> str:
    """The package a module lives in (a package's __init__ is the package itself); a top-level
    module (vitmoe.fileio, vitmoe.__main__) is a node of its own, as in `top_level`."""
    if modules()[name].name == "__init__.py" or name.count(".") == 1:
        return name
    return name.rpartition(".")[0]


def test_package_graph_has_no_cycle():
    """vitmoe.moe, vitmoe.training, vitmoe.report, vitmoe.cli, the top-level modules, ...: none of
    them imports, through any of its modules, one that imports it back."""
    mods = modules()
    graph = {name: imports_of(name, path, set(mods)) for name, path in mods.items()}
    top = package_graph(graph, top_level)
    assert {"vitmoe.moe", "vitmoe.rundir"} <= top["vitmoe.training"] and "vitmoe.training" in top["vitmoe.cli"]
    assert find_cycle(top) is None, " -> ".join(find_cycle(top) or [])


def test_every_package_graph_has_no_cycle():
    """Every package (a folder with an __init__.py: vitmoe.moe, vitmoe.moe.routers,
    vitmoe.training.loop, ...) is a node; A -> B when a module of A's own (not of its subpackages)
    imports a module of B. The root's modules are nodes each: vitmoe/__init__ re-exports the API
    from the packages that vitmoe.validation and vitmoe.fileio sit below."""
    mods = modules()
    graph = {name: imports_of(name, path, set(mods)) for name, path in mods.items()}
    sub = package_graph(graph, folder)
    packages = {module_name(p) for p in PACKAGE.rglob("__init__.py")}
    assert packages <= set(sub) and {"vitmoe.moe.routers", "vitmoe.training.loop"} <= packages
    assert {"vitmoe.training.config", "vitmoe.training.checkpoints"} <= sub["vitmoe.training.loop"]
    assert "vitmoe.moe.routers" in sub["vitmoe.moe"]
    assert find_cycle(sub) is None, " -> ".join(find_cycle(sub) or [])


def test_relative_imports_resolve_to_the_module_or_package_named(tmp_path):
    """`from . import x` is an edge to the submodule x when there is one, else to the package;
    imports under `if TYPE_CHECKING:` are no edges (they never run)."""
    pkg = tmp_path / "p"
    (pkg / "q").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "x.py").write_text("")
    (pkg / "q" / "__init__.py").write_text("")
    (pkg / "q" / "m.py").write_text(
        "from typing import TYPE_CHECKING\nfrom .. import x\nfrom .. import name_in_init\n"
        "if TYPE_CHECKING:\n    from ..y import T\n")
    known = {"p", "p.x", "p.y", "p.q", "p.q.m"}
    assert imports_of("p.q.m", pkg / "q" / "m.py", known) == {"p.x", "p"}


def test_package_graph_sees_a_cycle_through_a_lazy_import(tmp_path):
    """A cycle that only a function-level import closes is still a cycle between the packages."""
    (tmp_path / "a.py").write_text("from b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import y\n")
    known = {"a", "b"}
    graph = {n: imports_of(n, tmp_path / f"{n}.py", known) for n in known}
    assert graph == {"a": {"b"}, "b": {"a"}}
    assert find_cycle(package_graph(graph, lambda n: n)) == ["a", "b", "a"]


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_source_file_over_the_line_budget(name):
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name}: {lines} lines (does it still hold one idea? split it by concept)"


def test_sources_cite_papers_not_a_file_the_repository_lacks():
    cited = [str(p.relative_to(SRC)) for p in PACKAGE.rglob("*.py") if "REFERENCE.md" in p.read_text()]
    assert cited == []
