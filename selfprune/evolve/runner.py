"""Self-Pruner's rate search: its checks, its search space (:class:`RateSpace`: rates -> a
structure, or a metric's per-layer sparsities), baselines in generation 0, the final scores
against uniform and the reconstruction of the best; ``selfprune.search``.

The pipeline around it (the loop, scoring, accounting, the in-process run) is the metric
search's too: :mod:`.pipeline`. The Prefect flow (``flows/search.py``) calls :func:`run` with its
cached tasks injected.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace
from functools import cached_property, partial
from pathlib import Path
from typing import NamedTuple

from ..allocators import ALLOCATIONS
from ..allocators.rates import project_to_mean, uniform
from ..config import SearchConfig
from ..core.errors import UserError
from ..core.progress import step
from ..engine.candidate import Candidate, Sparse, Structured
from ..engine.models import load_arch
from ..engine.workbench import Workbench
from ..llm.chat import Transport
from ..methods.registry import get_method
from ..methods.sparsity import parse_pattern
from ..methods.structure import Alignment, rates_to_structure
from ..metrics import resolve_metric
from ..model.arch import Arch
from ..model.devices import precision
from ..reconstruct import NONE, check_reconstruction
from ..seeds import SeedsSummary
from .evolution import SearchParams, SearchResult
from .oracle_registry import ORACLES, make_oracle, oracle_kind
from .pipeline import (
    Allocate,
    GenerationReport,
    Injected,
    RunRecord,
    Score,
    Search,
    Setup,
    Summary,
    check_runner,
    evolve,
    run_library,
    run_record,
)
from .search_context import Oracle, SearchContext


def check(config: SearchConfig) -> None:
    """Every check that needs no weights: device and dtype, method and oracle names, and an
    alignment against the model's config (read only when one is asked for). Fails fast."""
    precision(config.device, config.dtype)
    get_method(config.method)
    if config.pattern is not None and parse_pattern(config.pattern).fixed_sparsity is not None:
        raise UserError(f"--pattern {config.pattern} prunes every layer alike: there are no per-layer sparsities to "
                        "search; use unstructured or unstructured-layer (selfprune prune --metric ... --pattern "
                        f"{config.pattern} builds that model)")
    if config.pattern is not None:
        resolve_metric(config.metric)
    check_reconstruction(config.reconstruct, "structured" if config.pattern is None else "sparse")
    if config.reconstruct_top > 1 and config.reconstruct == NONE:
        raise UserError(f"--reconstruct-top {config.reconstruct_top} picks among candidates rebuilt with a "
                        "reconstruction: add --reconstruct lsq (structured) or sparsegpt (with --pattern)")
    for name in config.baselines:
        if name not in ALLOCATIONS:
            raise UserError(f"--baselines {name!r} is not a registered allocation; use any of "
                            f"{', '.join(ALLOCATIONS.names())}, or none")
    oracle_kind(ORACLES, config.oracle)
    check_runner(config)
    align = alignment(config)
    if align != Alignment():
        align.check(load_arch(config.model))


def alignment(config: SearchConfig) -> Alignment:
    return Alignment(config.align_heads, config.align)


def search_objects(config: SearchConfig, arch: Arch, transport: Transport | None = None,
                   baselines: dict[str, list[float]] | None = None) -> tuple[SearchContext, SearchParams, Oracle]:
    """The pure search objects of ``config``: a candidate's identity is its pruned structure;
    ``baselines`` (name -> rates) join generation 0 and the LLM's prompts."""

    space = RateSpace(config, arch)

    ctx = SearchContext(model_name=config.model, n_layers=arch.n_layers, beta=config.ratio, p_max=config.p_max,
                        seed=config.seed, canonical=space.candidate, dataset=config.data,
                        baselines=tuple((name, tuple(rates)) for name, rates in (baselines or {}).items()))
    params = SearchParams(population=config.population, mutations=config.mutations, crossovers=config.crossovers,
                          generations=config.generations, seed=config.seed, random_init=config.random_init,
                          no_mutation=config.no_mutation, no_crossover=config.no_crossover)
    return ctx, params, make_oracle(config.oracle, config.base_url, transport,
                                    max_tokens=config.oracle_max_tokens or None, strict=config.oracle_strict,
                                    schema=config.oracle_schema, api_key_env=config.api_key_env,
                                    timeout=config.oracle_timeout)


def baseline_rates(config: SearchConfig, allocate: Allocate | None) -> dict[str, list[float]]:
    """``config.baselines`` by name -> their rates at the ratio, projected into [0, p_max] where
    one exceeds it (the search's own bounds); empty without an ``allocate``."""
    if not config.baselines or allocate is None:
        return {}
    found = allocate(list(config.baselines))
    return {name: rates if max(rates) <= config.p_max else project_to_mean(rates, config.ratio, config.p_max)
            for name, rates in zip(config.baselines, found)}


