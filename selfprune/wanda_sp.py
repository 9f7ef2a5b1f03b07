"""Wanda-sp unit scores and rankings (structured Wanda, as in FLAP's ``wanda_sp``).

For an output projection W (o_proj or down_proj) and its input statistic E[x_j^2], the score of
input channel j is ``mean_i |W_ij| * sqrt(E[x_j^2])``. An MLP channel's score is that of its
down_proj column; a KV group's score is the sum over the head_dim channels of all its query
heads in o_proj. The lowest-scoring units are removed. All rankings come from one dense pass
(one-shot), which is what makes building a candidate a pure slicing operation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .allocation import lod
from .arch import Arch, decoder_layers
from .stats import mean_sq


@dataclass(frozen=True)
class Rankings:
    """Per layer, unit indices ordered from least to most important (stable on ties)."""

    groups: list[torch.Tensor]
    channels: list[torch.Tensor]


def channel_scores(weight: torch.Tensor, in_mean_sq: torch.Tensor) -> torch.Tensor:
    """Wanda-sp score of each input channel of ``weight`` ([out, in])."""
    return (weight.detach().float().abs() * in_mean_sq.to(weight.device).sqrt()).mean(0).cpu()


def group_scores(arch: Arch, o_scores: torch.Tensor) -> torch.Tensor:
    """Sum o_proj channel scores over each KV group (query head h reads KV head h // group_size)."""
    return o_scores.view(arch.n_kv_heads, arch.group_size * arch.head_dim).sum(1)


def rank(model: torch.nn.Module, arch: Arch, stats: dict[str, torch.Tensor]) -> Rankings:
    groups, channels = [], []
    for i, layer in enumerate(decoder_layers(model)):
        o = channel_scores(layer.self_attn.o_proj.weight, mean_sq(stats, i, "attn_in"))
        d = channel_scores(layer.mlp.down_proj.weight, mean_sq(stats, i, "mlp_in"))
        groups.append(torch.argsort(group_scores(arch, o), stable=True))
        channels.append(torch.argsort(d, stable=True))
    return Rankings(groups, channels)


def kept(order: torch.Tensor, n_keep: int) -> torch.Tensor:
    """The ``n_keep`` highest-ranked units, in their original order (so slices stay aligned)."""
    if n_keep == 0:
        return order[:0]
    return order[-n_keep:].sort().values


def outlier_ratios(model: torch.nn.Module, stats: dict[str, torch.Tensor], m: float = 5.0) -> list[float]:
    """OWL's layer outlier distribution (LOD) from unstructured Wanda scores |W_ij| * ||x_j||."""
    ratios = []
    for i, layer in enumerate(decoder_layers(model)):
        a, mlp = layer.self_attn, layer.mlp
        inputs = {
            "qkv_in": (a.q_proj, a.k_proj, a.v_proj),
            "attn_in": (a.o_proj,),
            "gate_in": (mlp.gate_proj, mlp.up_proj),
            "mlp_in": (mlp.down_proj,),
        }
        scores = [
            lin.weight.detach().float().abs() * mean_sq(stats, i, stat).to(lin.weight.device).sqrt()
            for stat, lins in inputs.items()
            for lin in lins
        ]
        ratios.append(lod(scores, m))
    return ratios
