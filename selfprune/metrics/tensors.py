"""The guarded evaluator: a checked tree over float32 tensors, walked node by node (never eval/exec).

Guards (Pruner-Zero style, EPS = 1e-6) make every operation total, so a metric text cannot crash a
run: log(x) = log(|x| + EPS); sqrt(x) = sqrt(|x|); exp(x) = exp(min(x, 30)); a / b divides by b where
|b| >= EPS, else by EPS with b's sign (+EPS for 0 and NaN); x ** c keeps the sign for an integer c and
uses |x| otherwise, and a negative c is 1 / x ** |c| with the division guard; min-max scaling and
z-scores divide by max(range or std, EPS). Every value is a 2-D tensor that broadcasts to (out, in);
a row/col sum or norm reduces that broadcast matrix (so rowsum(2) is 2 * in).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import reduce

import torch
from torch import Tensor

from .language import REDUCTIONS, ROW_INPUTS, MetricError, Node, Num, Var

EPS = 1e-6
EXP_MAX = 30.0
Size = tuple[int, int]


def _div(a: Tensor, b: Tensor) -> Tensor:
    return a / torch.where(b.abs() >= EPS, b, torch.where(b < 0, -EPS, EPS))


def _pow(x: Tensor, c: float) -> Tensor:
    base = x if c.is_integer() else x.abs()
    return base.pow(c) if c >= 0 else _div(torch.ones_like(x), base.pow(-c))


def _sum(x: Tensor, dims: tuple[int, ...], size: Size) -> Tensor:
    return x.sum(dims, keepdim=True) * math.prod(size[d] / x.shape[d] for d in dims)


def _norm(x: Tensor, dims: tuple[int, ...], size: Size) -> Tensor:
    return torch.linalg.vector_norm(x, dim=dims, keepdim=True) * math.sqrt(math.prod(size[d] / x.shape[d] for d in dims))


def _mean(x: Tensor, dims: tuple[int, ...], size: Size) -> Tensor:
    return x.mean(dims, keepdim=True)


def _minmax(x: Tensor, dims: tuple[int, ...], size: Size) -> Tensor:
    low = x.amin(dims, keepdim=True)
    return (x - low) / (x.amax(dims, keepdim=True) - low).clamp(min=EPS)


def _zscore(x: Tensor, dims: tuple[int, ...], size: Size) -> Tensor:
    return (x - x.mean(dims, keepdim=True)) / x.std(dims, correction=0, keepdim=True).clamp(min=EPS)


ELEMENTWISE: dict[str, Callable[..., Tensor]] = {
    "neg": torch.neg, "+": lambda *xs: reduce(torch.add, xs), "-": torch.sub,
    "*": lambda *xs: reduce(torch.mul, xs), "/": _div, "abs": torch.abs,
    "sqrt": lambda x: x.abs().sqrt(), "log": lambda x: (x.abs() + EPS).log(), "exp": lambda x: x.clamp(max=EXP_MAX).exp(),
    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "min": torch.minimum, "max": torch.maximum,
}
_KINDS = {"sum": _sum, "mean": _mean, "norm": _norm, "minmax": _minmax, "zscore": _zscore}
_AXES = {"row": (1,), "col": (0,), "": (0, 1)}  # "row" reduces along a row (over the inputs)
# The operations along axes (reductions and normalisations): name -> (function, dims).
AXIS_OPS = {axis + kind: (fn, dims) for axis, dims in _AXES.items() for kind, fn in _KINDS.items()
            if axis + kind in REDUCTIONS or kind in ("minmax", "zscore")}


def evaluate(node: Node, env: Mapping[str, Tensor], size: Size, device: torch.device | str = "cpu") -> Tensor:
    """The value of ``node``; ``env`` holds 2-D float32 inputs, ``size`` is the layer's (out, in)."""
    if isinstance(node, Num):
        return torch.full((1, 1), node.value, dtype=torch.float32, device=device)
    if isinstance(node, Var):
        return env[node.name]
    if node.op == "**":
        base, exponent = node.args
        assert isinstance(exponent, Num)
        return _pow(evaluate(base, env, size, device), exponent.value)
    args = [evaluate(a, env, size, device) for a in node.args]
    if node.op in ELEMENTWISE:
        return ELEMENTWISE[node.op](*args)
    fn, dims = AXIS_OPS[node.op]
    return fn(args[0], dims, size)


def bind(needed: frozenset[str], inputs: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], Size]:
    """The inputs as detached 2-D float32 tensors, checked against W's shape: (env, (out, in))."""
    missing = sorted((needed | {"W"}) - set(inputs))
    if missing:
        raise MetricError(f"the metric needs the inputs {', '.join(sorted(needed | {'W'}))}; missing: {', '.join(missing)}")
    weight = inputs["W"]
    if weight.dim() != 2:
        raise MetricError(f"W must be a 2-D (out, in) weight; got shape {tuple(weight.shape)}")
    size: Size = (weight.shape[0], weight.shape[1])
    env = {}
    for name in needed | {"W"}:
        value = inputs[name].detach().float()
        row = name in ROW_INPUTS
        if (value.numel() != size[1]) if row else (tuple(value.shape) != size):
            want = (size[1],) if row else size
            raise MetricError(f"input {name} has shape {tuple(value.shape)}; for this {size[0]}x{size[1]} layer it must be {want}")
        env[name] = value.reshape(1, size[1]) if row else value
    return env, size


def probe_inputs(out: int = 8, in_: int = 16, seed: int = 0) -> dict[str, Tensor]:
    """A small seeded random layer with positive RMS and variance, to test a metric before use."""
    gen = torch.Generator().manual_seed(seed)
    rms = torch.rand(in_, generator=gen) + 0.1
    mean = rms * (torch.rand(in_, generator=gen) * 1.8 - 0.9)  # |mean| < rms, so the variance is positive
    return {"W": torch.randn(out, in_, generator=gen), "X_rms": rms, "X_mean": mean, "X_var": rms**2 - mean**2,
            "G": torch.randn(out, in_, generator=gen) * 1e-2}
