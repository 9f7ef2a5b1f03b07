"""What every rate oracle shares: the problem it searches (:class:`SearchContext`), the protocol
every oracle keeps (:class:`Oracle`, the metric search's included), and the seeded selection
helpers that the search loop and the classical operators share (:func:`rng_for`,
:func:`fitness_key`, :func:`tournament`).

Every oracle keeps the same contract, so the search loop never has to check: each returned vector
has ``ctx.n_layers`` entries in ``[0, ctx.p_max]`` with mean ``ctx.beta`` (within 1e-6), and no two
returned vectors, nor a returned vector and a member of the given population, share a
``ctx.canonical`` key. An oracle returns fewer vectors than asked only when it cannot find enough
distinct ones (a tiny search space).

The oracles themselves: :mod:`.classical` (GA, random), :mod:`.llm_oracle` (Self-Pruner's LLM);
:mod:`.oracle_registry` names them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from ..core.errors import UserError
from ..storage.hashing import content_hash

Scored = tuple[list[float], float]


def rounded_key(rates: list[float]) -> tuple[float, ...]:
    """Default candidate identity: rates rounded to the 5 decimals the prompts ask for."""
    return tuple(round(r, 5) for r in rates)


@dataclass(frozen=True)
class SearchContext:
    """What every oracle needs to know about the problem.

    ``p_max`` bounds each layer's rate. It defaults to 0.9 rather than the paper's 1 because a
    rate of 1 removes a layer's attention and MLP entirely; the bound keeps every layer alive.
    ``canonical`` maps rates to the pruned structure they produce (the orchestrator passes the
    rounding to whole heads and channels), so two vectors that prune the same units count as one
    candidate. ``dataset`` names the fitness data in the prompt. ``baselines``: known allocations
    at ``beta`` by name, which join the initial population and which the LLM sees, labelled.
    """

    model_name: str
    n_layers: int
    beta: float
    p_max: float = 0.9
    seed: int = 0
    canonical: Callable[[list[float]], Hashable] = rounded_key
    dataset: str = "WikiText-2"
    baselines: tuple[tuple[str, tuple[float, ...]], ...] = ()

    def __post_init__(self) -> None:
        if self.n_layers < 1:
            raise UserError(f"the model must have at least one layer to prune (got n_layers={self.n_layers})")
        if not 0.0 < self.p_max <= 1.0:
            raise UserError(f"p_max must lie in (0, 1] (got {self.p_max}); e.g. 0.9")
        if not 0.0 < self.beta <= self.p_max:
            raise UserError(f"the target ratio {self.beta} must lie in (0, p_max={self.p_max}]: lower the ratio or raise p_max")


Ctx = TypeVar("Ctx", contravariant=True)
Member = TypeVar("Member")


class Oracle(Protocol[Ctx, Member]):
    """Proposes candidates of one search (``Member``: a rate vector, a metric text) for its problem
    (``Ctx``): the one protocol of every oracle, the rate search's (``Oracle[SearchContext,
    list[float]]``; the module docstring says what it returns) and the metric search's."""

    def initialize(self, ctx: Ctx, k: int) -> list[Member]:
        """The initial population: ``k`` distinct feasible members."""
        ...

    def evolve(self, ctx: Ctx, population: list[tuple[Member, float]], n_crossover: int, n_mutation: int,
               generation: int) -> list[Member]:
        """Offspring of ``population`` (member, perplexity; lower is better): mutants then crossovers."""
        ...


def rng_for(ctx, generation: int, op: str) -> random.Random:
    """A generator that depends only on (seed, generation, operation): same inputs, same outputs."""
    return random.Random(int(content_hash(ctx.seed, generation, op), 16))


def fitness_key(fitness: float) -> tuple[bool, float]:
    """Sort key: lower perplexity first; NaN (a broken candidate) after everything, inf included."""
    return (math.isnan(fitness), fitness)


def tournament(rng: random.Random, population: list[tuple[Member, float]], size: int) -> Member:
    """Tournament selection, the GA's and the GP's: the fittest of ``size`` members drawn with
    replacement (:func:`fitness_key` order: a broken member, NaN, loses)."""
    if not population:
        raise ValueError("evolution needs a non-empty scored population")
    entrants = [population[rng.randrange(len(population))] for _ in range(size)]
    return min(entrants, key=lambda s: fitness_key(s[1]))[0]
