"""Per-layer pruning rates: validation, projection onto the budget, rounding to units, baselines.

A rate ``p_i`` is the fraction of decoder layer ``i``'s prunable parameters to remove
(:attr:`Arch.layer_params`). The realized overall ratio is removed / total over all layers;
embeddings, norms and the LM head are not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.errors import UserError
from .arch import Arch

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
    which DLP reuses (:mod:`selfprune.engine.allocators.dlp`)."""
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


@dataclass(frozen=True)
class Alignment:
    """Kept query heads and MLP channels in multiples that kernels like (a layer may also keep all
    or none); 1 and 1 is exact rounding. Heads go with their KV group, so ``heads`` above 1 must be
    a multiple of the model's query heads per KV group."""

    heads: int = 1
    channels: int = 1

    def check(self, arch: Arch) -> Alignment:
        if self.heads < 1 or self.channels < 1:
            raise UserError("--align and --align-heads must be at least 1 (1: no alignment)")
        if self.heads > 1 and self.heads % arch.group_size:
            raise UserError(f"this model keeps query heads in KV groups of {arch.group_size}: give --align-heads a "
                            f"multiple of {arch.group_size}")
        if self.heads > arch.n_kv_heads * arch.group_size or self.channels > arch.intermediate:
            raise UserError(f"--align-heads {self.heads} / --align {self.channels} exceed the layer's "
                            f"{arch.n_kv_heads * arch.group_size} heads / {arch.intermediate} MLP channels")
        return self


EXACT = Alignment()


def _level(ideal: float, total: int, step: int) -> int:
    """The allowed kept count (a multiple of ``step``, or ``total``) nearest ``ideal``; ties keep fewer."""
    ideal = min(max(ideal, 0.0), float(total))
    low = int(ideal // step) * step
    return min({low, min(low + step, total), total}, key=lambda k: (abs(k - ideal), k))


def layer_keep(arch: Arch, rate: float, align: Alignment = EXACT) -> LayerKeep:
    """Round one layer's rate to units.

    Attention first: ``round(rate * n_kv_heads)`` whole KV groups go. The MLP then removes the
    number of channels that brings the layer's removed parameters closest to ``rate *
    layer_params`` (clamped to the MLP's size), so the coarse attention step is compensated and
    the realized per-layer fraction is within one channel of the target unless clamped.
    ``rate = 1`` removes both sub-layers entirely. With an alignment each count is the nearest
    allowed one instead.
    """
    n, width = arch.n_kv_heads, arch.intermediate
    group_step = max(1, align.heads // arch.group_size)
    if group_step == 1:
        g_removed = min(n, _round_half_up(rate * n))
    else:
        g_removed = n - _level(n - rate * n, n, group_step)
    target = (rate * arch.layer_params - g_removed * arch.group_params) / arch.channel_params
    if align.channels == 1:
        c_removed = min(width, max(0, _round_half_up(target)))
    else:
        c_removed = width - _level(width - target, width, align.channels)
    return LayerKeep(groups=n - g_removed, channels=width - c_removed)


def _channel_step(kept: int, total: int, step: int, down: bool) -> int | None:
    """The next allowed MLP width below (``down``) or above ``kept``; None at the end."""
    if down:
        return None if kept == 0 else (kept - 1) // step * step
    return None if kept == total else min(kept // step * step + step, total)


def _rebalanced(arch: Arch, rates: list[float], keeps: list[LayerKeep], step: int) -> Structure:
    """Aligned widths whose total removal is as close to the rates' total as whole steps allow.

    Rounding each layer to a multiple of ``step`` channels drifts the overall ratio; each move
    shifts one layer by one allowed width, taken from the layer furthest from its own rate in the
    needed direction, while a move still brings the total closer.
    """
    def removed(k: LayerKeep) -> float:
        return arch.layer_params - k.groups * arch.group_params - k.channels * arch.channel_params

    want = [r * arch.layer_params for r in rates]
    while True:
        gap = sum(want) - sum(map(removed, keeps))  # > 0: too little removed
        moves = []
        for i, k in enumerate(keeps):
            c = _channel_step(k.channels, arch.intermediate, step, down=gap > 0)
            if c is not None:
                moves.append(((want[i] - removed(k)) * (1 if gap > 0 else -1), -i, i, c))
        if not moves:
            break
        _, _, i, c = max(moves)
        delta = (keeps[i].channels - c) * arch.channel_params
        if abs(gap - delta) >= abs(gap):
            break
        keeps[i] = LayerKeep(keeps[i].groups, c)
    return tuple(keeps)


def rates_to_structure(arch: Arch, rates: list[float], align: Alignment = EXACT) -> Structure:
    keeps = [layer_keep(arch, r, align) for r in rates]
    return tuple(keeps) if align.channels == 1 else _rebalanced(arch, rates, keeps, align.channels)


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
