"""DLP: layer importance from the median of its scores (Chen et al., "DLP: Dynamic Layerwise
Pruning in Large Language Models", ICML 2025; ironartisan/DLP).

The rule (DLP's ``lib/prune.py``: ``get_dlp_ratios`` and ``get_dlp_structure_ratios``; defaults
from ``run.py``): per layer ``l``, ``m_l`` = the median of the Wanda scores ``|W| * ||X||`` of all
its linears' weights (``--strategy median``); the importance ``I_l = 1 - m_l / sum_k m_k``; ``I``
is min-max scaled to [0, 2 * alpha] and centred, and the layer keeps ``1 - beta`` plus that
value. As a sparsity: ``p_l = beta - (s_l - mean(s))``, ``s = minmax(I) * 2 * alpha``, alpha = 0.15
(``--alpha``). ``I`` is affine in ``m`` with a negative slope, so a layer of larger median score is
pruned more, and the rates spread over a range 2 * alpha wide: OWL's mapping
(:func:`selfprune.allocators.rates.spread_down`) applied to ``I``.

Two departures, both stated here: ``get_dlp_ratios``, the unstructured path, aggregates by the
mean although ``--strategy`` defaults to the median the paper describes (only the structured path
reads it); the median is used for every pattern. And as OWL and SDSA do here, the scores are the
pruning metric's own when a metric is given (DLP's code always reads Wanda's; for ``wanda`` the two
are the same). ``torch.median`` takes the lower middle value of an even count, as DLP's code does.
"""

from __future__ import annotations

import torch

from ..methods import wanda_sp
from ..model.arch import Arch
from . import ALLOCATIONS, LayerScores
from .rates import spread_down

ALPHA = 0.15  # run.py --alpha


def median_score(weight_scores: list[torch.Tensor]) -> float:
    """The median of a layer's scores, pooled over its linears."""
    return float(torch.cat([s.flatten().float() for s in weight_scores]).median())


def importance(medians: list[float]) -> list[float]:
    """DLP's layer importance ``1 - m_l / sum_k m_k``."""
    total = sum(medians)
    return [1 - m / total for m in medians]


def rates(medians: list[float], beta: float, alpha: float = ALPHA) -> list[float]:
    """More important layers (smaller median score) are pruned less; the rates spread 2 * alpha."""
    return spread_down(importance(medians), beta, alpha)


@ALLOCATIONS.register("dlp", order=4)
def dlp(model: torch.nn.Module, arch: Arch, stats: dict[str, torch.Tensor], ratio: float,
        layer_scores: LayerScores | None = None) -> list[float]:
    scores = layer_scores or wanda_sp.weight_scores(model, stats)
    return rates([median_score(scores(i)) for i in range(arch.n_layers)], ratio)
