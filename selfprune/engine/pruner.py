"""Where a candidate is pruned: :meth:`Pruner.model` builds each kind of
:mod:`~selfprune.engine.candidate` from one calibrated dense model, which it never modifies.

A structure is sliced (:meth:`Pruner.structured`), a metric's lowest-scoring single weights are
zeroed (:meth:`Pruner.sparse`), each through its registered reconstruction
(:data:`selfprune.reconstruct.RECONSTRUCTIONS`, ``none`` included); per-layer rates come
from a registered allocation (:meth:`Pruner.allocate`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import allocators
from ..allocators.rates import check_rates
from ..methods import sparsity
from ..methods.registry import get_method
from ..methods.sparsity import Pattern, Sparsified, parse_pattern
from ..methods.structure import Structure, rates_to_structure
from ..metrics import Metric, resolve_metric
from ..reconstruct import NONE, reconstruction
from .calibrated import Calibrated
from .candidate import Candidate, Dense, Sparse, Structured
from .scorer import Scorer
from .settings import allocation_scoring


class Pruner:
    """Candidates of ``calibrated``'s model, its units ranked by ``method``; ``scorer`` measures
    what an allocation that tunes itself (ATP) compares its rate vectors by."""

    def __init__(self, calibrated: Calibrated, method: str, scorer: Scorer):
        self.method = get_method(method)
        self.calibrated = calibrated
        self.dense = calibrated.lm.model
        self.arch = calibrated.arch
        self.scorer = scorer
        with_g = {"gradients": calibrated.gradients()} if self.method.needs_gradient else {}
        self.rankings = self.method.rank(self.dense, self.arch, calibrated.stats, **with_g)
        self._sparse_rates: dict[tuple, list[float]] = {}  # a pure function of its key on this model and calibration

    def model(self, candidate: Candidate) -> torch.nn.Module:
        """The model a candidate stands for: the dense model itself, a structure sliced from it, or
        a metric's sparse model."""
        match candidate:
            case Dense():
                return self.dense
            case Structured(structure, how):
                return self.structured(structure, how)
            case Sparse(metric, pattern, ratio, allocation_, rates, how):
                rates_ = list(rates) if rates is not None else allocation_
                return self.sparse(resolve_metric(metric), rates_, ratio, parse_pattern(pattern), how)[1].model
        raise TypeError(f"not a candidate: {candidate!r}")

    def structure(self, rates: list[float]) -> Structure:
        return rates_to_structure(self.arch, rates)

    def structured(self, structure: Structure, reconstruct: str = NONE) -> torch.nn.Module:
        """The sliced model of ``structure``, the consumers of removed units refitted by ``reconstruct``."""
        build = reconstruction(reconstruct, "structured").structured
        return build(self.dense, self.arch, self.rankings, structure, self.calibrated.layer_pass())

    def sparse(self, metric: Metric, allocation_spec: str | list[float], ratio: float, pattern: Pattern,
               reconstruct: str = NONE) -> tuple[list[float], Sparsified]:
        """Per-layer sparsities (:meth:`sparse_rates`) and the model with the lowest-scoring weights
        zeroed, the kept ones updated by ``reconstruct`` (or its own mask chosen: ``sparsegpt-adaptive``)."""
        build = reconstruction(reconstruct, "sparse").sparse
        rates = self.sparse_rates(metric, allocation_spec, ratio, pattern)
        return rates, build(self.dense, self.arch, self.metric_scores(metric), rates, pattern, self.calibrated.layer_pass())

    def _fitness(self, build: Callable[[list[float]], torch.nn.Module]) -> allocators.Fitness:
        """Rates -> perplexity of the candidate ``build`` makes of them, on :func:`allocation_scoring`."""
        scoring = allocation_scoring(self.calibrated.calibration)
        return lambda rates: self.scorer.perplexity(build(rates), scoring).ppl

    def allocate(self, allocation_spec: str | list[float], ratio: float,
                 layer_scores: allocators.LayerScores | None = None,
                 fitness: allocators.Fitness | None = None) -> list[float]:
        """Per-layer rates from a registered allocation, a RATES.json path, or an explicit list;
        validated whatever their source. ``layer_scores``: the per-weight scores OWL, SDSA and DLP
        read outliers from (Wanda's when not given); ``fitness``: what ATP tunes on (the structured
        candidate's perplexity when not given). Each allocator gets those of them it takes."""
        if isinstance(allocation_spec, list):
            rates = allocation_spec
        else:
            allocate = allocators.allocator(allocation_spec)
            offered = {"layer_scores": layer_scores, "fitness": fitness or self._fitness(lambda r: self.structured(self.structure(r)))}
            rates = allocate(self.dense, self.arch, self.calibrated.stats, ratio, **allocators.optional_inputs(allocate, offered))
        return check_rates(rates, self.arch.n_layers, ratio)

    def metric_scores(self, metric: Metric) -> Callable[[int], dict[str, torch.Tensor]]:
        """Layer index -> the metric's scores of each of its linears' weights."""
        grads = self.calibrated.gradients() if metric.needs_gradient else None
        return sparsity.layer_scores(self.dense, self.calibrated.stats, metric, grads)

    def sparse_rates(self, metric: Metric, allocation_spec: str | list[float], ratio: float, pattern: Pattern) -> list[float]:
        """Per-layer sparsities of a metric's candidate: outliers read from the metric's own scores,
        and ATP tuned on the perplexity of the metric's sparse candidates in ``pattern`` (no reconstruction)."""
        if isinstance(allocation_spec, list):  # a search's sparsities: checked, nothing to read or tune
            return self.allocate(allocation_spec, ratio)
        key = (metric.key, allocation_spec, ratio, pattern.text)
        if key not in self._sparse_rates:  # ATP's tuning costs a perplexity pass per grid point: once per process
            scores = self.metric_scores(metric)  # per layer, recomputed when read again: one layer's scores in memory at a time
            sparse = self._fitness(lambda rates: sparsity.sparsify(self.dense, self.arch, scores, rates, pattern).model)
            self._sparse_rates[key] = self.allocate(allocation_spec, ratio, lambda i: list(scores(i).values()), sparse)
        return list(self._sparse_rates[key])
