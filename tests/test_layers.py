"""The library's layering, read from its folders: each layer imports only itself and the layers
below it, the library imports no Prefect, and the modules import each other without cycles.

From the bottom: ``selfprune/core/`` (errors, registries, progress), ``selfprune/storage/`` (files
on disk), the algorithms, one folder each and pure tensor math (``model/``: architecture, checkpoint,
statistics; ``data/``; ``metrics/``; ``methods/``; ``allocators/``; ``reconstruct/``; ``export/``),
``selfprune/engine/`` (candidates, the pruner and scorer built from them, cache identities), the
library's surface (``selfprune/evolve/``, ``selfprune/evaluate/`` and the modules at the package's
top: ``selfprune.search`` and its siblings, the run configurations), and the application
(``selfprune/app/``, and the installed ``selfprune.flows`` / ``selfprune.tasks`` /
``selfprune.artifacts``, read from the repo's top where they are installed from). One module at the
top is the application's: ``selfprune.ops``, whose path registered deployments name in their pull
steps, so it cannot move.

Above the modules, the folders: each folder and each module at the package's top is one node, every
import at any depth (deferred ones too) an edge, and no two nodes import each other, directly or
around a loop: code two of them need lives below both. In the application that reads, from the top:
``app`` (the CLI, which runs the flows), ``flows``, then ``tasks`` (cached tasks, Prefect's settings
and faults) and ``artifacts``.
"""

from __future__ import annotations

import ast
import graphlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import selfprune

PACKAGE = Path(selfprune.__file__).parent
INSTALLED = ("flows", "tasks", "artifacts")  # repo-top folders installed as selfprune.NAME (pyproject's package-dir)
LAYERS = ("core", "storage", "algorithms", "engine", "library", "application")  # bottom first
ALGORITHMS = ("model", "data", "metrics", "methods", "allocators", "reconstruct", "export")
FOLDERS = {"core": "core", "storage": "storage", **dict.fromkeys(ALGORITHMS, "algorithms"), "engine": "engine",
           "evolve": "library", "llm": "library", "evaluate": "library",
           "app": "application", "flows": "application", "tasks": "application", "artifacts": "application"}
AT_THE_TOP = {"ops": "application"}  # a module at the package's top is the library's surface, but these


