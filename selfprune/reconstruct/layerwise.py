"""Layer by layer, as SparseGPT runs: the calibration windows through the model, each layer's
input Hessians summed from the already pruned layers below, the layer pruned and refitted, its
output the next layer's input."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..methods.slicing import head_rows, kept_units, prune_layer, shallow_copy
from ..methods.sparsity import Pattern, Sparsified, layer_masks, pruned_count, sparsified
from ..methods.structure import Structure
from ..methods.wanda_sp import Rankings
from ..model.arch import Arch, decoder_layers
from ..model.stats import HOOKED, LINEAR_INPUT
from .solvers import least_squares, sparsegpt


class _Inputs(Exception):
    """Raised by the first layer's hook once it has seen a batch's inputs: nothing above it runs."""


def first_layer_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, dict]]:
    """Per batch of ``windows``: the hidden states and keyword arguments (position embeddings, mask)
    the first decoder layer receives."""
    device = next(model.parameters()).device
    found: list[tuple[torch.Tensor, dict]] = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        found.append((hidden, kwargs))
        raise _Inputs

    handle = decoder_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            for start in range(0, len(windows), batch_size):
                try:
                    model(input_ids=windows[start:start + batch_size].to(device), use_cache=False)
                except _Inputs:
                    pass
    finally:
        handle.remove()
    return found


def _run(layer: nn.Module, inputs: list[tuple[torch.Tensor, dict]]) -> list[tuple[torch.Tensor, dict]]:
    out = []
    with torch.inference_mode():
        for hidden, kwargs in inputs:
            y = layer(hidden, **kwargs)
            out.append((y[0] if isinstance(y, tuple) else y, kwargs))
    return out


def layer_hessians(layer: nn.Module, inputs: list[tuple[torch.Tensor, dict]]) -> dict[str, torch.Tensor]:
    """``X^T X`` (float64) of each distinct linear input of ``layer`` (keys of :data:`~selfprune.model.stats.HOOKED`)."""
    sums: dict[str, torch.Tensor] = {}
    handles = []
    for stat, path in HOOKED.items():
        def hook(_module, args, stat=stat):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            xtx = (x.T @ x).double()  # float32 products, summed in float64 across batches
            sums[stat] = sums[stat] + xtx if stat in sums else xtx
        handles.append(layer.get_submodule(path).register_forward_pre_hook(hook))
    try:
        _run(layer, inputs)
    finally:
        for h in handles:
            h.remove()
    return sums


LayerPruner = Callable[[int, nn.Module, dict[str, torch.Tensor]], None]  # (index, layer copy, Hessians) -> prune it


def sequential(model: nn.Module, windows: torch.Tensor, prune: LayerPruner, batch_size: int = 4,
               on_layer: Callable[[int], None] | None = None) -> nn.Module:
    """A pruned copy of ``model``: each layer's Hessians are taken on the outputs of the already
    pruned layers below, ``prune`` replaces that layer's linears (never writing into shared
    tensors), and the pruned layer's outputs feed the next one."""
    pruned = shallow_copy(model)
    inputs = first_layer_inputs(pruned, windows, batch_size)
    for i, layer in enumerate(decoder_layers(pruned)):
        prune(i, layer, layer_hessians(layer, inputs))
        inputs = _run(layer, inputs)
        if on_layer:
            on_layer(1)
    return pruned


def replace_weight(linear: nn.Linear, weight: torch.Tensor) -> None:
    """Give ``linear`` a new weight tensor (the old one may be the dense model's)."""
    linear.weight = nn.Parameter(weight.to(linear.weight.dtype), requires_grad=False)


def sparse_update(layer: nn.Module, hessians: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None,
                  rate: float, pattern: Pattern) -> dict[str, torch.Tensor]:
    """SparseGPT on each prunable linear of one layer, on the given ``masks`` (keep, by path) or
    adaptive; returns the keep masks used."""
    used = {}
    for path, stat in LINEAR_INPUT.items():
        linear = layer.get_submodule(path)
        weight, used[path] = sparsegpt(linear.weight, hessians[stat], None if masks is None else masks[path], rate, pattern)
        replace_weight(linear, weight)
    return used


def refit_consumers(layer: nn.Module, hessians: dict[str, torch.Tensor], dense: nn.Module,
                    q_cols: torch.Tensor | None, channels: torch.Tensor | None) -> None:
    """Least squares on the kept inputs of ``o_proj`` (``q_cols``) and ``down_proj`` (``channels``),
    from the dense layer's weights; ``None``: that sub-layer kept everything or was removed."""
    if q_cols is not None:
        replace_weight(layer.self_attn.o_proj, least_squares(dense.self_attn.o_proj.weight, hessians["attn_in"], q_cols))
    if channels is not None:
        replace_weight(layer.mlp.down_proj, least_squares(dense.mlp.down_proj.weight, hessians["mlp_in"], channels))


def sparse_model(model: nn.Module, arch: Arch, windows: torch.Tensor, scores: Callable[[int], dict[str, torch.Tensor]] | None,
                 rates: list[float], pattern: Pattern, batch_size: int = 4,
                 on_layer: Callable[[int], None] | None = None) -> Sparsified:
    """An unstructured or N:M model with its kept weights updated by SparseGPT: masks from
    ``scores`` (layer -> each linear's scores on the dense model), or SparseGPT's own (``None``)."""
    counts = []

    def prune(i: int, layer: nn.Module, hessians: dict[str, torch.Tensor]) -> None:
        masks = None if scores is None else layer_masks(scores(i), rates[i], pattern)
        counts.append(pruned_count(sparse_update(layer, hessians, masks, rates[i], pattern)))

    return sparsified(sequential(model, windows, prune, batch_size, on_layer), arch, counts)


def structured_model(model: nn.Module, arch: Arch, rankings: Rankings, structure: Structure, windows: torch.Tensor,
                     batch_size: int = 4, on_layer: Callable[[int], None] | None = None) -> nn.Module:
    """The sliced model of ``structure`` with o_proj and down_proj refitted by least squares."""
    units = kept_units(rankings, structure)
    dense = decoder_layers(model)

    def prune(i: int, layer: nn.Module, hessians: dict[str, torch.Tensor]) -> None:
        groups, channels = units[i]
        prune_layer(layer, arch, i, groups, channels)
        q_cols = head_rows(arch, groups)[0] if 0 < len(groups) < arch.n_kv_heads else None
        refit_consumers(layer, hessians, dense[i], q_cols, channels if 0 < len(channels) < arch.intermediate else None)

    pruned = sequential(model, windows, prune, batch_size, on_layer)
    pruned.config.selfprune_layers = [[k.groups, k.channels] for k in structure]
    return pruned


# ------------------------------------------------------------------------------------------
# the registered reconstructions: each one's builds (what each does: the module docstring)
