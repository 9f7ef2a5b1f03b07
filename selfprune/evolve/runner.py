"""One search run, end to end: checks, the evolutionary loop, the final scores, the summary.

The library's :func:`search` and the Prefect flow (``flows/search.py``) both call :func:`run`; they
differ only in what they inject: how a batch of candidates is scored (here, directly on the
workbench; in the flow, through the cached Prefect task), how an oracle request is sent (the
openai client; the cached oracle task), and what happens after each generation (nothing; the
flow's artifacts and log line).
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import NamedTuple, Protocol

from .. import sparsity
from ..allocation import Alignment, kept_params, project_to_mean, rates_to_structure, structure_to_json, uniform
from ..allocators import ALLOCATIONS
from ..arch import Arch
from ..config import EvolutionConfig, SearchConfig, build_config
from ..data import split_windows
from ..devices import precision
from ..errors import UserError
from ..fileio import atomic_write_text
from ..methods import get_method
from ..metrics import resolve_metric
from ..models import load_arch, load_tokenizer
from ..progress import Advance, ignore, one_by_one, step
from ..protocol import protocol
from ..reconstruct import NONE, check_reconstruction
from ..seeds import over_seeds
from ..sparsity import parse_pattern
from ..workbench import Calibration, Scoring, reconstructed, shared_workbench
from .evolution import Generation, SearchParams, SearchResult, run_search
from .oracles import ORACLES, Oracle, SearchContext, Transport, make_oracle, oracle_kind


class Score(Protocol):
    """Scores candidates (as JSON) in order, one perplexity record each, a structure rebuilt with
    ``reconstruct``; ``advance(1)`` as each is scored (a progress step's, selfprune.progress). A
    record may carry "cached": True when an orchestrator's cache answered."""

    def __call__(self, candidates: list, split: str, windows: int | None, reconstruct: str = NONE, *,
                 advance: Advance = ignore) -> list[dict]: ...


# registered allocation names -> their rates at the search's ratio, in order
Allocate = Callable[[list[str]], list[list[float]]]


@dataclass(frozen=True)
class Setup:
    """What the search needs from the loaded model: its shapes and the identities that key caches."""

    arch: Arch
    model_fp: str
    stats_key: str


@dataclass(frozen=True)
class GenerationReport:
    """A generation as the hook sees it: rows for its new candidates, the population (best first)."""

    index: int
    generations: int
    rows: list[dict]
    population: list[dict]
    evaluated: int
    cached: int
    oracle: dict | None = None  # the LLM oracle's accounting so far (oracle_accounting)

    @property
    def best(self) -> float:
        return self.population[0]["fitness"]

    @property
    def mean(self) -> float:
        return sum(m["fitness"] for m in self.population) / len(self.population)


class Tally:
    """Which candidates of a generation were computed and which a cache answered: ``scored`` keeps
    the records of the batch just scored (a record may say ``"cached": True``); a candidate of the
    generation without one had been scored in an earlier generation, by the loop's own memo."""

    def __init__(self) -> None:
        self.records: dict[Hashable, dict] = {}
        self.evaluations = 0
        self.cache_hits = 0
        self.fitness_tokens = 0  # tokens scored on the fitness split by computed records, every stage

    def scored(self, keys: list[Hashable], records: list[dict]) -> None:
        self.records.update(zip(keys, records))
        self.fitness_tokens += sum(r.get("tokens", 0) for r in records if not r.get("cached"))

    def generation(self, keys: list[Hashable]) -> list[bool]:
        """Per candidate of the generation, whether it came from a cache; updates the totals."""
        cached = [k not in self.records or bool(self.records[k].get("cached")) for k in keys]
        self.records.clear()
        self.cache_hits += sum(cached)
        self.evaluations += len(cached) - sum(cached)
        return cached


def staged(measure: Callable[[list, int], list[float]], stages: list[tuple[int, float]], windows: int
           ) -> Callable[[list], list[float | None]]:
    """EvoPress's multi-step selection as an evaluation: ``measure(batch, w)`` scores on the first
    ``w`` fitness windows; each stage keeps the best ``keep`` fraction (at least one; ties by
    position) for the next, and the survivors get their fitness on all ``windows``. The others get
    None: screened out. Every stage is a cached evaluation of its own (its window count is in the key)."""

    def evaluate(batch: list) -> list[float | None]:
        alive = list(range(len(batch)))
        for w, keep in stages:
            values = measure([batch[i] for i in alive], w)
            ranked = sorted(range(len(alive)), key=lambda j: (math.inf if math.isnan(values[j]) else values[j], j))
            alive = sorted(alive[j] for j in ranked[:max(1, math.ceil(keep * len(alive)))])
        final = dict(zip(alive, measure([batch[i] for i in alive], windows)))
        return [final.get(i) for i in range(len(batch))]

    return evaluate


def calibration(config: EvolutionConfig) -> Calibration:
    return Calibration(config.data, config.samples, config.calib_seqlen, config.batch_size)


def scoring(config: EvolutionConfig, split: str, windows: int | None) -> Scoring:
    return Scoring(config.data, split, config.seqlen, windows or None, config.batch_size)


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


def check_runner(config: EvolutionConfig) -> None:
    """``--runner dask|ray`` has its Prefect integration installed (looked up, not imported)."""
    if config.runner != "local" and importlib.util.find_spec(f"prefect_{config.runner}") is None:
        raise UserError(f"--runner {config.runner} needs prefect-{config.runner}: pip install 'selfprune[{config.runner}]'")


def in_process(config: EvolutionConfig) -> EvolutionConfig:
    """The library's searches score in this process: a cluster runner is the flow's (``selfprune search``)."""
    if config.runner != "local":
        raise UserError(f"the library's search runs in this process; --runner {config.runner} runs through the flow: "
                        "selfprune search / autoprune, or selfprune.flows.search.search(config)")
    return config


def alignment(config: SearchConfig) -> Alignment:
    return Alignment(config.align_heads, config.align)


def check_windows(config: EvolutionConfig, tokenizer) -> None:
    """Each split holds the windows asked of it (a short test split fails now, not after the search).

    The token ids are memoized on disk, so the passes that follow do not tokenize again.
    """
    split_windows(tokenizer, config.data, "calibration", config.calib_seqlen, config.samples)
    split_windows(tokenizer, config.data, "fitness", config.seqlen, config.fitness_windows)
    split_windows(tokenizer, config.data, "test", config.seqlen, config.test_windows or None)


def search_objects(config: SearchConfig, arch: Arch, transport: Transport | None = None,
                   baselines: dict[str, list[float]] | None = None) -> tuple[SearchContext, SearchParams, Oracle]:
    """The pure search objects of ``config``: a candidate's identity is its pruned structure;
    ``baselines`` (name -> rates) join generation 0 and the LLM's prompts."""

    space = RateSpace(config, arch)

    def canonical(rates: list[float]) -> Hashable:
        return json.dumps(space.candidate(rates), sort_keys=True)

    ctx = SearchContext(model_name=config.model, n_layers=arch.n_layers, beta=config.ratio, p_max=config.p_max,
                        seed=config.seed, canonical=canonical, dataset=config.data,
                        baselines=tuple((name, tuple(rates)) for name, rates in (baselines or {}).items()))
    params = SearchParams(population=config.population, mutations=config.mutations, crossovers=config.crossovers,
                          generations=config.generations, seed=config.seed, random_init=config.random_init,
                          no_mutation=config.no_mutation, no_crossover=config.no_crossover)
    return ctx, params, make_oracle(config.oracle, config.base_url, transport,
                                    max_tokens=config.oracle_max_tokens or None, strict=config.oracle_strict,
                                    schema=config.oracle_schema, api_key_env=config.api_key_env,
                                    timeout=config.oracle_timeout)


def oracle_accounting(oracle: Oracle, prices: list[float]) -> dict | None:
    """How the LLM oracle's replies went (None for oracles that send none), and what its tokens
    cost at ``prices`` (USD per million prompt and completion tokens) when they are given. Replies
    replayed from the cache count too: this is what the search as a whole asked of the model."""
    if not hasattr(oracle, "accounting"):
        return None
    usage = oracle.accounting()
    if prices:
        usage["cost_usd"] = round((prices[0] * usage["prompt_tokens"] + prices[1] * usage["completion_tokens"]) / 1e6, 6)
    return usage


def baseline_rates(config: SearchConfig, allocate: Allocate | None) -> dict[str, list[float]]:
    """``config.baselines`` by name -> their rates at the ratio, projected into [0, p_max] where
    one exceeds it (the search's own bounds); empty without an ``allocate``."""
    if not config.baselines or allocate is None:
        return {}
    found = allocate(list(config.baselines))
    return {name: rates if max(rates) <= config.p_max else project_to_mean(rates, config.ratio, config.p_max)
            for name, rates in zip(config.baselines, found)}


def baseline_record(baselines: dict[str, list[float]], first: dict[Hashable, float], canonical, best_fitness: float) -> dict:
    """Each baseline's fitness in generation 0 (None: screened out by a fitness stage) and how far
    below the best of them the search's best lies (a share of its fitness)."""
    rows = [{"name": name, "rates": rates, "fitness": first.get(canonical(rates))} for name, rates in baselines.items()]
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
    def sparse(self) -> tuple[str, sparsity.Pattern] | None:
        """The canonical metric and the pattern of a sparsity search; None for structured rates."""
        c = self.config
        return None if c.pattern is None else (resolve_metric(c.metric).text, parse_pattern(c.pattern))

    def candidate(self, rates: list[float]) -> list | dict:
        if self.sparse is None:
            return structure_to_json(rates_to_structure(self.arch, rates, alignment(self.config)))
        metric, pattern = self.sparse
        return {"metric": metric, "pattern": pattern.text, "rates": [round(r, 5) for r in rates],
                "sparsity": self.config.ratio}

    def kept_params(self, rates: list[float]) -> int:
        """Parameters the candidate keeps (of the prunable ones, for a sparse candidate: its nonzeros)."""
        if self.sparse is None:
            return kept_params(self.arch, rates_to_structure(self.arch, rates, alignment(self.config)))
        return sparsity.weights(self.arch) - sparsity.zeros(self.arch, [round(r, 5) for r in rates], self.sparse[1])

    def member(self, rates: list[float], fitness: float) -> dict:
        return {"rates": rates, "structure": self.candidate(rates), "fitness": fitness, "kept_params": self.kept_params(rates)}

    def rebuilt_ppl(self, score: Score, batch: list[list[float]], split: str, windows: int | None) -> list[float]:
        """Perplexities of the candidates of ``batch`` rebuilt with ``config.reconstruct``: a sparse
        candidate carries its reconstruction, a structure is scored with it."""
        how = self.config.reconstruct
        advance = step(f"reconstructed candidates on {split} windows", len(batch))
        if self.sparse is None:
            records = score([self.candidate(rates) for rates in batch], split, windows, how, advance=advance)
        else:
            records = score([reconstructed(self.candidate(rates), how) for rates in batch], split, windows,
                            advance=advance)
        return [r["ppl"] for r in records]

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
                        first: dict[Hashable, float], canonical) -> list[Choice]:
    """What is rebuilt after the search: its best, or with ``reconstruct_top`` N its N best and
    every baseline (each once; a baseline that survived in the population keeps its name)."""
    found = [Choice(f"search #{i + 1}", rates, f) for i, (rates, f) in enumerate(result.population)]
    if config.reconstruct_top == 1:
        return found[:1]
    named = {canonical(rates): Choice(name, rates, first.get(canonical(rates))) for name, rates in baselines.items()}
    top = [named.pop(canonical(c.rates), c) for c in found[:config.reconstruct_top]]
    return top + list(named.values())


