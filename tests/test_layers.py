"""The package's layers: no module imports from a layer above its own, and no module or function is too long
to read top to bottom (README, Layout)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# bottom first; a module may import from its own layer and from those before it
LAYERS = (("spatial_attention.stats", "spatial_attention.engine"), ("spatial_attention.common",),
          ("spatial_attention.data", "models"), ("spatial_attention.run",), ("spatial_attention.experiments",),
          ("spatial_attention.study",))
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 500, 80


def layer_of(module: str) -> int | None:
    for level, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return level
    return None


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def imported_modules(path: Path) -> set[str]:
    """Every module of ours that ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # a module imported from a package
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if layer_of(name) is not None}


def package_files() -> list[Path]:
    return sorted([*(REPO / "spatial_attention").rglob("*.py"), *(REPO / "models").glob("*.py")])


def test_every_module_belongs_to_a_layer():
    assert [p for p in package_files() if layer_of(module_name(p)) is None] == [REPO / "spatial_attention/__init__.py"]


def test_no_import_runs_upward():
    upward = [f"{module_name(p)} (layer {layer_of(module_name(p))}) imports {name} (layer {layer_of(name)})"
              for p in package_files() for name in imported_modules(p)
              if layer_of(module_name(p)) is not None and layer_of(name) > layer_of(module_name(p))]
    assert upward == []


def test_the_layer_check_sees_an_upward_import(tmp_path):
    probe = tmp_path / "probe.py"  # as if it were spatial_attention/data/probe.py
    probe.write_text("def f():\n    from spatial_attention.study import report\n")
    assert "spatial_attention.study.report" in imported_modules(probe)
    assert layer_of("spatial_attention.study.report") > layer_of("spatial_attention.data.probe")


def test_no_import_circle_between_modules():
    ours = {module_name(p) for p in package_files()}
    graph = {module_name(p): imported_modules(p) & ours for p in package_files()}

    def in_a_circle(start: str) -> bool:
        seen, todo = set(), list(graph[start])
        while todo:
            name = todo.pop()
            if name == start:
                return True
            if name not in seen:
                seen.add(name)
                todo += graph.get(name, ())
        return False

    assert sorted(m for m in graph if in_a_circle(m)) == []


@pytest.mark.parametrize("root", ["spatial_attention", "models", "bench"])
def test_modules_and_functions_stay_short(root):
    long = []
    for path in sorted((REPO / root).rglob("*.py")):
        tree = ast.parse(path.read_text())
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            long.append(f"{path.relative_to(REPO)}: {lines} lines")
        long += [f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines"
                 for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                 and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []
