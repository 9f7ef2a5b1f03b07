"""The guarded evaluator: a checked tree over float32 tensors, walked node by node (never eval/exec).

Guards (Pruner-Zero style, EPS = 1e-6) make every operation total, so a metric text cannot crash a
run: log(x) = log(|x| + EPS); sqrt(x) = sqrt(|x|); exp(x) = exp(min(x, 30)); a / b divides by b where
|b| >= EPS, else by EPS with b's sign (+EPS for 0 and NaN); x ** c keeps the sign for an integer c and
uses |x| otherwise, and a negative c is 1 / x ** |c| with the division guard; min-max scaling and
z-scores divide by max(range or std, EPS). Every value is a 2-D tensor that broadcasts to (out, in);
a row/col sum or norm reduces that broadcast matrix (so rowsum(2) is 2 * in).

Memory: no value is larger than one layer (out x in float32), and few are alive at once. An operation
writes its result into an operand this evaluation made (never into an input) when the shapes allow,
every operand is dropped as soon as it is used, a sum or product of any number of terms runs in one
accumulator (left to right, so the float32 rounding is the text's), and of the first two operands
the costlier is computed first (Sethi-Ullman order: the value does not depend on it). The evaluation
of a tree then holds at most :func:`live_tensors` tensors at once besides its inputs, each counted
as a whole layer although a reduced row or column, a scalar or a bool mask is smaller; ``parse_metric``
refuses a metric for which that exceeds ``MAX_LIVE`` (8), so an accepted metric's evaluation holds at
most 8 layer-sized tensors beside its inputs, whatever its length.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from .language import REDUCTIONS, ROW_INPUTS, MetricError, Node, Num, Var, shape

EPS = 1e-6
EXP_MAX = 30.0
Size = tuple[int, int]
Value = tuple[Tensor, bool]  # a tensor, and whether this evaluation made it (so it may be overwritten)
T = Tensor


def _apply(value: Value, fresh: Callable[..., Tensor], in_place: Callable[..., Tensor], *args, **kwargs) -> Tensor:
    """``fresh`` (a new tensor) or, when this evaluation made the tensor, ``in_place`` (no new one)."""
    x, owned = value
    return (in_place if owned else fresh)(x, *args, **kwargs)


def _divisor(value: Value) -> Tensor:
    """b where |b| >= EPS, else EPS with b's sign (+EPS for 0 and NaN); into b when it may be overwritten."""
    b, owned = value
    small = (b >= EPS).logical_or_(b <= -EPS).logical_not_()  # NaN compares false: small
    negative = (b < 0).logical_and_(small)
    return (b if owned else b.clone()).masked_fill_(small, EPS).masked_fill_(negative, -EPS)


def _binary(op: str, x: Value, y: Value) -> Tensor:
    """x op y, written into an operand this evaluation made if one has the result's shape."""
    if op == "/":
        y = (_divisor(y), True)
    (a, a_owned), (b, b_owned) = x, y
    size = torch.broadcast_shapes(a.shape, b.shape)
    out = a if a_owned and a.shape == size else b if b_owned and b.shape == size else None
    return BINARY[op](a, b, out=out)


def _pow(value: Value, c: float) -> Tensor:
    if not c.is_integer():
        value = (_apply(value, T.abs, T.abs_), True)
    power = _apply(value, T.pow, T.pow_, abs(c))
    if c >= 0:
        return power
    return _binary("/", (torch.ones((1, 1), dtype=power.dtype, device=power.device), True), (power, True))


def _sum(value: Value, dims: tuple[int, ...], size: Size) -> Tensor:
    x = value[0]
    return x.sum(dims, keepdim=True).mul_(math.prod(size[d] / x.shape[d] for d in dims))


def _norm(value: Value, dims: tuple[int, ...], size: Size) -> Tensor:
    x = value[0]
    return torch.linalg.vector_norm(x, dim=dims, keepdim=True).mul_(math.sqrt(math.prod(size[d] / x.shape[d] for d in dims)))


def _mean(value: Value, dims: tuple[int, ...], size: Size) -> Tensor:
    return value[0].mean(dims, keepdim=True)


def _minmax(value: Value, dims: tuple[int, ...], size: Size) -> Tensor:
    x = value[0]
    low = x.amin(dims, keepdim=True)
    span = x.amax(dims, keepdim=True).sub_(low).clamp_(min=EPS)
    return _apply(value, T.sub, T.sub_, low).div_(span)


def _zscore(value: Value, dims: tuple[int, ...], size: Size) -> Tensor:
    x = value[0]
    mean, std = x.mean(dims, keepdim=True), x.std(dims, correction=0, keepdim=True).clamp_(min=EPS)
    return _apply(value, T.sub, T.sub_, mean).div_(std)


UNARY: dict[str, Callable[[Value], Tensor]] = {
    "neg": lambda v: _apply(v, T.neg, T.neg_), "abs": lambda v: _apply(v, T.abs, T.abs_),
    "sqrt": lambda v: _apply(v, T.abs, T.abs_).sqrt_(), "log": lambda v: _apply(v, T.abs, T.abs_).add_(EPS).log_(),
    "exp": lambda v: _apply(v, T.clamp, T.clamp_, max=EXP_MAX).exp_(),
    "tanh": lambda v: _apply(v, T.tanh, T.tanh_), "sigmoid": lambda v: _apply(v, T.sigmoid, T.sigmoid_),
}
BINARY: dict[str, Callable[..., Tensor]] = {"+": torch.add, "-": torch.sub, "*": torch.mul, "/": torch.div,
                                            "min": torch.minimum, "max": torch.maximum}  # + and * take any number of args
