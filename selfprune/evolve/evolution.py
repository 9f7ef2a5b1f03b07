"""Algorithm 1 of Self-Pruner: pure step functions and :func:`run_search`, the one loop.

The library calls :func:`run_search` with a plain fitness function; the Prefect flow calls the
same loop with its cached task (a generation's candidates submitted as one batch) and a hook that
publishes artifacts. There is no second copy of the loop: AutoPrune's metric search runs it too,
with metric texts as the candidates (:mod:`.autoprune`); the loop only needs ``ctx.canonical``.

Algorithm 1, with G_0 the initial population of K::

    evaluate G_0
    for i in 0 .. N-1:
        offspring = Mutation(G_i, M) + Crossover(G_i, S)       (oracle, s.t. mean = beta)
        G_{i+1} = TopK(G_i + offspring)                         (after evaluating the offspring)
    return Top1(G_N)

which makes K + N(M + S) evaluations: 430 with the paper's settings (K=30, M=S=10, N=20).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..core.errors import UserError
from .classical import RandomOracle
from .search_context import Oracle, Scored, SearchContext, fitness_key


@dataclass(frozen=True)
class SearchParams:
    """Hyperparameters of Algorithm 1 (defaults: the paper's) and the ablations of its Table 3.

    ``random_init`` replaces the oracle's initial population by a random one; ``no_mutation``
    and ``no_crossover`` ask the oracle for none of that kind of offspring.
    """

    population: int = 30
    mutations: int = 10
    crossovers: int = 10
    generations: int = 20
    seed: int = 0
    random_init: bool = False
    no_mutation: bool = False
    no_crossover: bool = False

    def __post_init__(self) -> None:
        if self.population < 2:
            raise UserError(f"the population size must be at least 2 (got {self.population}); the paper uses 30")
        for name in ("mutations", "crossovers", "generations"):
            if getattr(self, name) < 0:
                raise UserError(f"the number of {name} cannot be negative (got {getattr(self, name)})")

    @property
    def n_mutation(self) -> int:
        return 0 if self.no_mutation else self.mutations

    @property
    def n_crossover(self) -> int:
        return 0 if self.no_crossover else self.crossovers

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GenerationStats:
    """Fitness of one generation's population after selection (generation 0: the initial one)."""

    generation: int
    best: float
    mean: float
    evaluations: int


@dataclass
class SearchResult:
    """The best candidate found (a rate vector, or a metric text for AutoPrune), the final
    population (best first) and the per-generation record."""

    best: Any
    best_fitness: float
    history: list[GenerationStats] = field(default_factory=list)
    evaluations: int = 0
    population: list[Scored] = field(default_factory=list)


def survivors(scored: list[Scored], k: int) -> list[Scored]:
    """Top ``k`` by fitness (lower is better, NaN last), best first; ties keep their first-seen order.

    ``sorted`` is stable, so equal fitnesses never reorder: the result depends only on the input
    list, which makes a resumed search pick the same survivors.
    """
    return sorted(scored, key=lambda s: fitness_key(s[1]))[:k]


def initial_population(oracle: Oracle, ctx: SearchContext, params: SearchParams, known: Sequence = ()) -> list:
    """Line 1: G_0, from the oracle, or random under the ``random_init`` ablation; after the
    ``known`` candidates (the best known answers, such as the registered allocations at the
    target), so the search starts no worse than the best of them."""
    source = RandomOracle() if params.random_init else oracle
    return list(known) + source.initialize(ctx, params.population)


def offspring(
    oracle: Oracle, ctx: SearchContext, params: SearchParams, population: list[Scored], generation: int
) -> list[list[float]]:
    """Lines 5-6: mutants and crossovers of the scored ``population``.

    ``generation`` is the index of the generation being produced (1 .. N); it seeds the
    deterministic oracles. The ablations ask for zero offspring of the switched-off kind.
    """
    if params.n_mutation == 0 and params.n_crossover == 0:
        return []
    return oracle.evolve(ctx, population, params.n_crossover, params.n_mutation, generation)


# A batch of candidates -> their fitnesses, in order; None for a candidate the evaluation screened
# out (staged fitness): it never enters the population and is not evaluated again.
Evaluate = Callable[[list[list[float]]], "list[float | None]"]


@dataclass(frozen=True)
class Generation:
    """What one generation did, for a hook: its new candidates (scored, in the oracle's order),
    how many of them were evaluated (the rest had been scored in an earlier generation), and the
    population after selection, best first."""

    index: int
    candidates: list[Scored]
    evaluated: int
    population: list[Scored]

    @property
    def stats(self) -> GenerationStats:
        mean = sum(f for _, f in self.population) / len(self.population)
        return GenerationStats(self.index, self.population[0][1], mean, self.evaluated)


def run_search(
    oracle: Oracle,
    ctx: SearchContext,
    params: SearchParams,
    evaluate: Evaluate,
    on_generation: Callable[[Generation], None] | None = None,
    known: Sequence = (),
) -> SearchResult:
    """Run Algorithm 1 with ``evaluate`` as the fitness (perplexity; lower is better).

    ``evaluate`` takes a generation's new candidates as one batch (so an orchestrator can run
    them side by side) and returns their fitnesses in order. Candidates are identified by
    ``ctx.canonical``: one already in the population never enters it twice, and one evaluated
    before (then dropped) reuses its fitness, so no structure is ever evaluated twice.
    ``on_generation`` sees every generation, G_0 included, after selection. ``known`` candidates
    join G_0 beside the oracle's (:func:`initial_population`); the best survives selection, so the
    result is never worse on fitness than any of them.
    """
    memo: dict[Hashable, float] = {}
    population: list[Scored] = []
    history: list[GenerationStats] = []
    for index in range(params.generations + 1):
        children = (initial_population(oracle, ctx, params, known) if index == 0
                    else offspring(oracle, ctx, params, population, index))
        taken = {ctx.canonical(rates) for rates, _ in population}
        new: list[tuple[list[float], Hashable]] = []
        for rates in children:
            key = ctx.canonical(rates)
            if key not in taken:
                taken.add(key)
                new.append((rates, key))
        todo = [rates for rates, key in new if key not in memo]
        fitnesses = evaluate(todo) if todo else []
        if len(fitnesses) != len(todo):
            raise RuntimeError(f"evaluate returned {len(fitnesses)} fitnesses for {len(todo)} candidates")
        memo.update((ctx.canonical(rates), f) for rates, f in zip(todo, fitnesses))
        scored = [(rates, memo[key]) for rates, key in new if memo[key] is not None]
        population = survivors(population + scored, params.population)
        if not population:
            raise UserError("the oracle produced no initial candidates; check the target ratio and p_max")
        generation = Generation(index, scored, len(todo), population)
        history.append(generation.stats)
        if on_generation is not None:
            on_generation(generation)
    best, best_fitness = population[0]
    return SearchResult(best, best_fitness, history, len(memo), population)
