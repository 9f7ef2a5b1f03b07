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
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Protocol, TypeVar

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


class Searched(Protocol):
    """A one-seed search's summary: its best.json as a dict."""

    def to_json(self) -> dict: ...


R = TypeVar("R", bound=Searched)


@dataclass(frozen=True)
class SeedsSummary:
    """What ``OUT/seeds.json`` holds: the seeds, each one's best.json (beside the file), the spread
    of each figure (:func:`spread`), each seed's candidates scored, and the config. Its fields are
    the file's keys in their order; :meth:`from_json` reads a seeds.json (or a flow's result) back."""

    seeds: list[int]
    runs: dict[str, str]
    spread: dict[str, dict]
    candidates: dict[str, int]
    config: dict

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> SeedsSummary:
        return cls(**{f.name: data[f.name] for f in fields(cls)})


def over_seeds(config: EvolutionConfig, run_one: Callable[[EvolutionConfig], R],
               figures: Callable[[R], dict[str, float]]) -> SeedsSummary:
    """Run ``run_one`` once per seed of ``config.seeds`` and write ``OUT/seeds.json``: the spread
    of each of ``figures(summary)`` (e.g. fitness and test perplexity), each seed's candidates
    scored (counted from its best.json, as the report counts them), and every run's best.json
    (``selfprune report --search OUT/seeds.json`` shows them as one row)."""
    runs = {seed: run_one(seed_config(config, seed)) for seed in config.seeds}
    per_seed = {seed: figures(summary) for seed, summary in runs.items()}
    names = next(iter(per_seed.values()))
    summary = SeedsSummary(
        seeds=list(config.seeds),
        runs={str(seed): f"seed-{seed}/best.json" for seed in config.seeds},  # beside this file
        spread={name: spread({seed: f[name] for seed, f in per_seed.items()}) for name in names},
        candidates={str(seed): candidates(s.to_json()) for seed, s in runs.items()},
        config=config.model_dump(),
    )
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / SUMMARY, json.dumps(summary.to_json(), indent=2))
    return summary