def run(
    config: SearchConfig,
    setup: Setup,
    score: Score,
    transport: Transport | None = None,
    on_generation: Callable[[GenerationReport], None] | None = None,
    allocate: Allocate | None = None,
) -> dict:
    """Algorithm 1 on ``setup``'s model, then the best and uniform Wanda-sp on the test split.
    ``allocate`` gives the rates of ``config.baselines``, which join generation 0.

    Returns the summary that ``best.json`` holds. ``evaluations`` counts candidates computed,
    ``cache_hits`` those a cache answered (``score``'s "cached" records, and structures the loop
    had scored in an earlier generation); the final test scores are in neither.
    """
    start = time.perf_counter()
    arch = setup.arch
    baselines = baseline_rates(config, allocate)
    ctx, params, oracle = search_objects(config, arch, transport, baselines)
    space = RateSpace(config, arch)
    tally = Tally()
    first: dict[Hashable, float] = {}  # generation 0's fitness by canonical candidate
    index = 0  # the generation being scored

    def measure(batch: list[list[float]], windows: int) -> list[float]:
        advance = step(f"generation {index}/{params.generations}: candidates on {windows} fitness windows", len(batch))
        results = score([space.candidate(rates) for rates in batch], "fitness", windows, advance=advance)
        tally.scored([tuple(rates) for rates in batch], results)
        return [r["ppl"] for r in results]

    evaluate = staged(measure, config.stages, config.fitness_windows)

    def hook(g: Generation) -> None:
        nonlocal index
        index = g.index + 1
        if g.index == 0:
            first.update((ctx.canonical(rates), f) for rates, f in g.candidates)
        cached = tally.generation([tuple(rates) for rates, _ in g.candidates])
        rows = [space.member(rates, f) | {"cached": c} for (rates, f), c in zip(g.candidates, cached)]
        if on_generation is not None:
            population = [space.member(rates, f) for rates, f in g.population]
            on_generation(GenerationReport(g.index, params.generations, rows, population, len(rows) - sum(cached),
                                           sum(cached), oracle_accounting(oracle, config.oracle_prices)))

    result = run_search(oracle, ctx, params, evaluate, hook, known=list(baselines.values()))
    best = space.member(result.best, result.best_fitness)
    uniform_structure = space.candidate(uniform(arch.n_layers, config.ratio))
    final = partial(score, advance=step("final test scoring: the best and uniform (test), uniform (fitness)", 3))
    test, uniform_test = final([best["structure"], uniform_structure], "test", config.test_windows)
    (uniform_fitness,) = final([uniform_structure], "fitness", config.fitness_windows)
    rebuilt = ({} if config.reconstruct == NONE else
               space.rebuilt(score, reconstruct_choices(config, result, baselines, first, ctx.canonical), config.test_windows))
    return {
        "rates": best["rates"],
        "structure": best["structure"],
        "fitness": best["fitness"],
        "kept_params": best["kept_params"],
        "test_ppl": test["ppl"],
        "test_tokens": test["tokens"],
        "seqlen": config.seqlen,
        "uniform_fitness": uniform_fitness["ppl"],
        "uniform_test_ppl": uniform_test["ppl"],
        **rebuilt,
        **baseline_record(baselines, first, ctx.canonical, best["fitness"]),
        **run_record(config, setup, tally, oracle, result, start, test),
    }


