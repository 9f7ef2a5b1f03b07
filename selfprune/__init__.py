"""selfprune: pruning Llama-class LLMs with LLM-driven searches: per-layer rates (Self-Pruner) and pruning metrics (AutoPrune).

The library holds the domain logic as plain functions (no Prefect import); the Prefect
tasks and flows that orchestrate it live in ``tasks/`` and ``flows/``.
"""

__version__ = "0.1.0"


# The library API: name -> module, imported on first use so that ``import selfprune`` stays cheap
# (no torch). ``selfprune.search(model="demo", ratio=0.5)``, ``selfprune.autoprune(...)``, ``selfprune.prune(...)``,
# ``selfprune.perplexity(...)``, ``selfprune.report(...)``, ``selfprune.recover("DIR", "OUT")``,
# ``selfprune.load_pruned("DIR").model``.
_LAZY = {"prune": "api", "perplexity": "api", "PruneResult": "api", "report": "evaluate.report",
         "recover": "evaluate.lora", "Recovery": "evaluate.lora",
         "search": "evolve.runner", "autoprune": "evolve.autoprune", "load_pruned": "export.hf", "SearchConfig": "config",
         "ReportConfig": "config", "AutopruneConfig": "config"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{_LAZY[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
