"""The updates, one linear at a time: SparseGPT's OBS update and the least-squares refit of a
consumer's kept columns (pure tensor math; the layer-by-layer pass is :mod:`.layerwise`)."""

from __future__ import annotations

import torch

from ..methods.sparsity import Pattern

BLOCK = 128  # SparseGPT's lazy-update block of columns
DAMP = 0.01  # dampening: this fraction of H's mean diagonal is added to its diagonal


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
