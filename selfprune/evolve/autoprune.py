"""AutoPrune's metric search, end to end: checks, the evolutionary loop over metric texts, the
final test scores against the built-in metrics, the summary.

The loop is :func:`selfprune.evolve.evolution.run_search`, the one the rate search runs: only the
candidates (metric texts, identified by their canonical form), the oracle (``gp``, or an LLM with
GCoT prompts) and the fitness differ. A metric's fitness is the fitness-split perplexity of the
model it prunes at each of ``sparsities`` (the mean when there are several, so a metric is not
tuned to one sparsity), under ``pattern`` and ``allocation``. As in :mod:`.runner`, the library's
:func:`autoprune` scores directly on the workbench and the flow (``flows/autoprune.py``) injects
its cached tasks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Protocol

from ..config import AutopruneConfig, build_config
from ..devices import precision
from ..errors import UserError
from ..metrics import METRICS
from ..metrics.search_space import Lineage, MetricContext
from ..models import load_tokenizer
from ..progress import Advance, ignore, one_by_one, step
from ..reconstruct import ADAPTIVE
from ..seeds import over_seeds
from ..sparsity import parse_pattern
from ..workbench import shared_workbench, sparse_candidate
from .evolution import Generation, SearchParams, run_search
from .metric_oracle import METRIC_ORACLES, make_metric_oracle
from .oracles import Transport, oracle_kind
from .runner import (
    GenerationReport,
    Setup,
    Tally,
    calibration,
    check_runner,
    check_windows,
    in_process,
    oracle_accounting,
    run_record,
    scoring,
    staged,
    write_summary,
)


class Score(Protocol):
    """Scores sparse candidates in order, one perplexity record each (each carries its own
    reconstruction); ``advance(1)`` as each is scored (a progress step's, selfprune.progress)."""

    def __call__(self, candidates: list, split: str, windows: int | None, *, advance: Advance = ignore
                 ) -> list[dict]: ...


def check(config: AutopruneConfig) -> None:
    """Every check that needs nothing loaded: precision, pattern against sparsities, allocation,
    oracle. Fails fast, before the calibration pass."""
    precision(config.device, config.dtype)
    fixed = parse_pattern(config.pattern).fixed_sparsity
    if fixed is not None and config.sparsities != [fixed]:
        raise UserError(f"{config.pattern} prunes exactly {fixed:g} of every layer: pass --sparsity {fixed:g}, or use "
                        "--pattern unstructured for other sparsities")
    if fixed is not None and config.allocation != "uniform":
        raise UserError(f"{config.pattern} gives every layer the same sparsity: use --allocation uniform with it")
    if config.reconstruct == ADAPTIVE:
        raise UserError(f"--reconstruct {ADAPTIVE} chooses its own mask, so every metric would prune alike; "
                        "use --reconstruct sparsegpt (the metric's mask, weights updated)")
    # a registered allocation and a reconstruction of sparse candidates, else a UserError now
    sparse_candidate("abs(W)", config.pattern, config.allocation, config.sparsities[0], config.reconstruct)
    oracle_kind(METRIC_ORACLES, config.oracle)
    check_runner(config)


def seeds(config: AutopruneConfig) -> dict[str, str]:
    """The built-in metrics the final scores compare against (name -> canonical text)."""
    return {name: m.text for name, m in ((n, METRICS.get(n)) for n in METRICS.names())
            if config.gradient or not m.needs_gradient}


def _mean(values: list[float]) -> float:
    return math.nan if any(math.isnan(v) for v in values) else sum(values) / len(values)


def run(
    config: AutopruneConfig,
    setup: Setup,
    score: Score,
    transport: Transport | None = None,
    on_generation: Callable[[GenerationReport], None] | None = None,
) -> dict:
    """The metric search on ``setup``'s model, then the best metric and the built-ins on the test
    split at every sparsity. Returns the summary that ``best.json`` holds."""
    start = time.perf_counter()
    lineage = Lineage()
    oracle = make_metric_oracle(config.oracle, config.base_url, transport, lineage,
                                max_tokens=config.oracle_max_tokens or None, strict=config.oracle_strict,
                                schema=config.oracle_schema, api_key_env=config.api_key_env,
                                timeout=config.oracle_timeout)
    ctx = MetricContext(config.model, config.sparsities[0], config.pattern, config.allocation, config.seed,
                        config.gradient, config.data)
    params = SearchParams(population=config.population, mutations=config.mutations, crossovers=config.crossovers,
                          generations=config.generations, seed=config.seed)

    def candidates(text: str) -> list[dict]:
        return [sparse_candidate(text, config.pattern, config.allocation, s, config.reconstruct) for s in config.sparsities]

    def fitness_of(texts: list[str], split: str, windows: int | None, label: str) -> list[list[dict]]:
        n = len(config.sparsities)
        records = score([c for t in texts for c in candidates(t)], split, windows, advance=step(label, n * len(texts)))
        return [records[i * n:(i + 1) * n] for i in range(len(texts))]

    tally = Tally()
    fitness: dict[str, float] = {}
    invalid: dict[str, str] = {}  # metric -> why it cannot prune this model (its fitness is NaN: ranked last)
    index = 0  # the generation being scored

    def measure(batch: list[str], windows: int) -> list[float]:
        label = f"generation {index}/{params.generations}: candidates on {windows} fitness windows"
        per_metric = fitness_of(batch, "fitness", windows, label)
        invalid.update((text, r["invalid"]) for text, rs in zip(batch, per_metric) for r in rs if r.get("invalid"))
        tally.scored(batch, [{"cached": all(r.get("cached") for r in rs),
                              "tokens": sum(0 if r.get("cached") else r["tokens"] for r in rs)} for rs in per_metric])
        return [_mean([r["ppl"] for r in rs]) for rs in per_metric]

    evaluate = staged(measure, config.stages, config.fitness_windows)

    def member(text: str, f: float) -> dict:
        origin = lineage.nodes.get(text)
        return {"metric": text, "fitness": f, "source": origin.source if origin else "seed",
                "edit": origin.edit if origin else "", "parents": list(origin.parents) if origin else []}

    def hook(g: Generation) -> None:
        nonlocal index
        index = g.index + 1
        fitness.update(g.candidates)
        cached = tally.generation([t for t, _ in g.candidates])
        if on_generation is not None:
            rows = [member(t, f) | {"cached": c} for (t, f), c in zip(g.candidates, cached)]
            on_generation(GenerationReport(g.index, params.generations, rows, [member(t, f) for t, f in g.population],
                                           len(rows) - sum(cached), sum(cached),
                                           oracle_accounting(oracle, config.oracle_prices)))

    result = run_search(oracle, ctx, params, evaluate, hook)
    best = result.best  # a metric text
    compared = {"found": best} | seeds(config)
    scored = fitness_of(list(compared.values()), "test", config.test_windows,
                        "final test scoring: the best metric and the built-in ones")
    test = dict(zip(compared, scored))
    return {
        "metric": best,
        "key": sparse_candidate(best, config.pattern, config.allocation, config.sparsities[0])["metric"],
        "fitness": result.best_fitness,
        "lineage": [asdict(o) for o in lineage.chain(best)],
        "test_ppl": {name: {str(s): r["ppl"] for s, r in zip(config.sparsities, rs)} for name, rs in test.items()},
        "test_tokens": test["found"][0]["tokens"],
        "seqlen": config.seqlen,
        "graph": [asdict(o) | {"fitness": fitness.get(key)} for key, o in lineage.nodes.items()],
        "invalid": invalid,
        **run_record(config, setup, tally, oracle, result, start, test["found"][0]),
    }


def figures(summary: dict) -> dict[str, float]:
    """What the seeds of a metric search spread over: the found metric's fitness and test perplexity
    at each sparsity."""
    return {"fitness": summary["fitness"], **{f"test_ppl@{s}": v for s, v in summary["test_ppl"]["found"].items()}}


def autoprune(config: AutopruneConfig | None = None, on_generation: Callable[[GenerationReport], None] | None = None,
              **overrides) -> dict:
    """AutoPrune's metric search in this process, without Prefect: ``selfprune.autoprune(model=...,
    sparsities=[0.6])``. Writes ``out/best.json`` and returns the summary; ``selfprune autoprune``
    runs the same loop as a resumable, cached Prefect flow."""
    config = in_process(build_config(AutopruneConfig, **((config.model_dump() if config else {}) | overrides)))
    if config.seeds:
        return over_seeds(config, lambda one: autoprune(one, on_generation), figures)
    check(config)
    check_windows(config, load_tokenizer(config.model))
    bench = shared_workbench(config.model, calibration(config), config.device, config.dtype)
    setup = Setup(bench.arch, bench.lm.fingerprint, bench.stats_key)

    def score(specs: list[dict], split: str, windows: int | None, advance: Advance = ignore) -> list[dict]:
        how = scoring(config, split, windows)
        return one_by_one(lambda spec: bench.score(spec, how, tolerate_invalid=True).to_dict(), specs, advance)

    summary = run(config, setup, score, on_generation=on_generation)
    write_summary(summary, config.out)
    return summary
