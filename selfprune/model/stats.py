"""Activation statistics from one calibration pass, the input of Wanda-sp and OWL.

Forward pre-hooks record, per decoder layer, the per-channel sum and sum of squares of the inputs
of ``o_proj`` (concatenated head outputs) and ``down_proj`` (``act(gate) * up``), which Wanda-sp
scores with, and of ``q_proj`` and ``gate_proj`` (the normed hidden states, which OWL needs to
score q/k/v/gate/up): every linear input of a layer, so a pruning metric may use each input
channel's RMS, mean and variance (:func:`channel_stats`). Sums accumulate in float32 on the model's device whatever the model dtype,
batch by batch, so memory is bounded by one batch. They are stored in the artifact store
(safetensors, atomic, digest-checked) under a content key that includes :data:`STATS_VERSION`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..core.errors import CorruptFile
from .arch import decoder_layers

# Bump whenever what capture() returns changes: it is part of the statistics' cache key.
STATS_VERSION = "stats-3"

# statistic name -> the sub-module (inside a decoder layer) whose input it records
HOOKED = {
    "attn_in": "self_attn.o_proj",
    "mlp_in": "mlp.down_proj",
    "qkv_in": "self_attn.q_proj",
    "gate_in": "mlp.gate_proj",
}
# each prunable linear of a decoder layer -> the statistic of its input
LINEAR_INPUT = {
    "self_attn.q_proj": "qkv_in", "self_attn.k_proj": "qkv_in", "self_attn.v_proj": "qkv_in",
    "self_attn.o_proj": "attn_in",
    "mlp.gate_proj": "gate_in", "mlp.up_proj": "gate_in",
    "mlp.down_proj": "mlp_in",
}
SUMS = ("sq", "sum")


def capture(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Run ``windows`` ([n, seqlen] token ids) through the model and return summed statistics.

    Keys are ``"{layer}.{stat}.sq"`` and ``"{layer}.{stat}.sum"`` plus ``"tokens"`` (a 0-d count);
    divide by ``tokens`` for means.
    """
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(key: str):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            for name, value in (("sq", x.pow(2).sum(0)), ("sum", x.sum(0))):
                if f"{key}.{name}" in sums:
                    sums[f"{key}.{name}"] += value
                else:
                    sums[f"{key}.{name}"] = value

        return hook

    for i, layer in enumerate(decoder_layers(model)):
        for stat, path in HOOKED.items():
            handles.append(layer.get_submodule(path).register_forward_pre_hook(make_hook(f"{i}.{stat}")))
    tokens = 0
    try:
        with torch.inference_mode():
            for start in range(0, len(windows), batch_size):
                batch = windows[start : start + batch_size].to(device)
                model(input_ids=batch, use_cache=False)
                tokens += batch.numel()
                if on_batch:
                    on_batch(len(batch))
    finally:
        for h in handles:
            h.remove()
    out = {k: v.cpu() for k, v in sums.items()}
    out["tokens"] = torch.tensor(float(tokens), dtype=torch.float64)
    return out


def mean_sq(stats: dict[str, torch.Tensor], layer: int, stat: str) -> torch.Tensor:
    """Mean over calibration tokens of x_j^2 for one hooked input."""
    return stats[f"{layer}.{stat}.sq"].double().div(stats["tokens"]).float()


def channel_stats(stats: dict[str, torch.Tensor], layer: int, stat: str) -> dict[str, torch.Tensor]:
    """Per input channel: the activation RMS, mean and variance (the inputs of a pruning metric)."""
    tokens = stats["tokens"]
    sq = stats[f"{layer}.{stat}.sq"].double().div(tokens)
    mean = stats[f"{layer}.{stat}.sum"].double().div(tokens)
    return {"X_rms": sq.sqrt().float(), "X_mean": mean.float(), "X_var": (sq - mean.pow(2)).clamp_min(0).float()}


def check(stats: dict[str, torch.Tensor], n_layers: int, where: object) -> dict[str, torch.Tensor]:
    """``stats`` if they hold exactly what :func:`capture` gives for an ``n_layers`` model; else
    :class:`CorruptFile` naming ``where`` (a foreign, truncated or older-version file)."""
    expected = {"tokens"} | {f"{i}.{stat}.{s}" for i in range(n_layers) for stat in HOOKED for s in SUMS}
    missing, extra = sorted(expected - set(stats)), sorted(set(stats) - expected)
    if missing or extra:
        raise CorruptFile(where, f"statistics for a {n_layers}-layer model, but missing {missing[:4]}, unexpected {extra[:4]}")
    return stats
