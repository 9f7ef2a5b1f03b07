"""A checked, canonical, probed metric, and the one way to make one from text."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .canonical import canonical, key, render
from .language import INPUTS, MetricError, Node, Op, Var, check_full, parse
from .tensors import bind, evaluate, probe_inputs


@dataclass(frozen=True)
class Metric:
    """``text`` is canonical (it re-parses to the same tree), so ``key`` names the metric in caches
    whatever its spelling; ``inputs`` are the input names it reads."""

    text: str
    key: str
    inputs: frozenset[str]
    tree: Node = field(repr=False, compare=False)

    @property
    def needs_gradient(self) -> bool:
        return "G" in self.inputs

    def scores(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """One float32 score per weight, shape (out, in), from float32 copies of ``inputs`` (W is
        (out, in), X_* are (in,), G is (out, in)); low scores are pruned first."""
        env, size = bind(self.inputs, inputs)
        with torch.no_grad():
            return evaluate(self.tree, env, size, env["W"].device)


def parse_metric(text: str) -> Metric:
    """Check, canonicalise and probe an untrusted metric text; raises MetricError saying what to fix."""
    tree = parse(text)
    check_full(tree, render(tree))
    tree = canonical(tree)
    canon = render(tree)
    env, size = bind(frozenset(INPUTS), probe_inputs())
    with torch.no_grad():
        probe = evaluate(tree, env, size)
    if not torch.isfinite(probe).all():
        raise MetricError(f"metric `{canon}` gives NaN/inf on a probe layer (8x16 random weights); "
                          "keep it bounded, e.g. with log, tanh, sigmoid or minmax")
    if bool((probe == probe[0, 0]).all()):
        raise MetricError(f"metric `{canon}` gives the same score to every weight: it cannot rank; make it depend on W")
    return Metric(canon, key(canon), frozenset(_names(tree)), tree)


def _names(node: Node) -> set[str]:
    if isinstance(node, Var):
        return {node.name}
    return set().union(*(_names(a) for a in node.args)) if isinstance(node, Op) else set()