_KINDS = {"sum": _sum, "mean": _mean, "norm": _norm, "minmax": _minmax, "zscore": _zscore}
_AXES = {"row": (1,), "col": (0,), "": (0, 1)}  # "row" reduces along a row (over the inputs)
# The operations along axes (reductions and normalisations): name -> (function, dims).
AXIS_OPS = {axis + kind: (fn, dims) for axis, dims in _AXES.items() for kind, fn in _KINDS.items()
            if axis + kind in REDUCTIONS or kind in ("minmax", "zscore")}
_NORMALISATIONS = {name for name in AXIS_OPS if name.endswith(("minmax", "zscore"))}


def evaluate(node: Node, env: Mapping[str, Tensor], size: Size, device: torch.device | str = "cpu") -> Tensor:
    """The value of ``node``; ``env`` holds 2-D float32 inputs (never written), ``size`` is the layer's (out, in)."""
    costs: dict[int, int] = {}
    _cost(node, costs)
    return _value(node, env, size, device, costs)[0]


def _value(node: Node, env: Mapping[str, Tensor], size: Size, device: torch.device | str, costs: dict[int, int]) -> Value:
    if isinstance(node, Num):
        return torch.full((1, 1), node.value, dtype=torch.float32, device=device), True
    if isinstance(node, Var):
        return env[node.name], False
    if node.op == "**":
        base, exponent = node.args
        assert isinstance(exponent, Num)
        return _pow(_value(base, env, size, device, costs), exponent.value), True
    if node.op in UNARY:
        return UNARY[node.op](_value(node.args[0], env, size, device, costs)), True
    if node.op in AXIS_OPS:
        fn, dims = AXIS_OPS[node.op]
        return fn(_value(node.args[0], env, size, device, costs), dims, size), True
    a, b = node.args[:2]
    if costs[id(b)] > costs[id(a)]:  # the costlier first: the other is computed while only its result is held
        y = _value(b, env, size, device, costs)
        x = _value(a, env, size, device, costs)
    else:
        x = _value(a, env, size, device, costs)
        y = _value(b, env, size, device, costs)
    total = _binary(node.op, x, y)
    del x, y  # dropped before the next term is computed
    for arg in node.args[2:]:
        total = _binary(node.op, (total, True), _value(arg, env, size, device, costs))
    return total, True


def live_tensors(node: Node) -> int:
    """The most tensors an evaluation of ``node`` holds at once (its inputs not counted, its result
    and each scalar, reduced vector or bool mask counted as a whole layer): the count of the schedule
    of :func:`_value`, so the measured peak never exceeds it times one layer."""
    return _cost(node, {})


def _cost(node: Node, costs: dict[int, int]) -> int:
    """:func:`live_tensors` of ``node``, recorded with each subtree's (by id) in ``costs``."""
    if isinstance(node, Num | Var):
        peak = int(isinstance(node, Num))
    elif node.op == "**":
        exponent = node.args[1]
        assert isinstance(exponent, Num)
        peak = max(_cost(node.args[0], costs), 4 if exponent.value < 0 else 1)  # 1 / x ** c: the power, 1 and two masks
    elif node.op in UNARY:
        peak = max(_cost(node.args[0], costs), 1)
    elif node.op in AXIS_OPS:
        arg = node.args[0]
        peak = max(_cost(arg, costs), 3 if node.op in _NORMALISATIONS else _made(arg) + 1)  # the value and two statistics
    else:
        peak = _fold_cost(node, [_cost(a, costs) for a in node.args])
    costs[id(node)] = peak
    return peak


def _made(node: Node) -> int:
    """1 if evaluating ``node`` makes a tensor, 0 for an input."""
    return int(not isinstance(node, Var))


def _fold_cost(node: Node, costs: list[int]) -> int:
    """A binary operation, or a sum or product folded left to right into one accumulator."""
    a, b = node.args[:2]
    first, second = ((b, costs[1]), (a, costs[0])) if costs[1] > costs[0] else ((a, costs[0]), (b, costs[1]))
    peak = max(first[1], _made(first[0]) + second[1], _step_cost(node.op, (shape(a), _made(a)), (shape(b), _made(b))))
    total = _union(shape(a), shape(b))
    for arg, cost in zip(node.args[2:], costs[2:]):
        peak = max(peak, 1 + cost, _step_cost(node.op, (total, 1), (shape(arg), _made(arg))))
        total = _union(total, shape(arg))
    return peak


def _step_cost(op: str, x: tuple[tuple[bool, bool], int], y: tuple[tuple[bool, bool], int]) -> int:
    """Tensors alive during one x op y (operands (symbolic shape, made)): both operands, and a new
    result unless an operand made here has its shape; a divisor is guarded in a copy, with two masks."""
    if op == "/":
        return x[1] + 3
    reused = any(made and s == _union(x[0], y[0]) for s, made in (x, y))
    return x[1] + y[1] + (not reused)


def _union(a: tuple[bool, bool], b: tuple[bool, bool]) -> tuple[bool, bool]:
    return (a[0] or b[0], a[1] or b[1])


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
