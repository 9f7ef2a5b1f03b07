"""The metric language: untrusted text -> a small checked tree, or a MetricError saying why not.

The text may come from an LLM, so nothing in it is ever executed: it is parsed with ``ast`` and every
node is checked against an allow-list before it becomes one of the three node types below. Only
elementwise operations and keep-dim reductions exist, so no value is ever larger than one layer
(out x in); ``MAX_LIVE`` caps how many the evaluation holds at once (see ``tensors``). The limits
hold for the canonical text too, the one that is stored and read back (``metric.parse_metric``).
"""

from __future__ import annotations

import ast
import re
import struct
from dataclasses import dataclass

from ..core.errors import UserError

INPUTS = ("W", "X_rms", "X_mean", "X_var", "G")
ROW_INPUTS = {"X_rms", "X_mean", "X_var"}  # per input channel: a row vector (1, in)
REDUCTIONS = {"rowsum": 1, "rowmean": 1, "rownorm": 1, "colsum": 0, "colmean": 0, "colnorm": 0}  # -> reduced dim
FUNCTIONS = {"abs": 1, "sqrt": 1, "log": 1, "exp": 1, "tanh": 1, "sigmoid": 1, "min": 2, "max": 2,
             "minmax": 1, "rowminmax": 1, "colminmax": 1, "zscore": 1, "rowzscore": 1, "colzscore": 1,
             **dict.fromkeys(REDUCTIONS, 1)}  # name -> number of arguments
MAX_CHARS, MAX_NODES, MAX_DEPTH = 2000, 200, 32
MAX_LIVE = 8  # layer-sized tensors an evaluation may hold at once (tensors.live_tensors)
MAX_CONSTANT, MAX_EXPONENT = 1e6, 4
EXAMPLE = "abs(W) * X_rms"
_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_REFUSED = {ast.Attribute: "attribute access", ast.Subscript: "indexing", ast.Slice: "slicing",
            ast.Lambda: "a lambda", ast.ListComp: "a comprehension", ast.SetComp: "a comprehension",
            ast.DictComp: "a comprehension", ast.GeneratorExp: "a generator expression",
            ast.IfExp: "a conditional expression", ast.Compare: "a comparison", ast.BoolOp: "a boolean operator",
            ast.Starred: "a starred argument", ast.JoinedStr: "an f-string", ast.NamedExpr: "an assignment expression",
            ast.List: "a list", ast.Tuple: "a tuple", ast.Set: "a set", ast.Dict: "a dict",
            ast.Await: "await", ast.Yield: "yield", ast.YieldFrom: "yield"}


class MetricError(UserError):
    """A metric text that is refused: the message names the construct or limit, and the fix."""


@dataclass(frozen=True)
class Num:
    value: float


@dataclass(frozen=True)
class Var:
    name: str


@dataclass(frozen=True)
class Op:
    """``op`` is "neg", "+", "-", "*", "/", "**" (args: base, Num exponent) or a function name.
    The parser gives binary + and *; the canonical form flattens them to any number of args."""

    op: str
    args: tuple[Node, ...]


Node = Num | Var | Op
Shape = tuple[bool, bool]  # (varies over output rows, varies over input columns); (True, True) is W's shape


def parse(text: str) -> Node:
    """The checked tree of ``text``, not yet canonical; raises MetricError for anything refused."""
    if len(text) > MAX_CHARS:
        raise MetricError(f"metric text is {len(text)} characters; the limit is {MAX_CHARS}. Give one short expression, e.g. {EXAMPLE}")
    source = _unwrap(text)
    try:
        module = ast.parse(source, mode="exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise MetricError(f"no expression found in the metric text ({type(e).__name__}: {e}); "
                          f"give one expression over {', '.join(INPUTS)}, e.g. {EXAMPLE}") from None
    if len(module.body) != 1:
        raise MetricError(f"the metric text has {len(module.body)} statements; give exactly one expression, e.g. {EXAMPLE}")
    stmt = module.body[0]
    if isinstance(stmt, ast.Expr):
        expr = stmt.value
    elif isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
        expr = stmt.value  # "score = <expr>": only the value is checked, nothing is assigned
    else:
        line = short(source.splitlines()[stmt.lineno - 1].strip())  # not unparse: the statement's depth is unchecked
        raise MetricError(f"a statement ({type(stmt).__name__}: `{line}`) is not allowed; give one expression, e.g. {EXAMPLE}")
    exprs = [n for n in ast.walk(expr) if isinstance(n, ast.expr)]
    if len(exprs) > MAX_NODES:
        raise MetricError(f"the metric has {len(exprs)} nodes; the limit is {MAX_NODES}. Simplify it.")
    if (depth := _depth(expr)) > MAX_DEPTH:
        raise MetricError(f"the metric is nested {depth} deep; the limit is {MAX_DEPTH}. Simplify it.")
    return _convert(expr)


