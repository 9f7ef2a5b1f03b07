"""Pruning single weights with any metric: unstructured (per output row, or per layer) and N:M.

A metric (:mod:`selfprune.metrics`) scores every weight of a linear layer from ``W`` and the
statistics of its input channels; the lowest scores become zeros. The rate of a decoder layer
applies to each of its seven linears (q, k, v, o, gate, up, down), compared within each output row
as Wanda does (``unstructured``), within the whole matrix (``unstructured-layer``), or within each
group of M consecutive inputs of a row, keeping N (``2:4``, ``4:8``). Sparsity is counted on those
linears' weights, the parameters structured pruning counts (biases and norms are kept).

:func:`sparsify` returns a copy of the model that shares every tensor with it except the masked
weights: the dense model is never modified, so one loaded model serves every candidate.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..core.errors import UserError
from ..metrics import Metric
from ..model.arch import Arch, decoder_layers
from ..model.stats import LINEAR_INPUT, channel_stats
from .slicing import shallow_copy

_NM = re.compile(r"^(\d+):(\d+)$")
PATTERN_HELP = "unstructured (per output row, as Wanda), unstructured-layer (per matrix), or N:M such as 2:4, 4:8"


@dataclass(frozen=True)
class Pattern:
    """Which weights compete for survival: a row, a whole matrix, or N:M groups of a row."""

    kind: str  # "row" | "layer" | "nm"
    n: int = 0
    m: int = 0

    @property
    def text(self) -> str:
        return {"row": "unstructured", "layer": "unstructured-layer"}.get(self.kind, f"{self.n}:{self.m}")

    @property
    def fixed_sparsity(self) -> float | None:
        """N:M prunes exactly 1 - N/M of every layer; unstructured takes any rate."""
        return 1 - self.n / self.m if self.kind == "nm" else None

    def check_fixed(self, sparsities: list[float], allocation: str | list[float]) -> None:
        """An N:M pattern prunes exactly its own sparsity from every layer: any other sparsity, or
        an allocation other than uniform, is a UserError naming the fix (the prune command's, the
        metric search's and the library's one check)."""
        fixed = self.fixed_sparsity
        if fixed is not None and (any(abs(s - fixed) > 1e-9 for s in sparsities) or allocation != "uniform"):
            raise UserError(f"{self.text} prunes exactly {fixed:g} of every layer: pass --sparsity {fixed:g} and "
                            "--allocation uniform, or use --pattern unstructured for other sparsities and allocations")


def parse_pattern(text: str) -> Pattern:
    text = text.strip().lower()
    if text in ("unstructured", "unstructured-row"):
        return Pattern("row")
    if text == "unstructured-layer":
        return Pattern("layer")
    match = _NM.match(text)
    if match and 0 < int(match[1]) < int(match[2]) <= 64:
        return Pattern("nm", int(match[1]), int(match[2]))
    raise UserError(f"--pattern {text!r} is not a sparsity pattern; use {PATTERN_HELP}")


def keep_mask(scores: torch.Tensor, sparsity: float, pattern: Pattern) -> torch.Tensor:
    """True where a weight survives: the lowest-scoring ones are pruned (ties: the earlier index)."""
    out, width = scores.shape
    keep = torch.ones_like(scores, dtype=torch.bool)
    if pattern.kind == "nm":
        if width % pattern.m:
            raise UserError(f"{pattern.text} needs input widths divisible by {pattern.m}; this layer has {width}")
        groups = scores.reshape(out, width // pattern.m, pattern.m)
        low = torch.topk(groups, pattern.m - pattern.n, dim=2, largest=False, sorted=False).indices
        return keep.reshape(groups.shape).scatter(2, low, False).reshape(out, width)
    if pattern.kind == "layer":
        k = round(sparsity * scores.numel())
        low = torch.topk(scores.flatten(), k, largest=False, sorted=False).indices
        return keep.flatten().scatter(0, low, False).reshape(out, width)
    k = round(sparsity * width)
    low = torch.topk(scores, k, dim=1, largest=False, sorted=False).indices
    return keep.scatter(1, low, False)


def layer_scores(model: nn.Module, stats: dict[str, torch.Tensor], metric: Metric,
                 gradients: dict[str, torch.Tensor] | None = None) -> Callable[[int], dict[str, torch.Tensor]]:
    """Layer ``i`` -> the metric's scores of each of its linears, keyed by the linear's path, all
    finite (else NonFiniteScores, before any mask or ranking is made of them). The metric's inputs:
    ``W``, its input's ``X_rms``, ``X_mean``, ``X_var``, and ``G`` when given."""
    layers = decoder_layers(model)

    def scores(i: int) -> dict[str, torch.Tensor]:
        found = {}
        for path, stat in LINEAR_INPUT.items():
            weight = layers[i].get_submodule(path).weight.detach()
            inputs = {"W": weight.float()} | {k: v.to(weight.device) for k, v in channel_stats(stats, i, stat).items()}
            if gradients is not None:
                inputs["G"] = gradients[f"{i}.{path}"].to(weight.device)
            found[path] = metric.finite_scores(inputs, f"layer {i} {path}")
        return found

    return scores


