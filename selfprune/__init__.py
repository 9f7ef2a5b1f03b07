"""selfprune: structured pruning of Llama-class LLMs with an LLM-driven per-layer rate search.

The library holds the domain logic as plain functions (no Prefect import); the Prefect
tasks and flows that orchestrate it live in ``tasks/`` and ``flows/``.
"""

__version__ = "0.1.0"

# Bumped whenever a change alters what any cached computation returns: it is part of every
# cache key, so old results are never served for new code.
CODE_VERSION = "selfprune-1"


def load_pruned(path, device: str = "auto", dtype: str = "auto"):
    """Load a selfprune export directory: ``selfprune.load_pruned("DIR").model`` (and ``.tokenizer``).

    Imported lazily so ``import selfprune`` stays cheap.
    """
    from .export import load_pruned as _load_pruned

    return _load_pruned(path, device=device, dtype=dtype)