def measured_under(config: EvolutionConfig, setup: Setup, split: str, record: dict) -> dict:
    """The protocol of a perplexity ``record`` this search measured on ``split``."""
    return protocol(config.model, setup.model_fp, vars(scoring(config, split, None)), record, vars(calibration(config)),
                    config.device, config.dtype, config.seed)


def run_record(config: EvolutionConfig, setup: Setup, tally: Tally, oracle, result, start: float, test: dict) -> dict:
    """What every search's summary holds besides its best: counts, the oracle's accounting, wall
    time, the per-generation history, the protocols of its test and fitness figures (``test``: a
    test-split record), and the identities and settings it ran with."""
    fitness = {"seqlen": config.seqlen, "windows": config.fitness_windows}
    return {
        "evaluations": tally.evaluations,
        "cache_hits": tally.cache_hits,
        "fitness_tokens": tally.fitness_tokens,
        "oracle_calls": getattr(oracle, "calls", 0),
        "oracle_fallbacks": getattr(oracle, "fallbacks", 0),
        "oracle": oracle_accounting(oracle, config.oracle_prices),
        # the loop and its final scores only, from run()'s start: not the model's loading, the calibration
        # pass or Prefect's start, which the CLI's closing line ("N s in all") counts too
        "wall_s": round(time.perf_counter() - start, 2),
        "history": [{"generation": h.generation, "best": h.best, "mean": h.mean} for h in result.history],
        "model_fingerprint": setup.model_fp,
        "stats_key": setup.stats_key,
        "precision": precision(config.device, config.dtype),
        "protocol": measured_under(config, setup, "test", test),
        "fitness_protocol": measured_under(config, setup, "fitness", fitness),
        "config": config.model_dump(),
    }


