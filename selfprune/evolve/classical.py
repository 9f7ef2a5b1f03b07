"""The classical oracles: :class:`GAOracle` does Self-Pruner's jobs (initialization, selection,
crossover and mutation) with classical operators and :class:`RandomOracle` with none; they are
baselines, the random-initialization ablation, and the fallback when an LLM does not deliver
enough valid candidates. Both keep the contract of :mod:`.search_context`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable

from ..allocators.rates import project_to_mean
from .search_context import Scored, SearchContext, rng_for, tournament

# How many draws per wanted child before giving up on finding a new distinct one.
_TRIES_PER_CHILD = 50


def _distinct(ctx: SearchContext, make: Callable[[], list[float]], n: int, exclude: set[Hashable]) -> list[list[float]]:
    """Draw from ``make`` until ``n`` vectors with new canonical keys are found (or tries run out).

    ``exclude`` is updated with the keys taken, so successive calls never repeat each other.
    """
    out: list[list[float]] = []
    for _ in range(_TRIES_PER_CHILD * n):
        if len(out) == n:
            break
        rates = make()
        key = ctx.canonical(rates)
        if key not in exclude:
            exclude.add(key)
            out.append(rates)
    return out


def _random_rates(rng: random.Random, ctx: SearchContext) -> list[float]:
    """Uniform rates in the widest interval centred on beta that fits the bounds, projected."""
    half = min(ctx.beta, ctx.p_max - ctx.beta)
    raw = [rng.uniform(ctx.beta - half, ctx.beta + half) for _ in range(ctx.n_layers)]
    return project_to_mean(raw, ctx.beta, ctx.p_max)


class RandomOracle:
    """No prior and no inheritance: fresh random vectors every time (the random-init ablation)."""

    def initialize(self, ctx: SearchContext, k: int) -> list[list[float]]:
        rng = rng_for(ctx, 0, "random-init")
        return _distinct(ctx, lambda: _random_rates(rng, ctx), k, set())

    def evolve(
        self, ctx: SearchContext, population: list[Scored], n_crossover: int, n_mutation: int, generation: int
    ) -> list[list[float]]:
        rng = rng_for(ctx, generation, "random")
        exclude = {ctx.canonical(rates) for rates, _ in population}
        return _distinct(ctx, lambda: _random_rates(rng, ctx), n_crossover + n_mutation, exclude)


class GAOracle:
    """A classical genetic algorithm under the same constraints as the LLM.

    Selection is a tournament (the best of ``tournament`` random members); mutation adds gaussian
    noise of std ``mutation_sigma`` to every rate; crossover takes each rate from one of two
    parents at random (uniform crossover). Both break the mean constraint, so each child is
    projected back onto ``mean = beta`` and the bounds, the same repair an LLM's reply gets.
    Initialization is random (a GA has no prior about the model).
    """

    def __init__(self, tournament: int = 3, mutation_sigma: float = 0.05) -> None:
        self.tournament = tournament
        self.mutation_sigma = mutation_sigma

    def initialize(self, ctx: SearchContext, k: int) -> list[list[float]]:
        return self.random_init(ctx, k, set())

    def evolve(
        self, ctx: SearchContext, population: list[Scored], n_crossover: int, n_mutation: int, generation: int
    ) -> list[list[float]]:
        exclude = {ctx.canonical(rates) for rates, _ in population}
        return self.mutate(ctx, population, n_mutation, generation, exclude) + self.crossover(
            ctx, population, n_crossover, generation, exclude
        )

    def random_init(self, ctx: SearchContext, n: int, exclude: set[Hashable]) -> list[list[float]]:
        """``n`` random vectors whose keys are not in ``exclude`` (which is updated)."""
        rng = rng_for(ctx, 0, "ga-init")
        return _distinct(ctx, lambda: _random_rates(rng, ctx), n, exclude)

    def mutate(
        self, ctx: SearchContext, population: list[Scored], n: int, generation: int, exclude: set[Hashable]
    ) -> list[list[float]]:
        """``n`` mutants of tournament-selected parents, distinct from ``exclude`` (updated)."""

        def child(rng: random.Random) -> list[float]:
            parent = self._select(rng, population)
            return project_to_mean([r + rng.gauss(0.0, self.mutation_sigma) for r in parent], ctx.beta, ctx.p_max)

        return self._children(ctx, generation, "ga-mutation", child, n, exclude)

    def crossover(
        self, ctx: SearchContext, population: list[Scored], n: int, generation: int, exclude: set[Hashable]
    ) -> list[list[float]]:
        """``n`` uniform crossovers of two tournament-selected parents, distinct from ``exclude``."""

        def child(rng: random.Random) -> list[float]:
            a, b = self._select(rng, population), self._select(rng, population)
            return project_to_mean([x if rng.random() < 0.5 else y for x, y in zip(a, b)], ctx.beta, ctx.p_max)

        return self._children(ctx, generation, "ga-crossover", child, n, exclude)

    @staticmethod
    def _children(ctx: SearchContext, generation: int, op: str, child: Callable[[random.Random], list[float]], n: int,
                  exclude: set[Hashable]) -> list[list[float]]:
        """``n`` distinct children of ``child``, drawn from the generation's own stream for ``op``."""
        if n <= 0:
            return []
        rng = rng_for(ctx, generation, op)
        return _distinct(ctx, lambda: child(rng), n, exclude)

    def _select(self, rng: random.Random, population: list[Scored]) -> list[float]:
        return tournament(rng, population, self.tournament)