def linear_shapes(arch: Arch) -> dict[str, tuple[int, int]]:
    """(out, in) of each prunable linear of a decoder layer."""
    q, kv = arch.n_heads * arch.head_dim, arch.n_kv_heads * arch.head_dim
    return {"self_attn.q_proj": (q, arch.hidden), "self_attn.k_proj": (kv, arch.hidden),
            "self_attn.v_proj": (kv, arch.hidden), "self_attn.o_proj": (arch.hidden, q),
            "mlp.gate_proj": (arch.intermediate, arch.hidden), "mlp.up_proj": (arch.intermediate, arch.hidden),
            "mlp.down_proj": (arch.hidden, arch.intermediate)}


def zeros(arch: Arch, rates: list[float], pattern: Pattern) -> int:
    """How many weights :func:`sparsify` zeroes at ``rates``: known from the shapes alone."""
    total = 0
    for rate in rates:
        for out, width in linear_shapes(arch).values():
            if pattern.kind == "nm":
                total += out * width // pattern.m * (pattern.m - pattern.n)
            elif pattern.kind == "layer":
                total += round(rate * out * width)
            else:
                total += out * round(rate * width)
    return total


def weights(arch: Arch) -> int:
    """Weights of the prunable linears (what sparsity is counted on)."""
    return arch.n_layers * sum(out * width for out, width in linear_shapes(arch).values())


@dataclass(frozen=True)
class Sparsified:
    model: nn.Module
    realized: float  # zeros / weights of the prunable linears
    layer_sparsity: list[float]


def layer_masks(scores: dict[str, torch.Tensor], rate: float, pattern: Pattern) -> dict[str, torch.Tensor]:
    """Keep masks of one layer's linears from their scores (by path), at that layer's rate."""
    return {path: keep_mask(s, rate, pattern) for path, s in scores.items()}


def pruned_count(masks: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(zeros, weights) of one layer's keep masks."""
    return sum(int((~m).sum()) for m in masks.values()), sum(m.numel() for m in masks.values())


def sparsified(pruned: nn.Module, arch: Arch, counts: list[tuple[int, int]]) -> Sparsified:
    """The zeroed model with its realized sparsity, from each layer's :func:`pruned_count`."""
    pruned.config.selfprune_layers = [[arch.n_kv_heads, arch.intermediate]] * arch.n_layers  # every unit kept
    return Sparsified(pruned, sum(z for z, _ in counts) / sum(t for _, t in counts), [z / t for z, t in counts])


def sparsify(model: nn.Module, arch: Arch, scores: Callable[[int], dict[str, torch.Tensor]], rates: list[float],
             pattern: Pattern) -> Sparsified:
    """Zero the lowest-scoring weights of each layer's linears at that layer's rate."""
    pruned = shallow_copy(model)
    counts = []
    for i, layer in enumerate(decoder_layers(pruned)):
        masks = layer_masks(scores(i), rates[i], pattern)
        for path, keep in masks.items():
            linear = layer.get_submodule(path)
            linear.weight = nn.Parameter(linear.weight.detach() * keep.to(linear.weight.device), requires_grad=False)
        counts.append(pruned_count(masks))
    return sparsified(pruned, arch, counts)
