"""What a structured candidate keeps: per layer, its KV groups and MLP channels, rounded from rates.

A rate ``p_i`` is the fraction of decoder layer ``i``'s prunable parameters to remove
(:attr:`Arch.layer_params`); a structure is what survives of each layer once that rate is rounded
to whole units. The realized overall ratio is removed / total over all layers; embeddings, norms
and the LM head are not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..core.errors import UserError
from ..model.arch import Arch


@dataclass(frozen=True)
class LayerKeep:
    """How many units of one layer survive: KV groups and MLP channels."""

    groups: int
    channels: int


# The effective structure of a candidate: what survives in each layer. Two rate vectors that
# round to the same structure are the same candidate (and share one cache entry).
Structure = tuple[LayerKeep, ...]


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


@dataclass(frozen=True)
class Alignment:
    """Kept query heads and MLP channels in multiples that kernels like (a layer may also keep all
    or none); 1 and 1 is exact rounding. Heads go with their KV group, so ``heads`` above 1 must be
    a multiple of the model's query heads per KV group."""

    heads: int = 1
    channels: int = 1

    def check(self, arch: Arch) -> Alignment:
        if self.heads < 1 or self.channels < 1:
            raise UserError("--align and --align-heads must be at least 1 (1: no alignment)")
        if self.heads > 1 and self.heads % arch.group_size:
            raise UserError(f"this model keeps query heads in KV groups of {arch.group_size}: give --align-heads a "
                            f"multiple of {arch.group_size}")
        if self.heads > arch.n_kv_heads * arch.group_size or self.channels > arch.intermediate:
            raise UserError(f"--align-heads {self.heads} / --align {self.channels} exceed the layer's "
                            f"{arch.n_kv_heads * arch.group_size} heads / {arch.intermediate} MLP channels")
        return self


EXACT = Alignment()


def _level(ideal: float, total: int, step: int) -> int:
    """The allowed kept count (a multiple of ``step``, or ``total``) nearest ``ideal``; ties keep fewer."""
    ideal = min(max(ideal, 0.0), float(total))
    low = int(ideal // step) * step
    return min({low, min(low + step, total), total}, key=lambda k: (abs(k - ideal), k))


def layer_keep(arch: Arch, rate: float, align: Alignment = EXACT) -> LayerKeep:
    """Round one layer's rate to units.

    Attention first: ``round(rate * n_kv_heads)`` whole KV groups go. The MLP then removes the
    number of channels that brings the layer's removed parameters closest to ``rate *
    layer_params`` (clamped to the MLP's size), so the coarse attention step is compensated and
    the realized per-layer fraction is within one channel of the target unless clamped.
    ``rate = 1`` removes both sub-layers entirely. With an alignment each count is the nearest
    allowed one instead.
    """
    n, width = arch.n_kv_heads, arch.intermediate
    group_step = max(1, align.heads // arch.group_size)
    if group_step == 1:
        g_removed = min(n, _round_half_up(rate * n))
    else:
        g_removed = n - _level(n - rate * n, n, group_step)
    target = (rate * arch.layer_params - g_removed * arch.group_params) / arch.channel_params
    if align.channels == 1:
        c_removed = min(width, max(0, _round_half_up(target)))
    else:
        c_removed = width - _level(width - target, width, align.channels)
    return LayerKeep(groups=n - g_removed, channels=width - c_removed)


def _channel_step(kept: int, total: int, step: int, down: bool) -> int | None:
    """The next allowed MLP width below (``down``) or above ``kept``; None at the end."""
    if down:
        return None if kept == 0 else (kept - 1) // step * step
    return None if kept == total else min(kept // step * step + step, total)


def _rebalanced(arch: Arch, rates: list[float], keeps: list[LayerKeep], step: int) -> Structure:
    """Aligned widths whose total removal is as close to the rates' total as whole steps allow.

    Rounding each layer to a multiple of ``step`` channels drifts the overall ratio; each move
    shifts one layer by one allowed width, taken from the layer furthest from its own rate in the
    needed direction, while a move still brings the total closer.
    """
    def removed(k: LayerKeep) -> float:
        return arch.layer_params - k.groups * arch.group_params - k.channels * arch.channel_params

    want = [r * arch.layer_params for r in rates]
    while True:
        gap = sum(want) - sum(map(removed, keeps))  # > 0: too little removed
        moves = []
        for i, k in enumerate(keeps):
            c = _channel_step(k.channels, arch.intermediate, step, down=gap > 0)
            if c is not None:
                moves.append(((want[i] - removed(k)) * (1 if gap > 0 else -1), -i, i, c))
        if not moves:
            break
        _, _, i, c = max(moves)
        delta = (keeps[i].channels - c) * arch.channel_params
        if abs(gap - delta) >= abs(gap):
            break
        keeps[i] = LayerKeep(keeps[i].groups, c)
    return tuple(keeps)


def rates_to_structure(arch: Arch, rates: list[float], align: Alignment = EXACT) -> Structure:
    keeps = [layer_keep(arch, r, align) for r in rates]
    return tuple(keeps) if align.channels == 1 else _rebalanced(arch, rates, keeps, align.channels)


def dense_structure(arch: Arch) -> Structure:
    """The structure that keeps every KV group and MLP channel: the dense model, as a candidate."""
    return tuple(LayerKeep(arch.n_kv_heads, arch.intermediate) for _ in range(arch.n_layers))


def kept_params(arch: Arch, structure: Structure) -> int:
    return sum(k.groups * arch.group_params + k.channels * arch.channel_params for k in structure)


def realized_ratio(arch: Arch, structure: Structure) -> float:
    """Fraction of all decoder-layer prunable parameters removed."""
    return 1.0 - kept_params(arch, structure) / (arch.layer_params * arch.n_layers)


def structure_to_json(structure: Structure) -> list[list[int]]:
    return [[k.groups, k.channels] for k in structure]


def structure_from_json(data: list[list[int]]) -> Structure:
    return tuple(LayerKeep(int(g), int(c)) for g, c in data)
