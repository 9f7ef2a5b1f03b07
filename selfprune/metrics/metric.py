"""A checked, canonical, probed metric, and the one way to make one from text."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .canonical import canonical, key, render
from .language import INPUTS, MAX_LIVE, MetricError, Node, Op, Var, check_full, parse, short
from .tensors import bind, evaluate, live_tensors, probe_inputs


class NonFiniteScores(MetricError):
    """A metric that cannot prune this model: its scores on one of its layers are not all finite."""


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

    def finite_scores(self, inputs: Mapping[str, Tensor], where: str) -> Tensor:
        """:meth:`scores` of a real layer (``where`` names it), all finite: a mask made from NaN or inf
        scores would prune by position. The probe layer cannot promise it: sums grow with the width,
        and real magnitudes can overflow float32. Raises NonFiniteScores."""
        scores = self.scores(inputs)
        if not bool(torch.isfinite(scores).all()):
            bad = int(scores.numel() - torch.isfinite(scores).sum())
            raise NonFiniteScores(f"metric `{short(self.text)}` gives NaN/inf scores to {bad} of the {scores.numel()} "
                                  f"weights of {where}, though they were finite on the probe layer; keep it bounded on "
                                  "real weights (tanh, sigmoid, minmax, log; no large powers of sums) or choose another metric")
        return scores


def parse_metric(text: str) -> Metric:
    """Check, canonicalise, check the canonical form and probe an untrusted metric text; raises
    MetricError saying what to fix. What it accepts, it accepts again from the returned text."""
    tree = parse(text)
    check_full(tree, render(tree))
    tree = canonical(tree)
    canon = render(tree)
    check_canonical(tree, canon)
    env, size = bind(frozenset(INPUTS), probe_inputs())
    with torch.no_grad():
        probe = evaluate(tree, env, size)
    if not torch.isfinite(probe).all():
        raise MetricError(f"metric `{canon}` gives NaN/inf on a probe layer (8x16 random weights); "
                          "keep it bounded, e.g. with log, tanh, sigmoid or minmax")
    if bool((probe == probe[0, 0]).all()):
        raise MetricError(f"metric `{canon}` gives the same score to every weight: it cannot rank; make it depend on W")
    return Metric(canon, key(canon), frozenset(_names(tree)), tree)


def check_canonical(tree: Node, canon: str) -> None:
    """The limits on what is kept, the canonical tree and its text: flattening a + (b + c) to
    a + b + c writes a sum of n terms n deep, so a text within the limits may not be."""
    try:
        parse(canon)
    except MetricError as e:
        raise MetricError(f"written canonically (`{short(canon)}`), {e} A sum or product of n terms is nested "
                          "n deep once written out: use fewer terms") from None
    if (live := live_tensors(tree)) > MAX_LIVE:
        raise MetricError(f"evaluating `{short(canon)}` holds {live} layer-sized values at once; the limit is {MAX_LIVE}. "
                          "Nest it less: fewer operations inside the second operand of each operation")


def _names(node: Node) -> set[str]:
    if isinstance(node, Var):
        return {node.name}
    return set().union(*(_names(a) for a in node.args)) if isinstance(node, Op) else set()
