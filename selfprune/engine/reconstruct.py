"""Weight reconstruction: after a mask decides which weights or units go, refit the ones that stay.

Every strong method at high sparsity updates the kept weights (SparseGPT, FLAP, ALPS); removing
alone leaves each linear's output wrong by the removed terms. Reconstruction runs the calibration
windows through the model layer by layer, as SparseGPT does: the inputs of layer ``i`` come from
the already pruned layers below, its linears' input Hessians ``H = X^T X`` are summed over those
inputs, the layer is pruned and refitted, and its output feeds layer ``i + 1``. Only one layer's
Hessians and one set of layer inputs are in memory at a time (at Llama-2-7B's shapes, 4096^2 x 3 +
11008^2 float32: 0.68 GB of Hessians, plus the windows' hidden states).

* ``sparsegpt``: the OBS update of SparseGPT (Frantar & Alistarh, 2023) on a given mask (the
  metric's): columns left to right, each pruned weight's error spread over the columns not yet
  visited through the Cholesky factor of ``H^-1``, in lazy blocks of 128 columns, ``H`` dampened by
  1% of its mean diagonal.
* ``sparsegpt-adaptive``: the same update choosing its own mask as it goes (per 128-column block
  by ``w^2 / [H^-1]_jj^2``, or per N:M group), as llm-compressor's ``SparseGPTModifier`` does.
* ``lsq``: structured pruning; the consumers of removed units (``o_proj`` for KV groups,
  ``down_proj`` for MLP channels) get their kept columns refitted by least squares,
  ``W_k = W H[:, k] H[k, k]^-1``, so they best reproduce the dense layer's output from what is left.

The dense model is never modified: pruned layers get new tensors, unpruned ones stay shared.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..core.errors import UserError
from ..core.registry import Registry
from .allocation import Structure
from .arch import Arch, decoder_layers
from .slicing import head_rows, kept_units, materialize, prune_layer, shallow_copy
from .sparsity import Pattern, Sparsified, layer_masks, pruned_count, sparsified, sparsify
from .stats import HOOKED, LINEAR_INPUT
from .wanda_sp import Rankings

RECONSTRUCT_VERSION = "1"  # bump when what a reconstruction returns changes: it is in every key it changes
BLOCK = 128  # SparseGPT's lazy-update block of columns
DAMP = 0.01  # dampening: this fraction of H's mean diagonal is added to its diagonal


@dataclass(frozen=True)
class LayerPass:
    """What a reconstruction runs on: the calibration windows (read only when one needs them), the
    batch size, and a progress step per layer (``(label, total) -> advance``)."""

    windows: Callable[[], torch.Tensor]
    batch_size: int
    progress: Callable[[str, int], Callable[[int], None]]

    def on_layer(self, arch: Arch) -> Callable[[int], None]:
        return self.progress("reconstruction (layers)", arch.n_layers)


Scores = Callable[[int], dict[str, torch.Tensor]]  # layer index -> each linear's scores on the dense model
# (model, arch, rankings, structure, pass) -> the sliced model, its consumers refitted or not
StructuredBuild = Callable[[nn.Module, Arch, Rankings, Structure, LayerPass], nn.Module]
# (model, arch, the metric's scores, rates, pattern, pass) -> the sparse model, its kept weights updated or not
SparseBuild = Callable[[nn.Module, Arch, Scores, list[float], Pattern, LayerPass], Sparsified]


@dataclass(frozen=True)
class Reconstruction:
    """How the kept weights are refitted, as the builds of the candidates it applies to: ``structured``
    for whole units removed, ``sparse`` for single weights (unstructured and N:M); ``own_mask``:
    it chooses the sparse mask itself, so a metric only decides the allocation."""

    name: str
    structured: StructuredBuild | None = None
    sparse: SparseBuild | None = None
    own_mask: bool = False

    def kinds(self) -> list[str]:
        return [k for k in ("structured", "sparse") if getattr(self, k) is not None]


RECONSTRUCTIONS: Registry[Reconstruction] = Registry("reconstruction")
NONE = "none"
ADAPTIVE = "sparsegpt-adaptive"


def reconstruction(name: str, kind: str) -> Reconstruction:
    """The registered reconstruction ``name`` if it applies to ``kind`` (``structured`` or ``sparse``)
    candidates (``none`` applies to both); else a UserError naming the fix."""
    found = RECONSTRUCTIONS.get(name)
    if kind not in found.kinds():
        fits = [r for r in RECONSTRUCTIONS.names() if r != NONE and kind in RECONSTRUCTIONS.get(r).kinds()]
        what = "structured pruning (--method)" if kind == "structured" else "pruning by a metric (--metric)"
        raise UserError(f"--reconstruct {name} applies to {' and '.join(found.kinds())} pruning, not to {what}; "
                        f"use {' or '.join(fits)}")
    return found


def check_reconstruction(name: str, kind: str) -> str:
    """``name`` if it applies to ``kind`` candidates; else a UserError naming the fix."""
    return reconstruction(name, kind).name


def identity(name: str) -> dict:
    """What a reconstruction adds to a cache key: nothing for ``none``, so existing keys stay valid."""
    return {} if name == NONE else {"reconstruct": {"name": name, "version": RECONSTRUCT_VERSION}}


# ------------------------------------------------------------------------------------------
# the updates, one linear at a time


def _dampened(hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``H`` (float64) with dead inputs (never active) made harmless and 1% of the mean diagonal
    added to its diagonal; and the dead inputs."""
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    h.diagonal().add_(DAMP * torch.diagonal(h).mean())
    return h, dead


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor | None = None,
              sparsity: float = 0.0, pattern: Pattern | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's OBS update of ``weight`` ([out, in]) given its inputs' Hessian ([in, in]).

    With ``keep`` (True where a weight stays) the mask is given; without it the mask is chosen as
    the update goes: per ``BLOCK`` columns the ``sparsity`` share with the smallest
    ``w^2 / [H^-1]_jj^2``, or for an N:M ``pattern`` the M-N smallest of each group of a row.
    Returns the new float32 weight, zero exactly where pruned, and the keep mask.
    """
    w = weight.detach().float().clone()
    h, dead = _dampened(hessian.to(w.device))
    w[:, dead] = 0
    # upper Cholesky factor of H^-1: row i spreads column i's error over the columns after it
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    cols = w.shape[1]
    pruned = torch.zeros_like(w, dtype=torch.bool) if keep is None else ~keep.to(w.device)
    nm = pattern is not None and pattern.kind == "nm"
    for i1 in range(0, cols, BLOCK):
        i2 = min(i1 + BLOCK, cols)
        w1, h1, mask1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2], pruned[:, i1:i2].clone()
        d = torch.diagonal(h1)
        err1 = torch.zeros_like(w1)
        if keep is None and not nm and int(mask1.numel() * sparsity):
            low = torch.topk((w1.pow(2) / d.pow(2)).flatten(), int(mask1.numel() * sparsity), largest=False).indices
            mask1.view(-1)[low] = True
        for i in range(i2 - i1):
            if keep is None and nm and i % pattern.m == 0:
                group = w1[:, i:i + pattern.m].pow(2) / d[i:i + pattern.m].pow(2)
                mask1[:, i:i + pattern.m].scatter_(1, torch.topk(group, pattern.m - pattern.n, dim=1, largest=False).indices, True)
            err = torch.where(mask1[:, i], w1[:, i], 0.0) / d[i]
            w1[:, i:] -= err[:, None] * h1[i, i:][None, :]
            err1[:, i] = err
        w1[mask1] = 0
        w[:, i1:i2], pruned[:, i1:i2] = w1, mask1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w, ~pruned


def least_squares(weight: torch.Tensor, hessian: torch.Tensor, kept_cols: torch.Tensor) -> torch.Tensor:
    """The kept columns ``W_k`` ([out, len(kept)]) that best give ``W x`` from the kept inputs alone:
    ``W H[:, k] H[k, k]^-1`` with ``H[k, k]`` dampened as SparseGPT's."""
    h = hessian.double().to(weight.device)
    k = kept_cols.to(weight.device)
    hkk, _ = _dampened(h[k][:, k])
    return torch.linalg.solve(hkk, (weight.double() @ h[:, k]).T).T.float()


