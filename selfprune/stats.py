"""Activation statistics from one calibration pass, the input of Wanda-sp and OWL.

Forward pre-hooks record, per decoder layer, the per-channel sum of squares of the inputs of
``o_proj`` (concatenated head outputs) and ``down_proj`` (``act(gate) * up``), which Wanda-sp
scores with, and of ``q_proj`` and ``gate_proj`` (the normed hidden states, which OWL needs to
score q/k/v/gate/up). Sums accumulate in float32 on the model's device whatever the model dtype,
batch by batch, so memory is bounded by one batch. They are stored in the artifact store
(safetensors, atomic, digest-checked) under a content key that includes :data:`STATS_VERSION`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .arch import decoder_layers
from .errors import CorruptFile

# Bump whenever what capture() returns changes: it is part of the statistics' cache key.
STATS_VERSION = "stats-2"

# statistic name -> the sub-module (inside a decoder layer) whose input it records
HOOKED = {
    "attn_in": "self_attn.o_proj",
    "mlp_in": "mlp.down_proj",
    "qkv_in": "self_attn.q_proj",
    "gate_in": "mlp.gate_proj",
}


def capture(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Run ``windows`` ([n, seqlen] token ids) through the model and return summed statistics.

    Keys are ``"{layer}.{stat}.sq"`` plus ``"tokens"`` (a 0-d count); divide by ``tokens`` for means.
    """
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(key: str):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sq = x.pow(2).sum(0)
            if key in sums:
                sums[key] += sq
            else:
                sums[key] = sq

        return hook

    for i, layer in enumerate(decoder_layers(model)):
        for stat, path in HOOKED.items():
            handles.append(layer.get_submodule(path).register_forward_pre_hook(make_hook(f"{i}.{stat}.sq")))
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


def check(stats: dict[str, torch.Tensor], n_layers: int, where: object) -> dict[str, torch.Tensor]:
    """``stats`` if they hold exactly what :func:`capture` gives for an ``n_layers`` model; else
    :class:`CorruptFile` naming ``where`` (a foreign, truncated or older-version file)."""
    expected = {"tokens"} | {f"{i}.{stat}.sq" for i in range(n_layers) for stat in HOOKED}
    missing, extra = sorted(expected - set(stats)), sorted(set(stats) - expected)
    if missing or extra:
        raise CorruptFile(where, f"statistics for a {n_layers}-layer model, but missing {missing[:4]}, unexpected {extra[:4]}")
    return stats
