"""Canonical form: equivalent spellings of one metric get one text, hence one key (a cache key).

Only rewrites that are exact under the guarded semantics (see ``tensors``) are made, so a metric's
scores do not depend on how it was spelled, up to float32 rounding from reordering sums and products:
+ and * are flattened and their operands sorted by text, as are min's and max's; constant
subexpressions are folded in float32 with the guards (kept unfolded if the result is not finite or
exceeds the constant bound, so the text always re-parses); identities go (x * 1, x + 0, x - 0, x / 1,
x ** 1, -(-x), min(x, x)); abs of a provably non-negative value is that value; sqrt(x ** 2) is abs(x)
(exact in IEEE float32 barring over/underflow of the square).
"""

from __future__ import annotations

import hashlib
import math

from .language import MAX_CONSTANT, Node, Num, Op, Var, f32
from .tensors import AXIS_OPS, evaluate

_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2, "neg": 3, "**": 4}
_NONNEGATIVE = {"abs", "sqrt", "exp", "sigmoid", "minmax", "rowminmax", "colminmax", "rownorm", "colnorm"}


def canonical(node: Node) -> Node:
    """The canonical tree of a checked tree."""
    return _make(node.op, tuple(canonical(a) for a in node.args)) if isinstance(node, Op) else node


def render(node: Node) -> str:
    """Text in the metric language that parses back to ``node`` (after canonicalisation)."""
    return _render(node)[0]


def key(text: str) -> str:
    """The identity of a canonical text: 16 hex digits of its sha256."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _make(op: str, args: tuple[Node, ...]) -> Node:
    """The canonical node for ``op`` over canonical ``args``."""
    if op in ("+", "*"):
        return _associative(op, args)
    if op in ("min", "max"):
        args = tuple(sorted(args, key=render))
        if args[0] == args[1]:
            return args[0]
    if op not in AXIS_OPS and all(isinstance(a, Num) for a in args):
        return _fold(op, args)
    head = args[0]
    identity = {"**": 1.0, "/": 1.0, "-": 0.0}.get(op)
    if identity is not None and args[1] == Num(identity):
        return head
    if isinstance(head, Op):
        if op == "neg" and head.op == "neg":
            return head.args[0]
        if op == "sqrt" and head.op == "**" and head.args[1] == Num(2.0):
            return _make("abs", head.args[:1])
        if op == "abs" and _nonnegative(head):
            return head
    return Op(op, args)


def _associative(op: str, args: tuple[Node, ...]) -> Node:
    """Flatten nested + (or *), fold its constants into one, drop the identity, sort by text."""
    flat = [x for a in args for x in (a.args if isinstance(a, Op) and a.op == op else (a,))]
    numbers = tuple(a for a in flat if isinstance(a, Num))
    terms = [a for a in flat if not isinstance(a, Num)]
    if len(numbers) > 1 and isinstance(folded := _fold(op, numbers), Num):
        numbers = (folded,)
    identity = 0.0 if op == "+" else 1.0
    operands = sorted(terms + [n for n in numbers if n.value != identity], key=render)
    if len(operands) < 2:
        return operands[0] if operands else Num(identity)
    return Op(op, tuple(operands))


def _fold(op: str, args: tuple[Node, ...]) -> Node:
    value = float(evaluate(Op(op, args), {}, (1, 1)))
    return Num(value) if math.isfinite(value) and abs(value) <= MAX_CONSTANT else Op(op, args)


def _nonnegative(node: Node) -> bool:
    """Whether ``node`` is never negative, so abs of it is itself. x ** c can be negative only for an
    odd integer c and a base that can be (a fractional c raises |x|)."""
    if isinstance(node, Num):
        return node.value >= 0
    if isinstance(node, Var):
        return False
    if node.op == "**":
        c = node.args[1]
        assert isinstance(c, Num)
        return not (c.value.is_integer() and c.value % 2) or _nonnegative(node.args[0])
    return node.op in _NONNEGATIVE


def _number_text(value: float) -> str:
    """The shortest text that reads back as the same float32 (so "0.1" stays "0.1")."""
    return next(t for d in range(1, 10) if f32(float(t := f"{value:.{d}g}")) == value)


def _render(node: Node) -> tuple[str, int]:
    """(text, precedence); an operand is parenthesised when it binds more loosely than its place."""
    if isinstance(node, Num):
        text = _number_text(node.value)
        return text, 3 if text.startswith("-") else 5
    if isinstance(node, Var):
        return node.name, 5
    if node.op not in _PRECEDENCE:
        return f"{node.op}({', '.join(render(a) for a in node.args)})", 5
    prec = _PRECEDENCE[node.op]
    if node.op == "neg":
        return "-" + _wrap(node.args[0], prec), prec
    if node.op == "**":
        return f"{_wrap(node.args[0], 5)} ** {render(node.args[1])}", prec
    rest = (_wrap(a, prec + 1) for a in node.args[1:])  # left-associative: a later operand of equal precedence needs ()
    return f" {node.op} ".join([_wrap(node.args[0], prec), *rest]), prec


def _wrap(node: Node, min_precedence: int) -> str:
    text, prec = _render(node)
    return text if prec >= min_precedence else f"({text})"
