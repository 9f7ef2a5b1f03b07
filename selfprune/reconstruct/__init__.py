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
from ..methods.slicing import materialize
from ..methods.sparsity import Pattern, Sparsified, sparsify
from ..methods.structure import Structure
from ..methods.wanda_sp import Rankings
from ..model.arch import Arch
from .layerwise import sparse_model, structured_model

RECONSTRUCT_VERSION = "1"  # bump when what a reconstruction returns changes: it is in every key it changes


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
