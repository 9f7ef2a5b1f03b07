"""The gradient statistic G of a pruning metric: per weight, sqrt of the summed squared per-window
gradients of the language-modelling loss (GBLM-Pruner's and Pruner-Zero's G).

One backward pass per calibration window (a window is a sample, so gradients are per sample, not
averaged first), over the first :data:`WINDOWS` windows of the calibration split. Only the
prunable linears of the decoder layers get gradients; sums accumulate in float32. The dense model
is left as it was (its ``requires_grad`` flags and ``.grad`` restored). Stored like the activation
statistics, under a key that holds :data:`GRADIENTS_VERSION`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..model.arch import decoder_layers
from ..model.stats import LINEAR_INPUT

GRADIENTS_VERSION = "grads-1"
WINDOWS = 32  # per-sample backward passes: G's noise falls slowly past a few dozen


def capture(model: torch.nn.Module, windows: torch.Tensor, on_window: Callable[[int], None] | None = None
            ) -> dict[str, torch.Tensor]:
    """``{"{layer}.{linear path}": G}`` for every prunable linear, from ``windows`` ([n, seqlen])."""
    device = next(model.parameters()).device
    weights = {f"{i}.{path}": layer.get_submodule(path).weight
               for i, layer in enumerate(decoder_layers(model)) for path in LINEAR_INPUT}
    flags = {name: w.requires_grad for name, w in weights.items()}
    sums = {name: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for name, w in weights.items()}
    try:
        for w in weights.values():
            w.requires_grad_(True)
        with torch.enable_grad():
            for window in windows:
                ids = window[None].to(device)
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
                for name, w in weights.items():
                    sums[name] += w.grad.float().pow(2)
                    w.grad = None
                if on_window:
                    on_window(1)
    finally:
        for name, w in weights.items():
            w.grad = None
            w.requires_grad_(flags[name])
    return {name: s.sqrt().cpu() for name, s in sums.items()}
