"""The library's layering: its core imports no Prefect, and its modules import each other without cycles.

The core is every module under ``selfprune/`` (found by walking the package, so a new module is
covered without editing this file) except the application layer: the CLI, the Prefect settings,
the Prefect-aware fault handling (``selfprune.faults``), and the installed ``selfprune.flows`` /
``selfprune.tasks`` / ``selfprune.artifacts`` packages, and the deployments' pull steps (``selfprune.ops``).
"""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import selfprune

PACKAGE = Path(selfprune.__file__).parent
APPLICATION = {"selfprune.cli", "selfprune.prefect_env", "selfprune.ops", "selfprune.faults", "selfprune.flows", "selfprune.tasks",
               "selfprune.artifacts"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def core_modules() -> dict[str, Path]:
    modules = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    return {m: p for m, p in modules.items()
            if not any(m == app or m.startswith(app + ".") for app in APPLICATION)}


def imported_names(module: str, path: Path) -> set[str]:
    """Every module name an import statement in ``path`` may load, at any depth (deferred ones too)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # ``from pkg import submodule``
    return names


def _ancestors(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_core_modules_are_found():
    core = core_modules()
    assert {"selfprune", "selfprune.models", "selfprune.store", "selfprune.evaluate.deci"} <= set(core)
    assert not set(core) & APPLICATION


def test_core_imports_no_prefect():
    imports = "; ".join(f"import {m}" for m in core_modules())
    check = "import sys; assert not [m for m in sys.modules if m == 'prefect' or m.startswith('prefect.')], 'prefect imported'"
    proc = subprocess.run([sys.executable, "-c", f"{imports}; {check}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_core_import_graph_is_acyclic():
    core = core_modules()
    # A module's ancestor packages always load before it, so an import naming one (``from . import x``)
    # adds no edge; the lazy API functions of ``selfprune/__init__.py`` may then import anything.
    graph = {m: imported_names(m, p) & set(core) - {m} - _ancestors(m) for m, p in core.items()}
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        raise AssertionError(f"import cycle among core modules: {' -> '.join(e.args[1])}") from None


def test_the_metric_language_imports_nothing_of_the_searches():
    """``selfprune.metrics`` is what the searches search over: an oracle (the GP) lives in
    ``selfprune.evolve`` beside its siblings, and nothing in the language imports back up."""
    core = core_modules()
    back_up = {m: sorted(n for n in imported_names(m, p) if n.startswith("selfprune.evolve"))
               for m, p in core.items() if m.startswith("selfprune.metrics")}
    assert {m for m in back_up if m.startswith("selfprune.metrics.")}, "no metric module found"
    assert not {m: names for m, names in back_up.items() if names}, back_up