def figures(summary: dict) -> dict[str, float]:
    """What the seeds of a search spread over: its best's fitness and test perplexity (and uniform's),
    and the test perplexity after reconstruction when the search rebuilt its best."""
    names = ("fitness", "test_ppl", "uniform_test_ppl", "reconstructed_test_ppl")
    return {name: summary[name] for name in names if name in summary}


def write_summary(summary: dict, out: str | Path) -> Path:
    """``out/best.json``, written atomically (a reader never sees half a file)."""
    path = Path(out) / "best.json"
    atomic_write_text(path, json.dumps(summary, indent=2))
    return path


def search(config: SearchConfig | None = None, on_generation: Callable[[GenerationReport], None] | None = None,
           **overrides) -> dict:
    """Self-Pruner's search in this process, without Prefect: ``selfprune.search(model=..., ratio=...)``.

    Takes a :class:`SearchConfig` or its fields as keywords; writes ``out/best.json`` and returns
    the summary. Nothing is cached between calls but the statistics (in the artifact store); the
    ``selfprune search`` command runs the same loop as a resumable, cached Prefect flow.
    """
    config = in_process(build_config(SearchConfig, **((config.model_dump() if config else {}) | overrides)))
    if config.seeds:
        return over_seeds(config, lambda one: search(one, on_generation), figures)
    check(config)
    check_windows(config, load_tokenizer(config.model))
    bench = shared_workbench(config.model, calibration(config), config.device, config.dtype, config.method)
    setup = Setup(bench.arch, bench.lm.fingerprint, bench.stats_key)

    def score(candidates: list, split: str, windows: int | None, reconstruct: str = NONE,
              advance: Advance = ignore) -> list[dict]:
        how = scoring(config, split, windows)
        return one_by_one(lambda c: bench.score(c, how, reconstruct).to_dict(), candidates, advance)

    def allocate(names: list[str]) -> list[list[float]]:
        if config.pattern is None:
            return [bench.allocate(name, config.ratio) for name in names]
        metric, pattern = resolve_metric(config.metric), parse_pattern(config.pattern)
        return [bench.sparse_rates(metric, name, config.ratio, pattern) for name in names]

    summary = run(config, setup, score, on_generation=on_generation, allocate=allocate)
    write_summary(summary, config.out)
    return summary
