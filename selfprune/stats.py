"""Activation statistics from one calibration pass, the input of Wanda-sp and OWL.

Forward hooks record, per decoder layer, the per-channel sum of squares (and sum, for FLAP-style
bias compensation) of the inputs of ``o_proj`` (concatenated head outputs) and ``down_proj``
(``act(gate) * up``), and the sum of squares of the inputs of ``q_proj`` and ``gate_proj`` (the
normed hidden states, which OWL needs to score q/k/v/gate/up). Sums accumulate in float32 on the
model's device whatever the model dtype, batch by batch, so memory is bounded by one batch.
They are stored in the artifact store (safetensors, atomic, digest-checked) under a content key.
"""

from __future__ import annotations

from collections.abc import Callable
import torch

from .arch import decoder_layers
from .errors import UserError

# statistic name -> (sub-module path inside a decoder layer, whether the plain sum is kept too)
HOOKED = {
    "attn_in": ("self_attn.o_proj", True),
    "mlp_in": ("mlp.down_proj", True),
    "qkv_in": ("self_attn.q_proj", False),
    "gate_in": ("mlp.gate_proj", False),
}


def capture(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Run ``windows`` ([n, seqlen] token ids) through the model and return summed statistics.

    Keys are ``"{layer}.{stat}.sq"`` / ``"{layer}.{stat}.sum"`` plus ``"tokens"`` (a 0-d count);
    divide by ``tokens`` for means.
    """
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(prefix: str, keep_sum: bool):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sq = x.pow(2).sum(0)
            if prefix + ".sq" in sums:
                sums[prefix + ".sq"] += sq
            else:
                sums[prefix + ".sq"] = sq
            if keep_sum:
                s = x.sum(0)
                if prefix + ".sum" in sums:
                    sums[prefix + ".sum"] += s
                else:
                    sums[prefix + ".sum"] = s

        return hook

    for i, layer in enumerate(decoder_layers(model)):
        for stat, (path, keep_sum) in HOOKED.items():
            handles.append(layer.get_submodule(path).register_forward_pre_hook(make_hook(f"{i}.{stat}", keep_sum)))
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
    """Refuse statistics that do not cover the model (a foreign or truncated file)."""
    missing = [k for k in ("tokens", f"{n_layers - 1}.mlp_in.sq") if k not in stats]
    if missing:
        raise UserError(f"statistics {where} lack {missing}; delete the file and rerun to recompute it")
    return stats
