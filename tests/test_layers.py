"""The import rule of docs/architecture.md: arrows only run down the floors, and no import cycle.

Floors, bottom to top: ``fastface`` (the method) < ``storage`` (tables, images, SQL) < ``actors``
(Ray workers and pools) < ``evaluation`` (what a run computes and shows, no Prefect) < ``flows``
(Prefect flows and tasks) < ``app`` (the results browser). A module may import its own floor and
the floors below it. Every import counts, also one inside a function: a lazy import that runs up
a floor is still a dependency on that floor. Prefect is imported in ``flows/`` only; Ray in
``actors/`` only (and by ``flows/`` to start or reach a cluster); ``flows/`` modules are Prefect
flows and tasks, or a few lines of glue.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FLOORS = ("fastface", "storage", "actors", "evaluation", "flows", "app")
PREFECT_FLOORS = {"flows"}
RAY_FLOORS = {"actors", "flows"}
GLUE_LINES = 40  # a flows/ module without Prefect must be glue: at most this many lines


def module_files() -> dict[str, Path]:
    out = {}
    for floor in FLOORS:
        for path in sorted((REPO / floor).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imported_names(path: Path, module: str) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of every import in the file, relative ones resolved; ``from a import b`` gives ``a.b``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            found.append((node.lineno, source))
            found += [(node.lineno, f"{source}.{alias.name}") for alias in node.names]
    return found


def import_graph() -> dict[str, dict[str, int]]:
    """Module → {project module it imports: line}."""
    modules = module_files()
    graph: dict[str, dict[str, int]] = {m: {} for m in modules}
    for module, path in modules.items():
        for line, name in imported_names(path, module):
            while name and name not in modules:  # a.b.func → a.b (the module that holds it)
                name = name.rpartition(".")[0]
            if name and name != module:
                graph[module].setdefault(name, line)
    return graph


def floor(module: str) -> str:
    return module.split(".")[0]


def upward_imports(graph: dict[str, dict[str, int]]) -> list[str]:
    return [f"{module} (line {line}) imports {target}: {floor(target)}/ is above {floor(module)}/"
            for module, targets in sorted(graph.items()) for target, line in sorted(targets.items())
            if FLOORS.index(floor(target)) > FLOORS.index(floor(module))]


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, {}):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def third_party(module: str, path: Path, package: str) -> list[int]:
    return [line for line, name in imported_names(path, module) if name == package or name.startswith(package + ".")]


def test_every_import_runs_down_the_floors():
    problems = upward_imports(import_graph())
    assert not problems, "imports that run up a floor (docs/architecture.md):\n" + "\n".join(problems)


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles (move the shared part into a module both can import):\n" + \
        "\n".join(" <-> ".join(c) for c in found)


def test_prefect_only_in_flows_and_ray_only_in_actors_and_flows():
    problems = []
    for module, path in module_files().items():
        if floor(module) not in PREFECT_FLOORS and (lines := third_party(module, path, "prefect")):
            problems.append(f"{module} imports prefect (lines {lines}): only flows/ may")
        if floor(module) not in RAY_FLOORS and (lines := third_party(module, path, "ray")):
            problems.append(f"{module} imports ray (lines {lines}): only actors/ and flows/ may")
    assert not problems, "\n".join(problems)


def test_flows_modules_are_flows_tasks_or_glue():
    problems = []
    for module, path in module_files().items():
        if floor(module) != "flows" or third_party(module, path, "prefect"):
            continue
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > GLUE_LINES:
            problems.append(f"{module}: {lines} lines and no Prefect: its logic belongs in evaluation/ (or below)")
    assert not problems, "\n".join(problems)


# -- the checker itself finds what it must ---------------------------------------------------------
@pytest.fixture
def fake_graph():
    return {"storage.a": {"fastface.b": 3}, "fastface.b": {}, "fastface.c": {"flows.d": 7}, "flows.d": {},
            "evaluation.x": {"evaluation.y": 1}, "evaluation.y": {"evaluation.x": 2}}


def test_the_checks_catch_an_upward_import_and_a_cycle(fake_graph):
    assert upward_imports(fake_graph) == ["fastface.c (line 7) imports flows.d: flows/ is above fastface/"]
    assert cycles(fake_graph) == [["evaluation.x", "evaluation.y"]]


def test_relative_and_lazy_imports_are_seen(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("from .sibling import thing\n\ndef f():\n    from flows.evaluate import evaluate_flow\n")
    names = [name for _, name in imported_names(source, "evaluation.mod")]
    assert "evaluation.sibling.thing" in names and "flows.evaluate.evaluate_flow" in names