def baseline_record(baselines: dict[str, list[float]], fitness: dict[Hashable, float], canonical, best_fitness: float) -> dict:
    """Each baseline's fitness (None: screened out by a fitness stage) and how far below the best
    of them the search's best lies (a share of its fitness)."""
    rows = [{"name": name, "rates": rates, "fitness": fitness.get(canonical(rates))} for name, rates in baselines.items()]
    scored = [r for r in rows if r["fitness"] is not None]
    if not scored:
        return {"baselines": rows}
    best = min(scored, key=lambda r: r["fitness"])
    return {"baselines": rows, "best_baseline": {"name": best["name"], "fitness": best["fitness"]},
            "beyond_best_baseline": 1 - best_fitness / best["fitness"]}


@dataclass(frozen=True)
class RateSpace:
    """What a rate vector stands for: per-layer pruning rates of whole units (a structure, the
    paper's search), or with ``config.pattern`` per-layer sparsities of a metric's single-weight
    pruning (``{"metric", "pattern", "rates", "sparsity"}``, rates at the prompts' 5 decimals)."""

    config: SearchConfig
    arch: Arch

    @cached_property
    def sparse(self) -> Sparse | None:
        """A sparsity search's candidate at uniform rates (its canonical metric and pattern); None for structured rates."""
        c = self.config
        return None if c.pattern is None else Sparse.of(c.metric, c.pattern, c.ratio, rates=uniform(self.arch.n_layers, c.ratio))

    def candidates(self, rates: list[float]) -> list[Candidate]:
        return [self.candidate(rates)]

    def candidate(self, rates: list[float]) -> Structured | Sparse:
        """The candidate ``rates`` stand for: its identity in the search (equal candidates are one)."""
        if self.sparse is None:
            return Structured(rates_to_structure(self.arch, rates, alignment(self.config)))
        return replace(self.sparse, rates=tuple(round(r, 5) for r in rates))  # the prompts' 5 decimals

    def member(self, rates: list[float], fitness: float) -> dict:
        c = self.candidate(rates)
        return {"rates": rates, "structure": c.to_json(), "fitness": fitness, "kept_params": c.size(self.arch).kept_params}

    def rebuilt_ppl(self, score: Score, batch: list[list[float]], split: str, windows: int | None) -> list[float]:
        """Perplexities of the candidates of ``batch`` rebuilt with ``config.reconstruct``."""
        advance = step(f"reconstructed candidates on {split} windows", len(batch))
        rebuilt = [replace(self.candidate(rates), reconstruct=self.config.reconstruct) for rates in batch]
        return [m.ppl for m in score(rebuilt, split, windows, advance=advance)]

    def rebuilt(self, score: Score, choices: list[Choice], windows: int | None) -> dict:
        """The candidate kept after reconstruction, and its test perplexity. With one choice (the
        search's best) nothing is compared; with several, each is rebuilt and scored on the fitness
        split, and the lowest is kept: the mask's fitness does not rank what a refit repairs."""
        record: dict = {"reconstruct": self.config.reconstruct}
        kept = choices[0]
        if len(choices) > 1:
            after = self.rebuilt_ppl(score, [c.rates for c in choices], "fitness", self.config.fitness_windows)
            record["reconstructed_choices"] = [{"name": c.name, "fitness": c.fitness, "reconstructed_fitness": f}
                                               for c, f in zip(choices, after)]
            kept, fitness = min(zip(choices, after), key=lambda pair: pair[1])
            record["reconstructed"] = {"name": kept.name, **self.member(kept.rates, kept.fitness),
                                       "reconstructed_fitness": fitness}
        (record["reconstructed_test_ppl"],) = self.rebuilt_ppl(score, [kept.rates], "test", windows)
        return record


class Choice(NamedTuple):
    """A candidate offered for reconstruction: where it came from, its rates, its fitness on masks."""

    name: str
    rates: list[float]
    fitness: float | None


def reconstruct_choices(config: SearchConfig, result: SearchResult, baselines: dict[str, list[float]],
                        fitness: dict[Hashable, float], canonical) -> list[Choice]:
    """What is rebuilt after the search: its best, or with ``reconstruct_top`` N its N best and
    every baseline (each once; a baseline that survived in the population keeps its name)."""
    found = [Choice(f"search #{i + 1}", rates, f) for i, (rates, f) in enumerate(result.population)]
    if config.reconstruct_top == 1:
        return found[:1]
    named = {canonical(rates): Choice(name, rates, fitness.get(canonical(rates))) for name, rates in baselines.items()}
    top = [named.pop(canonical(c.rates), c) for c in found[:config.reconstruct_top]]
    return top + list(named.values())