# ------------------------------------------------------------------------------------------
# layer by layer


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
    """``X^T X`` (float64) of each distinct linear input of ``layer`` (keys of :data:`~selfprune.engine.stats.HOOKED`)."""
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

def _sliced(model: nn.Module, arch: Arch, rankings: Rankings, structure: Structure, _: LayerPass) -> nn.Module:
    return materialize(model, arch, rankings, structure)


def _masked(model: nn.Module, arch: Arch, scores: Scores, rates: list[float], pattern: Pattern, _: LayerPass) -> Sparsified:
    return sparsify(model, arch, scores, rates, pattern)


def _sparsegpt(model: nn.Module, arch: Arch, scores: Scores, rates: list[float], pattern: Pattern, p: LayerPass) -> Sparsified:
    return sparse_model(model, arch, p.windows(), scores, rates, pattern, p.batch_size, p.on_layer(arch))


def _adaptive(model: nn.Module, arch: Arch, scores: Scores, rates: list[float], pattern: Pattern, p: LayerPass) -> Sparsified:
    return sparse_model(model, arch, p.windows(), None, rates, pattern, p.batch_size, p.on_layer(arch))


def _lsq(model: nn.Module, arch: Arch, rankings: Rankings, structure: Structure, p: LayerPass) -> nn.Module:
    return structured_model(model, arch, rankings, structure, p.windows(), p.batch_size, p.on_layer(arch))


for _r in (Reconstruction(NONE, structured=_sliced, sparse=_masked), Reconstruction("sparsegpt", sparse=_sparsegpt),
           Reconstruction(ADAPTIVE, sparse=_adaptive, own_mask=True), Reconstruction("lsq", structured=_lsq)):
    RECONSTRUCTIONS.register(_r.name, _r)
