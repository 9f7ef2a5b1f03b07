"""AutoPrune's metric search, end to end: checks, the evolutionary loop over metric texts, the
final test scores against the built-in metrics, the summary.

The loop is :func:`selfprune.evolve.evolution.run_search`, the one the rate search runs: only the
candidates (metric texts, identified by their canonical form), the oracle (``gp``, or an LLM with
GCoT prompts) and the fitness differ. A metric's fitness is the fitness-split perplexity of the
model it prunes at each of ``sparsities`` (the mean when there are several, so a metric is not
tuned to one sparsity), under ``pattern`` and ``allocation``: its :class:`MetricSpace`. The
pipeline around it is the rate search's (:mod:`.pipeline`); the flow (``flows/autoprune.py``)
calls :func:`run` with its cached tasks injected.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ..config import AutopruneConfig
from ..core.errors import UserError
from ..engine.candidate import Sparse
from ..methods.sparsity import parse_pattern
from ..metrics import METRICS, resolve_metric
from ..metrics.search_space import Lineage, MetricContext
from ..model.devices import precision
from ..reconstruct import RECONSTRUCTIONS
from ..seeds import SeedsSummary
from .evolution import SearchParams
from .metric_oracle import METRIC_ORACLES, make_metric_oracle
from .oracle_registry import oracle_kind
from .pipeline import (
    GenerationReport,
    Injected,
    RunRecord,
    Search,
    Setup,
    Summary,
    check_runner,
    evolve,
    run_library,
    run_record,
    score_members,
)


def check(config: AutopruneConfig) -> None:
    """Every check that needs nothing loaded: precision, pattern against sparsities, allocation,
    oracle. Fails fast, before the calibration pass."""
    precision(config.device, config.dtype)
    parse_pattern(config.pattern).check_fixed(config.sparsities, config.allocation)
    if RECONSTRUCTIONS.get(config.reconstruct).own_mask:
        raise UserError(f"--reconstruct {config.reconstruct} chooses its own mask, so every metric would prune alike; "
                        "use --reconstruct sparsegpt (the metric's mask, weights updated)")
    # a registered allocation and a reconstruction of sparse candidates, else a UserError now
    Sparse.of("abs(W)", config.pattern, config.sparsities[0], config.allocation, reconstruct=config.reconstruct)
    oracle_kind(METRIC_ORACLES, config.oracle)
    check_runner(config)


def seeds(config: AutopruneConfig) -> dict[str, str]:
    """The built-in metrics the final scores compare against (name -> canonical text)."""
    return {name: m.text for name, m in ((n, METRICS.get(n)) for n in METRICS.names())
            if config.gradient or not m.needs_gradient}


@dataclass(frozen=True)
class MetricSpace:
    """What a metric text stands for: its sparse candidates, one per sparsity of ``config`` (under its
    pattern, allocation and reconstruction), and its row with where it came from."""

    config: AutopruneConfig
    lineage: Lineage

    def candidates(self, text: str) -> list[Sparse]:
        c = self.config
        return [Sparse.of(text, c.pattern, s, c.allocation, reconstruct=c.reconstruct) for s in c.sparsities]

    def member(self, text: str, fitness: float) -> dict:
        origin = self.lineage.nodes.get(text)
        return {"metric": text, "fitness": fitness, "source": origin.source if origin else "seed",
                "edit": origin.edit if origin else "", "parents": list(origin.parents) if origin else []}


@dataclass(frozen=True)
class MetricSummary(Summary):
    """A metric search's summary, what ``best.json`` holds: the found metric (its text, canonical
    key, fitness and lineage), the test perplexities of it and the built-ins (name -> sparsity ->
    ppl), every metric seen (``graph``) and why some could not prune, and the run record.
    ``oracle_replays``: the flow's LLM replies answered by its cache (the library's run has none)."""

    metric: str
    key: str
    fitness: float
    lineage: list[dict]
    test_ppl: dict[str, dict[str, float]]
    test_tokens: int
    seqlen: int
    graph: list[dict]
    invalid: dict[str, str]
    record: RunRecord
    oracle_replays: int | None = None


def run(config: AutopruneConfig, setup: Setup, injected: Injected) -> MetricSummary:
    """The metric search on ``setup``'s model, then the best metric and the built-ins on the test
    split at every sparsity. Returns the summary that ``best.json`` holds."""
    start = time.perf_counter()
    lineage = Lineage()
    score = injected.score
    oracle = make_metric_oracle(config.oracle, config.base_url, injected.transport, lineage,
                                max_tokens=config.oracle_max_tokens or None, strict=config.oracle_strict,
                                schema=config.oracle_schema, api_key_env=config.api_key_env,
                                timeout=config.oracle_timeout)
    ctx = MetricContext(config.model, config.sparsities[0], config.pattern, config.allocation, config.seed,
                        config.gradient, config.data)
    params = SearchParams(population=config.population, mutations=config.mutations, crossovers=config.crossovers,
                          generations=config.generations, seed=config.seed)
    space = MetricSpace(config, lineage)
    evolved = evolve(space, oracle, ctx, params, config, score, injected.on_generation)
    best = evolved.result.best  # a metric text
    compared = {"found": best} | seeds(config)
    scored = score_members(space, score, list(compared.values()), "test", config.test_windows,
                           "final test scoring: the best metric and the built-in ones")
    test = dict(zip(compared, scored))
    return MetricSummary(
        metric=best,
        key=resolve_metric(best).text,
        fitness=evolved.result.best_fitness,
        lineage=[asdict(o) for o in lineage.chain(best)],
        test_ppl={name: {str(s): m.ppl for s, m in zip(config.sparsities, ms)} for name, ms in test.items()},
        test_tokens=test["found"][0].tokens,
        seqlen=config.seqlen,
        graph=[asdict(o) | {"fitness": evolved.fitness.get(key)} for key, o in lineage.nodes.items()],
        invalid=evolved.invalid,
        record=run_record(config, setup, evolved, oracle, start, test["found"][0]),
    )


def figures(summary: MetricSummary) -> dict[str, float]:
    """What the seeds of a metric search spread over: the found metric's fitness and test perplexity
    at each sparsity."""
    return {"fitness": summary.fitness, **{f"test_ppl@{s}": v for s, v in summary.test_ppl["found"].items()}}


METRIC = Search("metric", AutopruneConfig, check, run, MetricSummary, figures, fallback="GP", tolerate_invalid=True)


def autoprune(config: AutopruneConfig | None = None, on_generation: Callable[[GenerationReport], None] | None = None,
              **overrides) -> MetricSummary | SeedsSummary:
    """AutoPrune's metric search in this process, without Prefect: ``selfprune.autoprune(model=...,
    sparsities=[0.6])``. Writes ``out/best.json`` and returns the summary (with ``seeds``, the
    seeds' summary); ``selfprune autoprune``
    runs the same loop as a resumable, cached Prefect flow."""
    return run_library(METRIC, config, on_generation, overrides)