@dataclass(frozen=True, kw_only=True)
class RateSummary(Summary):
    """A rate search's summary, what ``best.json`` holds: its best (rates, structure, fitness, kept
    parameters), the test perplexities of the best and of uniform, the reconstruction's figures
    when it rebuilt candidates, the baselines' fitness, the run record, and the export commands.
    ``oracle_replays``: the flow's LLM replies answered by its cache (the library's run has none)."""

    rates: list[float]
    structure: dict
    fitness: float
    kept_params: int
    test_ppl: float
    test_tokens: int
    seqlen: int
    uniform_fitness: float
    uniform_test_ppl: float
    reconstruct: str | None = None  # these four with --reconstruct; the choices and the kept one with --reconstruct-top N
    reconstructed_choices: list[dict] | None = None
    reconstructed: dict | None = None
    reconstructed_test_ppl: float | None = None
    baselines: list[dict]  # name, rates and fitness of each of --baselines
    best_baseline: dict | None = None  # these two when a baseline was scored on every fitness stage
    beyond_best_baseline: float | None = None
    record: RunRecord
    export: dict[str, str]
    oracle_replays: int | None = None


def run(config: SearchConfig, setup: Setup, injected: Injected) -> RateSummary:
    """Algorithm 1 on ``setup``'s model, then the best and uniform Wanda-sp on the test split.
    ``injected.allocate`` gives the rates of ``config.baselines``, which join generation 0.

    Returns the summary that ``best.json`` holds. ``evaluations`` counts candidates computed,
    ``cache_hits`` those a cache answered (``score``'s "cached" records, and structures the loop
    had scored in an earlier generation); the final test scores are in neither.
    """
    start = time.perf_counter()
    arch, score = setup.arch, injected.score
    baselines = baseline_rates(config, injected.allocate)
    ctx, params, oracle = search_objects(config, arch, injected.transport, baselines)
    space = RateSpace(config, arch)
    evolved = evolve(space, oracle, ctx, params, config, score, injected.on_generation, known=list(baselines.values()))
    result = evolved.result
    best = space.member(result.best, result.best_fitness)
    uniform_structure = space.candidate(uniform(arch.n_layers, config.ratio))
    final = partial(score, advance=step("final test scoring: the best and uniform (test), uniform (fitness)", 3))
    test, uniform_test = final([space.candidate(result.best), uniform_structure], "test", config.test_windows)
    (uniform_fitness,) = final([uniform_structure], "fitness", config.fitness_windows)
    choices = reconstruct_choices(config, result, baselines, evolved.fitness, ctx.canonical)
    rebuilt = {} if config.reconstruct == NONE else space.rebuilt(score, choices, config.test_windows)
    return RateSummary(
        **best, test_ppl=test.ppl, test_tokens=test.tokens, seqlen=config.seqlen, uniform_fitness=uniform_fitness.ppl,
        uniform_test_ppl=uniform_test.ppl, **rebuilt,
        **baseline_record(baselines, evolved.fitness, ctx.canonical, best["fitness"]),
        record=run_record(config, setup, evolved, oracle, start, test), export=export_commands(config))


def export_commands(config: SearchConfig) -> dict[str, str]:
    """How the searched model is built and written for llama.cpp: ``prune`` takes the rest of its
    settings from this best.json (:mod:`selfprune.searched`)."""
    out = Path(config.out)
    model = shlex.quote(config.model)
    return {"prune": f"selfprune prune --model {model} --ratio {config.ratio} --allocation {shlex.quote(str(out / 'best.json'))} "
                     f"--out {shlex.quote(str(out / 'model'))}",
            "gguf": f"selfprune export-gguf {shlex.quote(str(out / 'model'))} {shlex.quote(str(out / 'model.q4_k_m.gguf'))} "
                    "--quant q4_k_m"}


def figures(summary: RateSummary) -> dict[str, float]:
    """What the seeds of a search spread over: its best's fitness and test perplexity (and uniform's),
    and the test perplexity after reconstruction when the search rebuilt its best."""
    names = ("fitness", "test_ppl", "uniform_test_ppl", "reconstructed_test_ppl")
    return {name: getattr(summary, name) for name in names if getattr(summary, name) is not None}


def in_process_allocator(config: SearchConfig, bench: Workbench) -> Allocate:
    """The baselines' rates on the loaded model: a structure's allocation, or a metric's sparsities."""

    def allocate(names: list[str]) -> list[list[float]]:
        if config.pattern is None:
            return [bench.pruner.allocate(name, config.ratio) for name in names]
        metric, pattern = resolve_metric(config.metric), parse_pattern(config.pattern)
        return [bench.pruner.sparse_rates(metric, name, config.ratio, pattern) for name in names]

    return allocate


RATES = Search("rates", SearchConfig, check, run, RateSummary, figures, fallback="GA", allocator=in_process_allocator)


def search(config: SearchConfig | None = None, on_generation: Callable[[GenerationReport], None] | None = None,
           **overrides) -> RateSummary | SeedsSummary:
    """Self-Pruner's search in this process, without Prefect: ``selfprune.search(model=..., ratio=...)``.

    Takes a :class:`SearchConfig` or its fields as keywords; writes ``out/best.json`` and returns
    the summary (with ``seeds``, the seeds' summary, ``out/seeds.json``).
    Nothing is cached between calls but the statistics (in the artifact store); the
    ``selfprune search`` command runs the same loop as a resumable, cached Prefect flow.
    """
    return run_library(RATES, config, on_generation, overrides)
