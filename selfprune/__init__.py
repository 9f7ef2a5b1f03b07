"""selfprune: structured pruning of Llama-class LLMs with an LLM-driven per-layer rate search.

The library holds the domain logic as plain functions (no Prefect import); the Prefect
tasks and flows that orchestrate it live in ``tasks/`` and ``flows/``.
"""

__version__ = "0.1.0"


def load_pruned(path, device: str = "auto", dtype: str = "auto"):
    """Load a selfprune export directory: ``selfprune.load_pruned("DIR").model`` (and ``.tokenizer``).

    Imported lazily so ``import selfprune`` stays cheap.
    """
    from .export import load_pruned as _load_pruned

    return _load_pruned(path, device=device, dtype=dtype)


def search(config=None, on_generation=None, **overrides):
    """Self-Pruner's search in this process, without Prefect; see :func:`selfprune.evolve.runner.search`.

    ``selfprune.search(model="demo", ratio=0.5, oracle="ga", population=10, generations=5)``
    """
    from .evolve.runner import search as _search

    return _search(config, on_generation=on_generation, **overrides)


# The library API (``selfprune.prune(...)``, ...): name -> module, imported on first use so that
# ``import selfprune`` does not import torch.
_LAZY = {"prune": "api", "perplexity": "api", "PruneResult": "api", "report": "evaluate.report"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{_LAZY[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
