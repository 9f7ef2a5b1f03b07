"""Genetic programming over metric trees: the offline ``gp`` oracle of the metric search.

It does the LLM oracle's jobs (initialization, mutation, crossover) with classical operators, as
:class:`selfprune.evolve.classical.GAOracle` does for rate vectors, and keeps the same contract: every
returned text is canonical and valid (``parse_metric`` accepts it: one finite, non-constant score per
weight on the probe), no two share a ``ctx.canonical`` key, none is in the population (or ``exclude``),
and fewer than asked come back only when the tries run out. All randomness comes from a
``random.Random`` seeded by (seed, generation, operation), and nothing depends on ``hash()`` or set
order, so the same inputs give the same metrics in every process. Every returned metric is recorded
in :attr:`GPOracle.lineage` with its parents and the edit that made it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable
from functools import lru_cache

from ..metrics.builtin import METRICS
from ..metrics.canonical import render
from ..metrics.edits import describe_edit
from ..metrics.language import FUNCTIONS, INPUTS, MetricError, Node, Num, Op, Var
from ..metrics.metric import Metric, parse_metric
from ..metrics.search_space import Lineage, MetricContext, ScoredMetric
from .search_context import rng_for, tournament

_TRIES_PER_CHILD = 50  # draws per wanted child before giving up, as GAOracle's _distinct
_CONSTANTS = (0.5, 1.0, 2.0)
_EXPONENTS = (0.5, 2.0)
_BINARY = ("+", "-", "*", "/", *(name for name, n in FUNCTIONS.items() if n == 2))  # + - * / min max
_UNARY = tuple(name for name, n in FUNCTIONS.items() if n == 1)  # functions, normalisations, reductions
_MUTATIONS = ("subtree", "operator", "function", "wrap", "input")
Path = tuple[int, ...]
Child = tuple[Node, tuple[str, ...]]  # (tree, parent texts)


@lru_cache(maxsize=4096)
def _metric(text: str) -> Metric:
    return parse_metric(text)


def _depth(node: Node) -> int:
    return 1 + max(map(_depth, node.args)) if isinstance(node, Op) else 1


def _paths(node: Node, path: Path = ()) -> list[tuple[Path, Node]]:
    """Every subtree with its path, preorder; the exponent of ``**`` is not a subtree (it must stay a number)."""
    out = [(path, node)]
    if isinstance(node, Op):
        for i, arg in enumerate(node.args[:1] if node.op == "**" else node.args):
            out += _paths(arg, path + (i,))
    return out


def _replace(node: Node, path: Path, new: Node) -> Node:
    if not path:
        return new
    assert isinstance(node, Op)
    i = path[0]
    return Op(node.op, node.args[:i] + (_replace(node.args[i], path[1:], new),) + node.args[i + 1:])


class GPOracle:
    """Tournament selection (the best of ``tournament`` random members), subtree crossover and node
    mutation over metric trees; random trees are grown up to ``max_depth``. A child deeper than
    ``max_depth`` (or than its deepest parent, for a deeper LLM-written one) is discarded: no bloat."""

    def __init__(self, tournament: int = 3, max_depth: int = 6, lineage: Lineage | None = None) -> None:
        self.tournament = tournament
        self.max_depth = max_depth
        self.lineage = lineage or Lineage()

    def initialize(self, ctx: MetricContext, k: int) -> list[str]:
        """The built-ins (those usable without G unless ``ctx.gradient``), then random trees: ``k`` in all."""
        exclude: set[Hashable] = set()
        out: list[str] = []
        for name in METRICS.names():
            metric = METRICS.get(name)
            key = ctx.canonical(metric.text)
            if len(out) < k and (ctx.gradient or not metric.needs_gradient) and key not in exclude:
                exclude.add(key)
                out.append(metric.text)
                self.lineage.add(metric.text, (), "seed", 0, "built-in")
        return out + self.random_init(ctx, k - len(out), exclude)

    def evolve(self, ctx: MetricContext, population: list[ScoredMetric], n_crossover: int, n_mutation: int,
               generation: int) -> list[str]:
        """Offspring of ``population`` (text, fitness; lower is better): mutants then crossovers."""
        exclude = {ctx.canonical(text) for text, _ in population}
        return self.mutate(ctx, population, n_mutation, generation, exclude) + self.crossover(
            ctx, population, n_crossover, generation, exclude)

    def random_init(self, ctx: MetricContext, n: int, exclude: set[Hashable]) -> list[str]:
        """``n`` random metrics whose keys are not in ``exclude`` (which is updated)."""
        rng = rng_for(ctx, 0, "gp-init")
        return self._distinct(ctx, lambda: (self._grow(rng, ctx, self.max_depth), ()), n, exclude, 0, "random")

    def mutate(self, ctx: MetricContext, population: list[ScoredMetric], n: int, generation: int,
               exclude: set[Hashable]) -> list[str]:
        """``n`` one-node mutants of tournament-selected parents, distinct from ``exclude`` (updated)."""
        if n <= 0:
            return []
        rng = rng_for(ctx, generation, "gp-mutation")

        def child() -> Child | None:
            parent = self._select(rng, population)
            tree = _metric(parent).tree
            kind = rng.choice(_MUTATIONS)
            nodes = [(p, x) for p, x in _paths(tree) if kind in ("subtree", "wrap")
                     or kind == "operator" and isinstance(x, Op) and x.op in _BINARY
                     or kind == "function" and isinstance(x, Op) and x.op in _UNARY
                     or kind == "input" and isinstance(x, Var)]
            if not nodes:
                return None
            path, node = rng.choice(nodes)
            if kind == "subtree":
                new = self._grow(rng, ctx, 3)
            elif kind == "wrap":
                new = Op(rng.choice(_UNARY), (node,))
            elif kind == "input":
                assert isinstance(node, Var)
                new = Var(rng.choice([v for v in self._inputs(ctx) if v != node.name] or [node.name]))
            else:
                assert isinstance(node, Op)
                op = rng.choice([o for o in (_BINARY if kind == "operator" else _UNARY) if o != node.op])
                args = node.args
                if len(args) > 2 and op not in ("+", "*"):  # a flattened a + b + c: swap its last operator
                    args = (Op(node.op, args[:-1]), args[-1])
                new = Op(op, args)
            return _replace(tree, path, new), (parent,)

        return self._distinct(ctx, child, n, exclude, generation, "gp")

    def crossover(self, ctx: MetricContext, population: list[ScoredMetric], n: int, generation: int,
                  exclude: set[Hashable]) -> list[str]:
        """``n`` children: a random subtree of parent A replaced by a random subtree of parent B."""
        if n <= 0:
            return []
        rng = rng_for(ctx, generation, "gp-crossover")

        def child() -> Child:
            a, b = self._select(rng, population), self._select(rng, population)
            tree_a, tree_b = _metric(a).tree, _metric(b).tree
            path, _ = rng.choice(_paths(tree_a)[1:] or _paths(tree_a))  # not the root: that would be B's subtree alone
            _, donor = rng.choice(_paths(tree_b))
            return _replace(tree_a, path, donor), tuple(dict.fromkeys((a, b)))

        return self._distinct(ctx, child, n, exclude, generation, "gp")

    def _distinct(self, ctx: MetricContext, make: Callable[[], Child | None], n: int, exclude: set[Hashable],
                  generation: int, source: str) -> list[str]:
        """Draw from ``make`` until ``n`` valid metrics with new keys are found (or tries run out); record
        each in the lineage. ``exclude`` is updated with the keys taken."""
        out: list[str] = []
        for _ in range(_TRIES_PER_CHILD * max(n, 0)):
            if len(out) == n:
                break
            drawn = make()
            if drawn is None:
                continue
            tree, parents = drawn
            metric = self._valid(ctx, tree, parents)
            if metric is None or (key := ctx.canonical(metric.text)) in exclude:
                continue
            exclude.add(key)
            out.append(metric.text)
            edit = describe_edit(parents[0], metric.text) if parents else "random"
            self.lineage.add(metric.text, parents, edit, generation, source)
        return out

    def _valid(self, ctx: MetricContext, tree: Node, parents: tuple[str, ...]) -> Metric | None:
        """The metric of ``tree`` if it passes parse_metric, uses G only when allowed and is not too deep."""
        try:
            metric = _metric(render(tree))
        except MetricError:
            return None
        limit = max([self.max_depth, *(_depth(_metric(p).tree) for p in parents)])
        if (metric.needs_gradient and not ctx.gradient) or _depth(metric.tree) > limit:
            return None
        return metric

    def _select(self, rng: random.Random, population: list[ScoredMetric]) -> str:
        return tournament(rng, population, self.tournament)

    @staticmethod
    def _inputs(ctx: MetricContext) -> list[str]:
        return [name for name in INPUTS if ctx.gradient or name != "G"]

    def _grow(self, rng: random.Random, ctx: MetricContext, depth: int) -> Node:
        """A random tree by the "grow" method: a leaf (mostly an input) or an operation over smaller trees."""
        if depth <= 1 or rng.random() < 0.3:
            return Var(rng.choice(self._inputs(ctx))) if rng.random() < 0.75 else Num(rng.choice(_CONSTANTS))
        roll = rng.random()
        if roll < 0.45:
            op = rng.choice(_BINARY)
            return Op(op, (self._grow(rng, ctx, depth - 1), self._grow(rng, ctx, depth - 1)))
        if roll < 0.6:
            return Op("**", (self._grow(rng, ctx, depth - 1), Num(rng.choice(_EXPONENTS))))
        return Op(rng.choice(_UNARY), (self._grow(rng, ctx, depth - 1),))
