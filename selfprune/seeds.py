"""Several seeds of one search: a run per seed, and the spread of their figures.

One seed is one draw: a search that wins once may lose on the next seed (reviewers of Self-Pruner
asked for the variance). ``--seeds 0,1,2`` runs the same search once per seed, each in
``OUT/seed-N`` with its own cache entries (statistics and already-scored candidates are shared
through the content-hash cache), and writes their spread to ``OUT/seeds.json``.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path

from .config import EvolutionConfig
from .storage.fileio import atomic_write_text

SUMMARY = "seeds.json"


def spread(values: dict[int, float]) -> dict:
    """Mean, sample standard deviation (n - 1; 0 for one value) and every seed's value."""
    xs = list(values.values())
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "values": {str(seed): v for seed, v in values.items()}}


def candidates(summary: dict) -> int:
    """How many candidates a search scored, computed or answered by the cache: what searches are
    compared at (a rerun from the cache scored as many as the first run)."""
    return summary["evaluations"] + summary["cache_hits"]


def run_paths(path: str | Path, summary: dict) -> list[Path]:
    """The best.json of every seed of the ``seeds.json`` at ``path``."""
    return [Path(path).parent / relative for relative in summary["runs"].values()]


def seed_config(config: EvolutionConfig, seed: int) -> EvolutionConfig:
    """The one-seed run of ``config``: its own seed and run directory ``OUT/seed-N``."""
    return config.model_copy(update={"seed": seed, "seeds": [], "out": str(Path(config.out) / f"seed-{seed}")})


def over_seeds(config: EvolutionConfig, run_one: Callable[[EvolutionConfig], dict],
               figures: Callable[[dict], dict[str, float]]) -> dict:
    """Run ``run_one`` once per seed of ``config.seeds`` and write ``OUT/seeds.json``: the spread
    of each of ``figures(summary)`` (e.g. fitness and test perplexity), each seed's candidates
    scored, and every run's best.json
    (``selfprune report --search OUT/seeds.json`` shows them as one row)."""
    runs = {seed: run_one(seed_config(config, seed)) for seed in config.seeds}
    per_seed = {seed: figures(summary) for seed, summary in runs.items()}
    names = next(iter(per_seed.values()))
    summary = {
        "seeds": list(config.seeds),
        "runs": {str(seed): f"seed-{seed}/best.json" for seed in config.seeds},  # beside this file
        "spread": {name: spread({seed: f[name] for seed, f in per_seed.items()}) for name in names},
        "candidates": {str(seed): candidates(s) for seed, s in runs.items()},
        "config": config.model_dump(),
    }
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / SUMMARY, json.dumps(summary, indent=2))
    return summary
