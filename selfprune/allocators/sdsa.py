"""SDSA, AutoPrune's skew-aware dynamic sparsity allocation: layers whose scores are more skewed
(heavier outliers) are pruned less."""

from __future__ import annotations

import torch

from ..methods import wanda_sp
from ..model.arch import Arch
from . import ALLOCATIONS, LayerScores
from .rates import project_to_mean

SDSA_TEMPERATURE = 1.0
SDSA_LAMBDA = 0.04  # chosen on the fitness split: bench/sdsa_defaults.py


def sdsa_rates(skews: list[float], beta: float, temperature: float = SDSA_TEMPERATURE, lam: float = SDSA_LAMBDA,
         p_max: float = 1.0) -> list[float]:
    """Skew-aware dynamic sparsity allocation (our reconstruction of AutoPrune's SDSA; the paper's
    formula is not public): layers whose score distribution is more skewed (heavier outliers) are
    pruned less.

    Standardise the layers' skewness ``g`` to ``z``; reweight with a softmax at ``temperature``,
    ``w = L * softmax(z / T)`` (mean 1, larger for more skewed layers); the rate is
    ``beta - lam * (w - 1) / max|w - 1|``, so rates span at most ``beta +- lam``; then the exact
    mean ``beta`` within ``[0, p_max]`` (:func:`project_to_mean`).
    """
    n = len(skews)
    g = torch.tensor(skews, dtype=torch.float64)
    std = g.std(unbiased=False)
    z = (g - g.mean()) / std if std > 0 else torch.zeros(n, dtype=torch.float64)
    w = n * torch.softmax(z / temperature, 0)
    spread = (w - 1).abs().max()
    shift = (w - 1) / spread if spread > 0 else torch.zeros(n, dtype=torch.float64)
    return project_to_mean([beta - lam * float(d) for d in shift], beta, p_max)


def skewness(weight_scores: list[torch.Tensor], max_values: int = 1 << 18) -> float:
    """Sample skewness E[(s - mu)^3] / sigma^3 of a layer's scores, pooled over its linears; at
    most ``max_values`` of them, taken at a fixed stride (deterministic, and bounded in memory)."""
    flat = torch.cat([s.flatten() for s in weight_scores]).double()
    flat = flat[:: max(1, len(flat) // max_values)]
    centred = flat - flat.mean()
    sigma = centred.pow(2).mean().sqrt()
    return float(centred.pow(3).mean() / sigma.pow(3)) if sigma > 0 else 0.0


@ALLOCATIONS.register("sdsa", order=2)
def sdsa(model: torch.nn.Module, arch: Arch, stats: dict[str, torch.Tensor], ratio: float,
         layer_scores: LayerScores | None = None) -> list[float]:
    scores = layer_scores or wanda_sp.weight_scores(model, stats)
    return sdsa_rates([skewness(scores(i)) for i in range(arch.n_layers)], ratio)
