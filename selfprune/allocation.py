"""Per-layer pruning rates: validation, projection onto the budget, rounding to units, baselines.

A rate ``p_i`` is the fraction of decoder layer ``i``'s prunable parameters to remove
(:attr:`Arch.layer_params`). The realized overall ratio is removed / total over all layers;
embeddings, norms and the LM head are not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .arch import Arch
from .errors import UserError

MEAN_TOLERANCE = 1e-3


@dataclass(frozen=True)
class LayerKeep:
    """How many units of one layer survive: KV groups and MLP channels."""

    groups: int
    channels: int


# The effective structure of a candidate: what survives in each layer. Two rate vectors that
# round to the same structure are the same candidate (and share one cache entry).
Structure = tuple[LayerKeep, ...]


def check_ratio(ratio: float) -> float:
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and 0.0 < ratio < 1.0):
        raise UserError(f"--ratio must lie strictly between 0 and 1 (got {ratio!r}); e.g. --ratio 0.3")
    return float(ratio)


def check_rates(rates: list[float], n_layers: int, ratio: float | None = None, p_max: float = 1.0) -> list[float]:
    """Validate a user-given rate vector: length, finiteness, range and (optionally) mean."""
    if len(rates) != n_layers:
        raise UserError(f"the rate vector has {len(rates)} entries but the model has {n_layers} layers; give one rate per layer")
    bad = [i for i, r in enumerate(rates) if not (isinstance(r, (int, float)) and math.isfinite(r) and 0.0 <= r <= p_max)]
    if bad:
        raise UserError(f"rates at layers {bad[:8]} lie outside [0, {p_max}]; every rate must be a number in that range")
    if ratio is not None and abs(sum(rates) / n_layers - ratio) > MEAN_TOLERANCE:
        raise UserError(
            f"the rates average {sum(rates) / n_layers:.4f}, not the target ratio {ratio}; "
            f"rescale them so their mean is {ratio} (or pass --ratio {sum(rates) / n_layers:.4f})"
        )
    return [float(r) for r in rates]


def project_to_mean(rates: list[float], beta: float, p_max: float = 1.0) -> list[float]:
    """Euclidean projection onto {p : mean(p) = beta, 0 <= p_i <= p_max}.

    The solution is ``clip(p + t, 0, p_max)`` for the unique shift ``t`` that makes the mean equal
    ``beta`` (found by bisection: the mean is monotone in ``t``). It repairs mean drift while
    changing the vector as little as possible, which keeps an oracle's intent intact.
    """
    if not 0.0 <= beta <= p_max:
        raise UserError(f"target ratio {beta} is outside [0, p_max={p_max}]; raise p_max or lower the ratio")
    n = len(rates)

    def mean_at(t: float) -> float:
        return sum(min(max(r + t, 0.0), p_max) for r in rates) / n

    lo, hi = -max(rates) - 1.0, p_max - min(rates) + 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if mean_at(mid) < beta:
            lo = mid
        else:
            hi = mid
    t = (lo + hi) / 2
    return [min(max(r + t, 0.0), p_max) for r in rates]


def uniform(n_layers: int, beta: float) -> list[float]:
    return [beta] * n_layers


def spread_down(values: list[float], beta: float, lam: float) -> list[float]:
    """The larger a layer's value, the lower its rate: min-max scale ``values`` to [0, 2*lam] and
    subtract the centred result from beta, so the mean stays beta and rates span at most 2*lam
    (then :func:`project_to_mean` for [0, 1]). Equal values give beta everywhere. OWL's mapping,
    which DLP reuses (:mod:`selfprune.allocators.dlp`)."""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    scaled = [(x - lo) / span * 2 * lam for x in values]
    mean = sum(scaled) / len(scaled)
    return project_to_mean([beta - (s - mean) for s in scaled], beta)


def owl(outlier_ratios: list[float], beta: float, lam: float = 0.08) -> list[float]:
    """OWL: layers with more outliers are pruned less.

    ``outlier_ratios`` holds each layer's LOD (share of Wanda scores above M x the layer mean),
    spread to beta +- lam by :func:`spread_down`.
    """
    return spread_down(outlier_ratios, beta, lam)


SDSA_TEMPERATURE = 1.0
SDSA_LAMBDA = 0.04  # chosen on the fitness split: bench/sdsa_defaults.py


def sdsa(skews: list[float], beta: float, temperature: float = SDSA_TEMPERATURE, lam: float = SDSA_LAMBDA,
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


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def layer_keep(arch: Arch, rate: float) -> LayerKeep:
    """Round one layer's rate to units.

    Attention first: ``round(rate * n_kv_heads)`` whole KV groups go. The MLP then removes the
    number of channels that brings the layer's removed parameters closest to ``rate *
    layer_params`` (clamped to the MLP's size), so the coarse attention step is compensated and
    the realized per-layer fraction is within one channel of the target unless clamped.
    ``rate = 1`` removes both sub-layers entirely.
    """
    g_removed = min(arch.n_kv_heads, _round_half_up(rate * arch.n_kv_heads))
    target = rate * arch.layer_params - g_removed * arch.group_params
    c_removed = min(arch.intermediate, max(0, _round_half_up(target / arch.channel_params)))
    return LayerKeep(groups=arch.n_kv_heads - g_removed, channels=arch.intermediate - c_removed)


def rates_to_structure(arch: Arch, rates: list[float]) -> Structure:
    return tuple(layer_keep(arch, r) for r in rates)


def dense_structure(arch: Arch) -> Structure:
    """The structure that keeps every KV group and MLP channel: the dense model, as a candidate."""
    return tuple(LayerKeep(arch.n_kv_heads, arch.intermediate) for _ in range(arch.n_layers))


def kept_params(arch: Arch, structure: Structure) -> int:
    return sum(k.groups * arch.group_params + k.channels * arch.channel_params for k in structure)


def realized_ratio(arch: Arch, structure: Structure) -> float:
    """Fraction of all decoder-layer prunable parameters removed."""
    return 1.0 - kept_params(arch, structure) / (arch.layer_params * arch.n_layers)


def structure_to_json(structure: Structure) -> list[list[int]]:
    return [[k.groups, k.channels] for k in structure]


def structure_from_json(data: list[list[int]]) -> Structure:
    return tuple(LayerKeep(int(g), int(c)) for g, c in data)


def lod(weight_scores: list[torch.Tensor], m: float = 5.0) -> float:
    """Layer outlier distribution: share of scores above ``m`` x the layer's mean score."""
    flat = torch.cat([s.flatten() for s in weight_scores])
    return float((flat > m * flat.mean()).float().mean())