def shape(node: Node) -> Shape:
    """The symbolic shape of ``node``: scalar, row (1, in), col (out, 1) or full (out, in)."""
    if isinstance(node, Num):
        return (False, False)
    if isinstance(node, Var):
        return (False, True) if node.name in ROW_INPUTS else (True, True)
    if node.op == "**":
        return shape(node.args[0])
    shapes = [shape(a) for a in node.args]
    out, in_ = any(s[0] for s in shapes), any(s[1] for s in shapes)
    if node.op in REDUCTIONS:
        return (out, False) if REDUCTIONS[node.op] == 1 else (False, in_)
    return (out, in_)


def check_full(node: Node, text: str) -> None:
    """A metric must rank every weight, so its value must have W's shape."""
    per = {(False, False): "one for the whole layer", (False, True): "one per input channel",
           (True, False): "one per output channel"}.get(shape(node))
    if per:
        raise MetricError(f"the metric must give one score per weight; `{text}` gives {per}, "
                          "multiply by something of W's shape, e.g. abs(W)")


def f32(value: float) -> float:
    """``value`` rounded to float32, the precision it is evaluated in: "0.1" and a folded 0.1 are one number."""
    return struct.unpack("f", struct.pack("f", value))[0]


def _unwrap(text: str) -> str:
    """Strip whitespace and one pair of ``` fences (with an optional language tag) or backticks."""
    text = text.strip()
    match = re.fullmatch(r"```(?:[\w+-]*\n)?(.*?)```", text, re.DOTALL) or re.fullmatch(r"`(.*)`", text, re.DOTALL)
    return match.group(1).strip() if match else text


def _depth(root: ast.expr) -> int:
    """Expressions on the deepest path, also through keywords and comprehensions. Iterative, so a
    pathological text cannot exhaust the stack before it is refused; what passes is shallow enough
    for the recursive conversion and ``ast.unparse``."""
    deepest, stack = 0, [(root, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((c, depth + isinstance(c, ast.expr)) for c in ast.iter_child_nodes(node))
    return deepest


def _snippet(node: ast.expr) -> str:
    """Only for nodes within the checked depth: ``ast.unparse`` recurses."""
    return short(ast.unparse(node).splitlines()[0])


def short(text: str) -> str:
    """At most 60 characters of ``text``, for a message."""
    return text if len(text) <= 60 else text[:57] + "..."


def _number(node: ast.expr) -> int | float | None:
    """The value of a numeric literal, optionally signed; None for anything else."""
    sign = 1
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        sign, node = (-1 if isinstance(node.op, ast.USub) else 1), node.operand
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return sign * node.value
    return None


def _convert(node: ast.expr) -> Node:
    if isinstance(node, ast.Constant):
        if type(node.value) not in (int, float):
            raise MetricError(f"the constant `{_snippet(node)}` is not allowed; only numbers are")
        if not abs(node.value) <= MAX_CONSTANT:
            raise MetricError(f"the number `{_snippet(node)}` is too large; numbers must have |c| <= {MAX_CONSTANT:g}")
        return Num(f32(node.value))
    if isinstance(node, ast.Name):
        if node.id not in INPUTS or not isinstance(node.ctx, ast.Load):
            raise MetricError(f"name `{node.id}` is not an input; inputs: {', '.join(INPUTS)}")
        return Var(node.id)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _convert(node.operand)
        return Op("neg", (operand,)) if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        exponent = _number(node.right)
        if exponent is None or abs(exponent) > MAX_EXPONENT:
            raise MetricError(f"the exponent in `{_snippet(node)}` must be a number constant with |c| <= {MAX_EXPONENT}")
        return Op("**", (_convert(node.left), Num(f32(exponent))))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return Op(_BINOPS[type(node.op)], (_convert(node.left), _convert(node.right)))
    if isinstance(node, ast.BinOp | ast.UnaryOp):
        raise MetricError(f"the operator in `{_snippet(node)}` is not allowed; operators: + - * / ** and unary -")
    if isinstance(node, ast.Call):
        return _call(node)
    what = _REFUSED.get(type(node), f"a {type(node).__name__} expression")
    raise MetricError(f"{what} (`{_snippet(node)}`) is not allowed in a metric; use the inputs {', '.join(INPUTS)}, "
                      f"numbers, + - * / ** and the functions {', '.join(FUNCTIONS)}")


def _call(node: ast.Call) -> Node:
    if not isinstance(node.func, ast.Name):
        _convert(node.func)  # names the refused construct being called (attribute, subscript...), if any
        raise MetricError(f"calling `{_snippet(node.func)}` is not allowed; call functions by bare name: {', '.join(FUNCTIONS)}")
    name = node.func.id
    if name not in FUNCTIONS:
        raise MetricError(f"call to `{name}` is not allowed; allowed functions: {', '.join(FUNCTIONS)}")
    if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
        raise MetricError(f"`{_snippet(node)}`: keyword and starred arguments are not allowed; pass {name}'s arguments by position")
    if len(node.args) != FUNCTIONS[name]:
        raise MetricError(f"`{name}` takes {FUNCTIONS[name]} argument(s), `{_snippet(node)}` gives {len(node.args)}")
    return Op(name, tuple(_convert(a) for a in node.args))
