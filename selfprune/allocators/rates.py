"""Per-layer pruning rates: validation, and projection onto the budget (the arithmetic every
allocation and the searches share).

A rate ``p_i`` is the fraction of decoder layer ``i``'s prunable parameters to remove; a rate
vector meets the budget when its mean is the target ratio.
"""

from __future__ import annotations

import math

from ..core.errors import UserError

MEAN_TOLERANCE = 1e-3


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
