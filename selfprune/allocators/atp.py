"""ATP: sparsity rising linearly with depth (Huang et al., "Determining Layer-wise Sparsity for
Large Language Models Through a Theoretical Perspective", ICML 2025; wzhuang-xmu/ATP).

Errors made in early layers are amplified by every later one ("reconstruction error
explosion"), so early layers are pruned less. The rule (ATP's ``main.py``, the arithmetic
progression built before ``prune_wanda`` / ``prune_sparsegpt``): layer ``i`` of ``L`` gets

    p_i = beta - step * (L - 1) / 2 + i * step,        i = 0 .. L - 1,

whose mean is beta; ``step`` is legal while every rate stays in [0, 1]:
``step <= min(2 * beta, 2 * (1 - beta)) / (L - 1)``. ATP's code grid-searches ``step`` in 0.002
increments on perplexity; here the grid is :data:`GRID` points, ``0, 1/GRID, ..., (GRID-1)/GRID``
of the largest legal step (the largest itself would put the first or last layer at exactly 0 or
1), scored by ``fitness``: perplexity on the fitness split, never the test split. Step 0 is the
uniform allocation, so ATP is never worse than uniform on the fitness windows.
"""

from __future__ import annotations

import torch

from ..core.errors import UserError
from ..model.arch import Arch
from . import ALLOCATIONS, Fitness

GRID = 5  # perplexity passes per allocation: the demo stays cheap


def progression(n_layers: int, beta: float, step: float) -> list[float]:
    """ATP's rates: mean ``beta``, rising by ``step`` from one layer to the next."""
    first = beta - step * (n_layers - 1) / 2
    return [first + i * step for i in range(n_layers)]


def max_step(n_layers: int, beta: float) -> float:
    """The largest step that keeps the first rate >= 0 and the last <= 1 (0 for one layer)."""
    return min(2 * beta, 2 * (1 - beta)) / (n_layers - 1) if n_layers > 1 else 0.0


def steps(n_layers: int, beta: float, points: int = GRID) -> list[float]:
    """The grid: ``points`` steps from 0 (uniform) up to, not including, the largest legal one."""
    top = max_step(n_layers, beta)
    return [top * k / points for k in range(points)]


@ALLOCATIONS.register("atp", order=3)
def atp(model: torch.nn.Module, arch: Arch, stats: dict[str, torch.Tensor], ratio: float,
        fitness: Fitness | None = None) -> list[float]:
    """The progression of lowest ``fitness`` over :func:`steps` (a tie goes to the smaller step).

    Without ``fitness`` there is nothing to choose the step by, and ATP's paper gives no default
    step, so it refuses; :meth:`Workbench.allocate` always supplies one.
    """
    if fitness is None:
        raise UserError("the atp allocation chooses its slope by perplexity on the fitness split; "
                        "allocate through Workbench.allocate (selfprune prune / report), which measures it")
    return min((progression(arch.n_layers, ratio, s) for s in steps(arch.n_layers, ratio)), key=fitness)
