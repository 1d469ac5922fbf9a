"""The layout promises of docs/architecture.md: no import cycle, torch-free config/store/index, Ray only in jobs."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ctsearch"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """ctsearch module -> the ctsearch modules it imports, at the top or inside a function.

    ``from pkg import name`` counts as importing ``pkg.name`` where that is a module. A package's
    own ``__init__`` re-exporting its submodules is not an edge back from them.
    """
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in modules}
            elif (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.level == 0
                and node.module in modules
            ):
                subs = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
                deps |= subs or {node.module}
        graph[name] = deps - {name}
    for name in graph:  # pkg/__init__ -> pkg.sub is a re-export, not a use
        graph[name] = {d for d in graph[name] if not d.startswith(name + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_find_cycle_sees_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert "ctsearch.model" in graph and "ctsearch.config" in graph["ctsearch.model"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_library_never_imports_jobs_or_cli():
    graph = import_graph()
    library = [m for m in graph if not m.startswith(("ctsearch.jobs", "ctsearch.cli", "ctsearch.__main__"))]
    wrong = {
        m: sorted(d for d in graph[m] if d.startswith(("ctsearch.jobs", "ctsearch.cli"))) for m in library
    }
    assert not {m: d for m, d in wrong.items() if d}


def test_config_store_and_index_import_without_torch():
    code = "import sys, ctsearch.config, ctsearch.store, ctsearch.index\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