def _module_name(path: Path, folder: Path, package: str) -> str:
    parts = (package, *path.relative_to(folder).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str | None:
    """The layer of a ``selfprune`` module by the folder it lives in (None: the package itself)."""
    parts = module.split(".")
    if len(parts) == 1:
        return None
    if parts[1] in FOLDERS:
        return FOLDERS[parts[1]]
    return AT_THE_TOP.get(parts[1], "library")


def _installed(name: str) -> Path:
    """Where ``selfprune.NAME`` is installed from, found without importing it (the flows' import sets Prefect up)."""
    return Path(importlib.util.find_spec(f"selfprune.{name}").origin).parent


def _folder_modules(folder: Path, package: str) -> dict[str, Path]:
    return {_module_name(p, folder, package): p for p in sorted(folder.rglob("*.py"))
            if p.resolve().is_relative_to(folder.resolve())}


def modules() -> dict[str, Path]:
    """Every module of the package: its own folder's, and those of flows/, tasks/, artifacts/ installed under it."""
    found = _folder_modules(PACKAGE, "selfprune")
    for name in INSTALLED:
        found |= _folder_modules(_installed(name), f"selfprune.{name}")
    return found


def library_modules() -> dict[str, Path]:
    return {m: p for m, p in modules().items() if layer(m) not in ("application",)}


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


def _imports(found: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package's modules it imports. A module's ancestor packages always load before
    it, so an import naming one (``from . import x``) adds no edge; the lazy API functions of
    ``selfprune/__init__.py`` may then import anything."""
    return {m: imported_names(m, p) & set(found) - {m} - _ancestors(m) for m, p in found.items()}


def test_every_folder_has_a_layer():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders <= set(FOLDERS), f"a folder without a layer: {sorted(folders - set(FOLDERS))}"
    found = modules()
    assert {"selfprune.engine.workbench", "selfprune.storage.store", "selfprune.core.errors", "selfprune.evolve.runner",
            "selfprune.app.cli", "selfprune.engine.identity", "selfprune.engine.candidate", "selfprune.flows.search",
            "selfprune.tasks.caching", "selfprune.artifacts.report"} <= set(found)


def violations(imports: dict[str, set[str]]) -> set[str]:
    """Each import of a module from a layer above its own."""
    rank = {name: i for i, name in enumerate(LAYERS)}
    return {f"{m} ({layer(m)}) imports {d} ({layer(d)})" for m, deps in imports.items() for d in deps
            if rank[layer(d)] > rank[layer(m)]}


def test_no_import_runs_back_up():
    found = {m: p for m, p in modules().items() if layer(m) is not None}
    assert not violations(_imports(found)), "\n".join(sorted(violations(_imports(found))))


def test_the_rule_finds_an_import_back_up():
    """A check that could not fail proves nothing: an engine module importing the search is caught,
    a storage module importing the core is not, and ``selfprune.ops`` is the application's."""
    found = violations({"selfprune.engine.workbench": {"selfprune.evolve.runner", "selfprune.storage.store"},
                        "selfprune.storage.store": {"selfprune.core.errors"},
                        "selfprune.config": {"selfprune.ops"}})
    assert found == {"selfprune.engine.workbench (engine) imports selfprune.evolve.runner (library)",
                     "selfprune.config (library) imports selfprune.ops (application)"}


def test_the_library_imports_no_prefect():
    imports = "; ".join(f"import {m}" for m in library_modules())
    check = "import sys; assert not [m for m in sys.modules if m == 'prefect' or m.startswith('prefect.')], 'prefect imported'"
    proc = subprocess.run([sys.executable, "-c", f"{imports}; {check}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_import_graph_is_acyclic():
    try:
        tuple(graphlib.TopologicalSorter(_imports(modules())).static_order())
    except graphlib.CycleError as e:
        raise AssertionError(f"import cycle among the package's modules: {' -> '.join(e.args[1])}") from None


def test_the_metric_language_imports_nothing_of_the_searches():
    """``selfprune.metrics`` is what the searches search over: an oracle (the GP) lives in
    ``selfprune.evolve`` beside its siblings, and nothing in the language imports back up."""
    found = library_modules()
    back_up = {m: sorted(n for n in imported_names(m, p) if n.startswith("selfprune.evolve"))
               for m, p in found.items() if m.startswith("selfprune.metrics")}
    assert {m for m in back_up if m.startswith("selfprune.metrics.")}, "no metric module found"
    assert not {m: names for m, names in back_up.items() if names}, back_up


def node(module: str) -> str | None:
    """A module's node in the folder graph: its folder (``evolve``, ``flows``), or itself when it is a
    module at the package's top (``config``); None for the package itself, whose lazy API imports anything."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def folder_imports(imports: dict[str, set[str]]) -> dict[str, dict[str, set[str]]]:
    """node -> the other nodes it imports -> the module imports that make each edge."""
    graph: dict[str, dict[str, set[str]]] = {}
    for m, deps in imports.items():
        if node(m) is None:
            continue
        edges = graph.setdefault(node(m), {})
        for d in deps:
            if node(d) not in (None, node(m)):
                edges.setdefault(node(d), set()).add(f"{m} -> {d}")
    return graph


def folder_cycle(imports: dict[str, set[str]]) -> list[str]:
    """The module imports around one loop of the folder graph; empty when there is none."""
    graph = folder_imports(imports)
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        loop = e.args[1]  # [a, ..., a]: each node imports the one before it
        return [why for imported, importer in zip(loop, loop[1:]) for why in sorted(graph[importer][imported])]
    return []


def test_no_two_folders_import_each_other():
    found = folder_cycle(_imports(modules()))
    assert not found, "folders (or modules at the top) import each other:\n" + "\n".join(found)


def test_the_rule_finds_folders_that_import_each_other():
    """The check can fail: a top-level module and a folder that import each other (lazily or not) are
    caught, a loop through three nodes too, and a cycle inside one folder is not the folders' business."""
    both_ways = {"selfprune.config": {"selfprune.evolve.endpoint"}, "selfprune.evolve.runner": {"selfprune.config"},
                 "selfprune.engine.a": {"selfprune.engine.b"}, "selfprune.engine.b": {"selfprune.engine.a"}}
    assert set(folder_cycle(both_ways)) == {"selfprune.config -> selfprune.evolve.endpoint",
                                            "selfprune.evolve.runner -> selfprune.config"}
    around = {"selfprune.app.cli": {"selfprune.flows.search"}, "selfprune.flows.search": {"selfprune.tasks.caching"},
              "selfprune.tasks.caching": {"selfprune.app.inputs"}}
    assert len(folder_cycle(around)) == 3
    assert folder_cycle({"selfprune.engine.a": {"selfprune.engine.b"}, "selfprune.engine.b": {"selfprune.engine.a"},
                         "selfprune.app.cli": {"selfprune.engine.a"}}) == []
