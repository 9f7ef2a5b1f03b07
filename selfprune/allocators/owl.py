"""OWL (Yin et al., 2024): layers with more outliers (Wanda scores far above their layer's mean)
are pruned less."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..methods.wanda_sp import weight_scores
from ..model.arch import Arch, decoder_layers
from . import ALLOCATIONS, LayerScores
from .rates import spread_down


def owl_rates(outlier_ratios: list[float], beta: float, lam: float = 0.08) -> list[float]:
    """OWL: layers with more outliers are pruned less.

    ``outlier_ratios`` holds each layer's LOD (share of Wanda scores above M x the layer mean),
    spread to beta +- lam by :func:`spread_down`.
    """
    return spread_down(outlier_ratios, beta, lam)


def lod(scores: list[torch.Tensor], m: float = 5.0) -> float:
    """Layer outlier distribution: share of scores above ``m`` x the layer's mean score."""
    flat = torch.cat([s.flatten() for s in scores])
    return float((flat > m * flat.mean()).float().mean())


def outlier_ratios(model: torch.nn.Module, stats: dict[str, torch.Tensor], m: float = 5.0,
                   scores: Callable[[int], list[torch.Tensor]] | None = None) -> list[float]:
    """OWL's layer outlier distribution (LOD) per layer, from unstructured Wanda scores by default."""
    scores = scores or weight_scores(model, stats)
    return [lod(scores(i), m) for i in range(len(decoder_layers(model)))]


@ALLOCATIONS.register("owl", order=1)
def owl(model: torch.nn.Module, arch: Arch, stats: dict[str, torch.Tensor], ratio: float,
        layer_scores: LayerScores | None = None) -> list[float]:
    return owl_rates(outlier_ratios(model, stats, scores=layer_scores), ratio)
