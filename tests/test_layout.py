"""The package's shape: imports point one way, and every module imports on its own."""

from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tailorkit

ROOT = Path(tailorkit.__file__).parent
# Call-time imports that point up on purpose: Recipe.plan(), the documented shortcut for
# tailorkit.plan.make_plan(recipe).
ALLOWED_UPWARD = {("tailorkit.recipe", "tailorkit.plan")}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if "tasks_data" in parts:  # lm-eval's task folder, loaded by lm-eval
            continue
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The tailorkit modules ``name`` imports, at module level or inside a function."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    return {m for m in found if m in modules and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` (name -> names it imports) as a path, or None."""
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> list[str] | None:
        if name in trail:
            return trail[trail.index(name) :] + [name]
        if name in done:
            return None
        for child in sorted(graph.get(name, ())):
            cycle = visit(child, [*trail, name])
            if cycle:
                return cycle
        done.add(name)
        return None

    return next(filter(None, (visit(name, []) for name in sorted(graph))), None)


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert "tailorkit.trials" in graph["tailorkit.methods.slm"]  # the graph is real
    assert "tailorkit.plan" in graph["tailorkit.recipe"]  # lazy imports count too
    for a, b in ALLOWED_UPWARD:
        graph[a].discard(b)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    # The checker finds the circle the trial runner removed, had it stayed.
    graph["tailorkit.trials"].add("tailorkit.pruning")
    assert find_cycle(graph) is not None


def test_every_module_imports_alone():
    """``python -c 'import tailorkit.X'`` works for every module, in a fresh interpreter."""
    names = sorted(_modules())

    def run(name: str) -> tuple[str, int, str]:
        done = subprocess.run(
            [sys.executable, "-c", f"import {name}"], capture_output=True, text=True
        )
        return name, done.returncode, done.stderr[-400:]

    with ThreadPoolExecutor(max_workers=4) as pool:
        failed = [(n, err) for n, code, err in pool.map(run, names) if code]
    assert not failed, failed
