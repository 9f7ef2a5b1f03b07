"""One search pipeline, two search spaces: the checks, the evolutionary loop with its scoring and
accounting, the summary's common record, and the :class:`Search` declaration that the library's
in-process run (:func:`run_library`) and the flows' one body (``flows/evolution.run_flow``) run.

The rate search (:data:`.runner.RATES`, Self-Pruner) and the metric search
(:data:`.autoprune.METRIC`, AutoPrune) differ only in their :class:`Space` (what a member is, the
candidates it is scored by, its row), their oracle and their final scores. The library and the
Prefect flows differ only in what they inject (:class:`Injected`): how a batch of candidates is
scored (directly on the workbench; through the cached Prefect task), how an oracle request is sent
(the openai client; the cached oracle task), how the baselines are allocated, and what happens
after each generation.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Generic, Protocol, Self, TypeVar

from ..config import EvolutionConfig, build_config
from ..core.errors import UserError
from ..core.progress import Advance, ignore, one_by_one, step
from ..data.corpora import split_windows
from ..engine.candidate import Candidate
from ..engine.models import load_tokenizer
from ..engine.settings import Calibration, ModelSpec, Scoring
from ..engine.shared import shared_workbench
from ..engine.workbench import Workbench
from ..llm.chat import Transport
from ..model.arch import Arch
from ..model.devices import precision
from ..model.ppl import Perplexity
from ..protocol import protocol
from ..seeds import SeedsSummary, over_seeds
from ..storage.fileio import atomic_write_text
from .evolution import Generation, SearchParams, SearchResult, run_search
from .search_context import Oracle, SearchContext

Member = TypeVar("Member")  # what the oracle proposes: a rate vector, a metric text


@dataclass(frozen=True)
class Measurement(Perplexity):
    """A candidate's perplexity as a search reads it: whether an orchestrator's cache answered (a
    computed one counts toward the run's evaluations and tokens), and why a metric could not prune
    the model (``invalid``; its perplexity is NaN)."""

    cached: bool = False
    invalid: str | None = None

    @classmethod
    def of(cls, record: dict, cached: bool = False) -> Measurement:
        """From a perplexity record: a scoring task's JSON result, or :meth:`Perplexity.to_dict`."""
        return cls(*(record[f.name] for f in fields(Perplexity)), cached=cached, invalid=record.get("invalid") or None)


class Score(Protocol):
    """Scores candidates in order, one :class:`Measurement` each; ``advance(1)`` as each is scored
    (a progress step's, selfprune.core.progress)."""

    def __call__(self, candidates: list[Candidate], split: str, windows: int | None, *,
                 advance: Advance = ignore) -> list[Measurement]: ...


class Space(Protocol[Member]):
    """What a search searches: the candidates a member is scored by (its fitness is the mean of
    their perplexities) and the row that shows it."""

    def candidates(self, member: Member) -> list[Candidate]: ...

    def member(self, member: Member, fitness: float) -> dict: ...


@dataclass(frozen=True)
class Setup:
    """What the search needs from the loaded model: its shapes and the identities that key caches."""

    arch: Arch
    spec: ModelSpec
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
    """Which members of a generation were computed and which a cache answered: ``scored`` keeps
    whether each member of the batch just scored came whole from a cache; a member of the
    generation not scored in it had been scored in an earlier generation, by the loop's own memo."""

    def __init__(self) -> None:
        self.records: dict[Hashable, bool] = {}  # member -> all its candidates came from a cache
        self.evaluations = 0
        self.cache_hits = 0
        self.fitness_tokens = 0  # tokens scored on the fitness split by computed candidates, every stage

    def scored(self, keys: list[Hashable], per_member: list[list[Measurement]]) -> None:
        self.records.update((k, all(m.cached for m in ms)) for k, ms in zip(keys, per_member))
        self.fitness_tokens += sum(m.tokens for ms in per_member for m in ms if not m.cached)

    def generation(self, keys: list[Hashable]) -> list[bool]:
        """Per member of the generation, whether it came from a cache; updates the totals."""
        cached = [self.records.get(k, True) for k in keys]
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


def model_spec(config: EvolutionConfig, fingerprint: str) -> ModelSpec:
    return ModelSpec(config.model, fingerprint, config.device, config.dtype, config.method)


def calibration(config: EvolutionConfig) -> Calibration:
    return Calibration(config.data, config.samples, config.calib_seqlen, config.batch_size)


def scoring(config: EvolutionConfig, split: str, windows: int | None) -> Scoring:
    return Scoring(config.data, split, config.seqlen, windows or None, config.batch_size)


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


def check_windows(config: EvolutionConfig, tokenizer) -> None:
    """Each split holds the windows asked of it (a short test split fails now, not after the search).

    The token ids are memoized on disk, so the passes that follow do not tokenize again.
    """
    split_windows(tokenizer, config.data, "calibration", config.calib_seqlen, config.samples)
    split_windows(tokenizer, config.data, "fitness", config.seqlen, config.fitness_windows)
    split_windows(tokenizer, config.data, "test", config.seqlen, config.test_windows or None)


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


def _mean(values: list[float]) -> float:
    return math.nan if any(math.isnan(v) for v in values) else sum(values) / len(values)


def score_members(space: Space, score: Score, members: list, split: str, windows: int | None, label: str
                  ) -> list[list[Measurement]]:
    """Each member's measurements, its candidates scored as one batch (a step of ``label``)."""
    per_member = [space.candidates(m) for m in members]
    records = score([c for cs in per_member for c in cs], split, windows, advance=step(label, sum(map(len, per_member))))
    out, at = [], 0
    for cs in per_member:
        out.append(records[at:at + len(cs)])
        at += len(cs)
    return out


@dataclass
class Evolved:
    """What the loop leaves for a search's final scores: its result, what was computed, every
    member's fitness by canonical identity, and the members that could not be built (why)."""

    result: SearchResult
    tally: Tally
    fitness: dict[Hashable, float] = field(default_factory=dict)
    invalid: dict[Hashable, str] = field(default_factory=dict)


def evolve(space: Space, oracle: Oracle, ctx: SearchContext, params: SearchParams, config: EvolutionConfig,
           score: Score, on_generation: Callable[[GenerationReport], None] | None = None, known: Sequence = ()) -> Evolved:
    """Algorithm 1 (:func:`run_search`) with a member's fitness the mean fitness-split perplexity of
    its candidates, through ``config.stages``; ``on_generation`` sees each generation's rows."""
    tally = Tally()
    evolved_fitness: dict[Hashable, float] = {}
    invalid: dict[Hashable, str] = {}
    index = 0  # the generation being scored

    def measure(batch: list, windows: int) -> list[float]:
        label = f"generation {index}/{params.generations}: candidates on {windows} fitness windows"
        per_member = score_members(space, score, batch, "fitness", windows, label)
        keys = [ctx.canonical(m) for m in batch]
        invalid.update((k, m.invalid) for k, ms in zip(keys, per_member) for m in ms if m.invalid)
        tally.scored(keys, per_member)
        return [_mean([m.ppl for m in ms]) for ms in per_member]

    def hook(g: Generation) -> None:
        nonlocal index
        index = g.index + 1
        evolved_fitness.update((ctx.canonical(m), f) for m, f in g.candidates)
        cached = tally.generation([ctx.canonical(m) for m, _ in g.candidates])
        if on_generation is not None:
            rows = [space.member(m, f) | {"cached": c} for (m, f), c in zip(g.candidates, cached)]
            on_generation(GenerationReport(g.index, params.generations, rows, [space.member(m, f) for m, f in g.population],
                                           len(rows) - sum(cached), sum(cached),
                                           oracle_accounting(oracle, config.oracle_prices)))

    result = run_search(oracle, ctx, params, staged(measure, config.stages, config.fitness_windows), hook, known=known)
    return Evolved(result, tally, evolved_fitness, invalid)


def measured_under(config: EvolutionConfig, setup: Setup, split: str, seqlen: int, windows: int | None) -> dict:
    """The protocol of a perplexity this search measured on ``split`` (``windows`` of ``seqlen`` tokens)."""
    return protocol(config.model, setup.spec.fingerprint, vars(scoring(config, split, None)),
                    {"seqlen": seqlen, "windows": windows}, vars(calibration(config)), config.device, config.dtype, config.seed)


@dataclass(frozen=True)
class GenerationFitness:
    """One generation's line of a summary's history: its population's best and mean fitness."""

    generation: int
    best: float
    mean: float


@dataclass(frozen=True)
class RunRecord:
    """What every search's summary holds besides its best: counts, the oracle's accounting, wall
    time, the per-generation history, the protocols of its test and fitness figures, and the
    identities and settings it ran with. Its fields are best.json's keys, in their order."""

    evaluations: int  # candidates computed
    cache_hits: int  # candidates a cache (or the loop's memo) answered
    fitness_tokens: int
    oracle_calls: int
    oracle_fallbacks: int
    oracle: dict | None  # the LLM oracle's accounting (oracle_accounting); None for the offline oracles
    wall_s: float
    history: list[GenerationFitness]
    model_fingerprint: str
    stats_key: str
    precision: dict
    protocol: dict
    fitness_protocol: dict
    config: dict

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> RunRecord:
        return cls(**{f.name: data[f.name] for f in fields(cls)} | {
            "history": [GenerationFitness(**h) for h in data["history"]]})


def run_record(config: EvolutionConfig, setup: Setup, evolved: Evolved, oracle: Oracle, start: float,
               test: Measurement) -> RunRecord:
    """The run record of a search that started at ``start`` (``test``: its test-split measurement)."""
    tally = evolved.tally
    return RunRecord(
        evaluations=tally.evaluations,
        cache_hits=tally.cache_hits,
        fitness_tokens=tally.fitness_tokens,
        oracle_calls=getattr(oracle, "calls", 0),
        oracle_fallbacks=getattr(oracle, "fallbacks", 0),
        oracle=oracle_accounting(oracle, config.oracle_prices),
        # the loop and its final scores only, from run()'s start: not the model's loading, the calibration
        # pass or Prefect's start, which the CLI's closing line ("N s in all") counts too
        wall_s=round(time.perf_counter() - start, 2),
        history=[GenerationFitness(h.generation, h.best, h.mean) for h in evolved.result.history],
        model_fingerprint=setup.spec.fingerprint,
        stats_key=setup.stats_key,
        precision=precision(config.device, config.dtype),
        protocol=measured_under(config, setup, "test", test.seqlen, test.windows),
        fitness_protocol=measured_under(config, setup, "fitness", config.seqlen, config.fitness_windows),
        config=config.model_dump(),
    )


class Summary:
    """A search's summary as a typed value, JSON only at the edges (best.json, a flow's result).

    A subclass is a frozen dataclass whose fields are best.json's keys in their order, but for
    ``record`` (the :class:`RunRecord`, whose keys take its place) and the optional fields (default
    None), which best.json holds only when set: so :meth:`to_json` writes the file as the dicts
    before it did, and :meth:`from_json` is the one place a best.json is read back. Every subclass
    has ``record`` and ``oracle_replays``, where the flow sets the oracle requests it sent and replayed.
    """

    def to_json(self) -> dict:
        out: dict = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "record":
                out |= value.to_json()
            elif value is not None or f.default is not None:
                out[f.name] = value
        return out

    @classmethod
    def from_json(cls, data: dict) -> Self:
        return cls(**{f.name: RunRecord.from_json(data) if f.name == "record" else
                      data[f.name] if f.default is MISSING else data.get(f.name) for f in fields(cls)})


S = TypeVar("S", bound=Summary)


def write_summary(summary: Summary, out: str | Path) -> Path:
    """``out/best.json``, written atomically (a reader never sees half a file)."""
    path = Path(out) / "best.json"
    atomic_write_text(path, json.dumps(summary.to_json(), indent=2))
    return path


Allocate = Callable[[list[str]], list[list[float]]]  # allocation names -> their rates at the search's ratio


@dataclass(frozen=True)
class Injected:
    """What runs a search's expensive steps, given by whoever runs it: the library scores in this
    process, the flow through cached tasks on its task runner; ``allocate`` gives the baselines' rates."""

    score: Score
    transport: Transport | None = None
    on_generation: Callable[[GenerationReport], None] | None = None
    allocate: Allocate | None = None


C = TypeVar("C", bound=EvolutionConfig)


@dataclass(frozen=True)
class Search(Generic[C, S]):
    """One search, declared: its settings' type, the checks before anything loads, its run on a
    loaded model (Algorithm 1 over its space and oracle, its final scores, the summary best.json
    holds), that summary's type (which reads a flow's result back), what its seeds spread over,
    what fills in for the LLM, whether a candidate may be invalid (a metric that cannot prune the
    model), and how it allocates its baselines in this process. The library (:func:`run_library`)
    and the flow (``flows/evolution.run_flow``) run any search alike."""

    name: str
    config: type[C]
    check: Callable[[C], None]
    run: Callable[[C, Setup, Injected], S]
    summary: type[S]
    figures: Callable[[S], dict[str, float]]
    fallback: str
    tolerate_invalid: bool = False
    allocator: Callable[[C, Workbench], Allocate] | None = None


def run_library(search: Search[C, S], config: C | None, on_generation: Callable[[GenerationReport], None] | None,
                overrides: dict) -> S | SeedsSummary:
    """``search`` in this process, without Prefect (``selfprune.search``, ``selfprune.autoprune``):
    the settings (a config or its fields), the checks, the shared workbench (statistics from the
    artifact store), candidates scored on it one by one, ``out/best.json``; with ``seeds``, once per seed."""
    config = in_process(build_config(search.config, **((config.model_dump() if config else {}) | overrides)))
    if config.seeds:
        return over_seeds(config, lambda one: run_library(search, one, on_generation, {}), search.figures)
    search.check(config)
    check_windows(config, load_tokenizer(config.model))
    bench = shared_workbench(config.model, calibration(config), config.device, config.dtype, config.method)

    def score(candidates: list[Candidate], split: str, windows: int | None, advance: Advance = ignore) -> list[Measurement]:
        how = scoring(config, split, windows)
        return one_by_one(lambda c: Measurement.of(bench.score(c, how, search.tolerate_invalid).to_dict()), candidates, advance)

    allocate = search.allocator(config, bench) if search.allocator else None
    setup = Setup(bench.arch, model_spec(config, bench.lm.fingerprint), bench.stats_key)
    summary = search.run(config, setup, Injected(score, on_generation=on_generation, allocate=allocate))
    write_summary(summary, config.out)
    return summary
