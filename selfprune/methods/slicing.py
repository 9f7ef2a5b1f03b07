"""Kept units + dense model -> a physically smaller model, without touching the dense weights.

The candidate is a structural copy of the dense model whose untouched tensors (embeddings, norms,
LM head, rotary buffers) are the dense model's own objects, and whose q/k/v/o and gate/up/down
projections are new ``nn.Linear`` modules holding index-selected copies of the kept rows/columns.
Building one costs one gather of the kept weights: no reload, no statistics, no masks.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

from ..model.arch import Arch, decoder_layers
from .structure import Structure
from .wanda_sp import Rankings, kept


class RemovedAttention(nn.Module):
    """Stands in for a fully pruned attention sub-layer: adds nothing to the residual stream.

    It still registers a one-channel zero key/value entry per position in a generation cache:
    cache bookkeeping reads the sequence length from layer 0, and an empty entry would read 0.
    """

    def __init__(self, layer_idx: int, o_bias: torch.Tensor | None):
        super().__init__()
        self.layer_idx = layer_idx
        self.bias = None if o_bias is None else nn.Parameter(o_bias, requires_grad=False)

    def forward(self, hidden_states: torch.Tensor, cache=None, **kwargs):
        cache = cache if cache is not None else kwargs.get("past_key_values")
        if cache is not None:
            b, s = hidden_states.shape[:2]
            placeholder = hidden_states.new_zeros(b, 1, s, 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        out = torch.zeros_like(hidden_states)
        return (out if self.bias is None else out + self.bias), None


class RemovedMLP(nn.Module):
    """Stands in for a fully pruned MLP sub-layer (output bias kept if the model has one)."""

    def __init__(self, down_bias: torch.Tensor | None):
        super().__init__()
        self.bias = None if down_bias is None else nn.Parameter(down_bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        return out if self.bias is None else out + self.bias


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear around given tensors, skipping the random init a constructor would run."""
    lin = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(lin)
    lin.in_features, lin.out_features = weight.shape[1], weight.shape[0]
    lin.weight = nn.Parameter(weight, requires_grad=False)
    lin.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
    return lin


def _rows(lin: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    idx = idx.to(lin.weight.device)
    bias = None if lin.bias is None else lin.bias.index_select(0, idx)
    return _linear(lin.weight.index_select(0, idx), bias)


def _cols(lin: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    return _linear(lin.weight.index_select(1, idx.to(lin.weight.device)), lin.bias)


def head_rows(arch: Arch, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices of q (and columns of o) and rows of k/v that belong to the kept KV groups."""
    d, gs = arch.head_dim, arch.group_size
    q = (groups[:, None] * gs * d + torch.arange(gs * d)[None, :]).flatten()
    kv = (groups[:, None] * d + torch.arange(d)[None, :]).flatten()
    return q, kv


def prune_layer(layer: nn.Module, arch: Arch, layer_idx: int, groups: torch.Tensor, channels: torch.Tensor) -> None:
    """Replace one (structurally copied) layer's projections with slices of the given units."""
    attn, mlp = layer.self_attn, layer.mlp
    if len(groups) == 0:
        layer.self_attn = RemovedAttention(layer_idx, attn.o_proj.bias)
    elif len(groups) < arch.n_kv_heads:
        q, kv = head_rows(arch, groups)
        attn.q_proj, attn.k_proj, attn.v_proj = _rows(attn.q_proj, q), _rows(attn.k_proj, kv), _rows(attn.v_proj, kv)
        attn.o_proj = _cols(attn.o_proj, q)
    if len(channels) == 0:
        layer.mlp = RemovedMLP(mlp.down_proj.bias)
    elif len(channels) < arch.intermediate:
        mlp.gate_proj, mlp.up_proj = _rows(mlp.gate_proj, channels), _rows(mlp.up_proj, channels)
        mlp.down_proj = _cols(mlp.down_proj, channels)


def shallow_copy(model: nn.Module) -> nn.Module:
    """Copy the module tree while sharing every parameter and buffer with ``model``."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def kept_units(rankings: Rankings, structure: Structure) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the sorted indices of kept KV groups and kept MLP channels."""
    return [(kept(g, k.groups), kept(c, k.channels)) for g, c, k in zip(rankings.groups, rankings.channels, structure)]


def materialize(model: nn.Module, arch: Arch, rankings: Rankings, structure: Structure) -> nn.Module:
    """Build the pruned candidate for ``structure``; ``model`` is left exactly as it was."""
    pruned = shallow_copy(model)
    for i, (layer, (groups, channels)) in enumerate(zip(decoder_layers(pruned), kept_units(rankings, structure))):
        prune_layer(layer, arch, i, groups, channels)
    pruned.config.selfprune_layers = [[k.groups, k.channels] for k in structure]
    return pruned
