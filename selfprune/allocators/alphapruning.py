"""AlphaPruning: heavy-tailed spectra mark well-trained layers (Lu et al., "AlphaPruning: Using
Heavy-Tailed Self Regularization Theory for Improved Layer-wise Pruning of Large Language Models",
NeurIPS 2024; haiquanlu/AlphaPruning).

Per linear weight ``W``, the eigenvalues of ``W^T W`` (squared singular values, ``svdvals`` in
float32 as ``lib/esd_utils.py::net_esd_estimator`` computes them) have a power-law tail whose
exponent ``alpha`` (PL_Alpha_Hill) is the Hill estimate ``1 + n / sum_j ln(lambda_j / x_min)``
over the ``n`` eigenvalues ``>= x_min``. ``x_min`` as the default ``--ww_metric alpha_peak``
(``fix_fingers='xmin_peak'``): among the eigenvalues near the peak of the histogram of
``log10(lambda)`` (100 bins), the one whose fit has the smallest Kolmogorov-Smirnov distance
``max_j |1 - (lambda_j / x_min)^(1 - alpha) - j / n|``. The code bounds "near" by
``log10(0.95 * peak)`` below (a log compared with an eigenvalue) and ``1.5 * peak`` above; we take
the window [0.95 * peak, 1.5 * peak] it evidently means. Eigenvalues that are exactly zero (rank
deficiency) are dropped, their log being undefined.

A layer's alpha is the mean over its seven linears (``--mapping_type block_wise``, the default,
in ``lib/prune.py::ww_sparsity``). A smaller alpha is a heavier tail, a better-trained layer, so
higher alpha means pruned MORE: ``phi_l = (1 - eps) + 2 * eps * (alpha_l - min) / (max - min)``
and ``p_l = beta * phi_l / mean(phi)`` (ww_sparsity's ``scaler``: every layer has the same
parameter count, so its weighted mean is the plain one). The spread is relative: rates lie in
``beta * [1 - eps, 1 + eps] / mean(phi)``, not ``beta +- eps``. eps = 0.3, ``main.py``'s
``--epsilon`` default (its ``scripts/llama_7b.sh`` uses 0.3 with magnitude, 0.2 with Wanda and
SparseGPT). Rates past 1 (a high beta) are repaired by :func:`selfprune.allocators.rates.project_to_mean`.
It reads the weights alone: no statistics, no metric.
"""

from __future__ import annotations

import torch

from ..model.arch import Arch, decoder_layers
from ..model.stats import LINEAR_INPUT
from . import ALLOCATIONS
from .rates import project_to_mean

EPSILON = 0.3  # main.py --epsilon
BINS = 100  # net_esd_estimator's histogram of log10 eigenvalues


def eigenvalues(weight: torch.Tensor) -> torch.Tensor:
    """The nonzero eigenvalues of ``W^T W``, ascending, in float64."""
    eigs = torch.linalg.svdvals(weight.detach().float()).double().square().sort().values.cpu()
    return eigs[eigs > 0]


def hill(eigs: torch.Tensor, i: int) -> float:
    """The Hill estimate of the tail exponent above ``x_min = eigs[i]`` (``eigs`` ascending)."""
    logs = eigs[i:].log()
    n = len(logs)
    return float(1 + n / (logs.sum() - n * logs[0]))


def ks_distance(eigs: torch.Tensor, i: int, alpha: float) -> float:
    """Kolmogorov-Smirnov distance between the tail above ``eigs[i]`` and the power law ``alpha``."""
    tail = eigs[i:]
    n = len(tail)
    fitted = 1 - (tail / tail[0]) ** (1 - alpha)
    return float((fitted - torch.arange(n, dtype=tail.dtype) / n).abs().max())


def pl_alpha_hill(eigs: torch.Tensor) -> float:
    """PL_Alpha_Hill with ``x_min`` chosen near the histogram's peak (ascending ``eigs``).

    The candidates are the eigenvalues (but the largest) in [0.95, 1.5] x the left edge of the
    peak bin; all of them when that window holds none (a spectrum spanning over 17 decades).
    """
    logs = eigs.log10()
    lo, hi = float(logs.min()), float(logs.max())
    counts = torch.histc(logs, BINS, min=lo, max=hi)
    peak = 10 ** (lo + int(counts.argmax()) * (hi - lo) / BINS)
    below_top = range(len(eigs) - 1)
    candidates = [i for i in below_top if 0.95 * peak <= eigs[i] <= 1.5 * peak] or list(below_top)
    best = min(candidates, key=lambda i: ks_distance(eigs, i, hill(eigs, i)))
    return hill(eigs, best)


def layer_alphas(model: torch.nn.Module) -> list[float]:
    """Each decoder layer's PL_Alpha_Hill: the mean over its seven linears."""
    def alpha(layer: torch.nn.Module) -> float:
        return sum(pl_alpha_hill(eigenvalues(layer.get_submodule(p).weight)) for p in LINEAR_INPUT) / len(LINEAR_INPUT)

    return [alpha(layer) for layer in decoder_layers(model)]


def rates(alphas: list[float], beta: float, epsilon: float = EPSILON) -> list[float]:
    """Higher alpha (lighter tail, less well trained), higher rate: linear in alpha, mean beta."""
    lo, hi = min(alphas), max(alphas)
    span = (hi - lo) or 1.0
    phi = [1 - epsilon + 2 * epsilon * (a - lo) / span for a in alphas]
    mean = sum(phi) / len(phi)
    return project_to_mean([beta * p / mean for p in phi], beta)


@ALLOCATIONS.register("alphapruning", order=5)
def alphapruning(model: torch.nn.Module, arch: Arch, stats: dict[str, torch.Tensor], ratio: float) -> list[float]:
    return rates(layer_alphas(model), ratio)
