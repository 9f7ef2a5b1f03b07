"""Wanda-sp unit scores and rankings (structured Wanda, as in FLAP's ``wanda_sp``).

For an output projection W (o_proj or down_proj) and its input statistic E[x_j^2], the score of
input channel j is ``mean_i |W_ij| * sqrt(E[x_j^2])``. An MLP channel's score is that of its
down_proj column; a KV group's score is the sum over the head_dim channels of all its query
heads in o_proj. The lowest-scoring units are removed. All rankings come from one dense pass
(one-shot), which is what makes building a candidate a pure slicing operation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..model.arch import Arch, decoder_layers
from ..model.stats import LINEAR_INPUT, mean_sq


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


def weight_scores(model: torch.nn.Module, stats: dict[str, torch.Tensor]) -> Callable[[int], list[torch.Tensor]]:
    """Layer ``i`` -> unstructured Wanda scores |W_ij| * ||x_j|| of each of its linears (what OWL
    and SDSA read a layer's outliers from when no other metric is given)."""
    layers = decoder_layers(model)

    def scores(i: int) -> list[torch.Tensor]:
        weights = {path: layers[i].get_submodule(path).weight.detach().float() for path in LINEAR_INPUT}
        return [w.abs() * mean_sq(stats, i, LINEAR_INPUT[path]).to(w.device).sqrt() for path, w in weights.items()]

    return scores
