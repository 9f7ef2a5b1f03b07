"""Short labels of what an edit changed in a metric: the edge labels of the GCoT lineage graph.

The label is computed from the two canonical trees (counts of inputs, functions, operators and
constants), never by evaluating anything, so it is cheap and the same for every spelling of the
two metrics. It is a hint for a reader (human or LLM), not an exact diff: when nothing simple
describes the change it says "restructured".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from .canonical import render
from .language import INPUTS, Node, Num, Op, Var
from .metric import parse_metric

MAX_LABEL = 60
_OPERATORS = ("+", "-", "*", "/", "**")  # "neg" counts as a function: "+neg" reads better than an operator swap


def describe_edit(parent: str, child: str) -> str:
    """What changed from ``parent`` to ``child`` (both metric texts; MetricError if one is not), e.g.
    "+X_rms", "-sqrt", "swap * -> /", "constant changed"; several joined by ", ", at most ~60 chars."""
    before, after = _counts(parse_metric(parent).tree), _counts(parse_metric(child).tree)
    gone, new = _diff(before, after, "inputs", lambda x: INPUTS.index(x))
    labels = [f"{old} -> {young}" for old, young in zip(gone, new)]  # an input leaf replaced by another
    labels += [f"+{x}" for x in new[len(gone):]] + [f"-{x}" for x in gone[len(new):]]
    gone, new = _diff(before, after, "functions", str)  # "abs" -> "sqrt" reads "+sqrt, -abs"
    labels += [f"+{x}" for x in new] + [f"-{x}" for x in gone]
    gone, new = _diff(before, after, "operators", lambda x: (_OPERATORS.index(x.split()[0]), x))
    labels += [f"swap {old} -> {young}" for old, young in zip(gone, new)]
    labels += [f"added {x}" for x in new[len(gone):]] + [f"removed {x}" for x in gone[len(new):]]
    if before["constants"] != after["constants"]:
        labels.append("constant changed")
    if not labels:
        labels.append("unchanged" if parse_metric(parent).text == parse_metric(child).text else "restructured")
    return _cap(list(dict.fromkeys(labels)))


def _diff(before: dict[str, Counter[str]], after: dict[str, Counter[str]], kind: str,
          order: Callable[[str], Any]) -> tuple[list[str], list[str]]:
    """What ``kind`` lost and gained, as multisets, in a fixed order (never set order)."""
    return (sorted((before[kind] - after[kind]).elements(), key=order),
            sorted((after[kind] - before[kind]).elements(), key=order))


def _counts(root: Node) -> dict[str, Counter[str]]:
    """Inputs, functions, operators (an n-ary + or * counts n - 1 times) and constants of a tree."""
    counts: dict[str, Counter[str]] = {k: Counter() for k in ("inputs", "functions", "operators", "constants")}
    stack = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, Var):
            counts["inputs"][node.name] += 1
        elif isinstance(node, Num):
            counts["constants"][repr(node.value)] += 1
        elif isinstance(node, Op):
            if node.op == "**":  # the exponent is part of the operator: "added ** 0.5", "swap ** 2 -> ** 0.5"
                base, exponent = node.args
                assert isinstance(exponent, Num)
                counts["operators"][f"** {render(exponent)}"] += 1
                stack.append(base)
                continue
            if node.op in _OPERATORS:
                counts["operators"][node.op] += max(1, len(node.args) - 1)
            else:
                counts["functions"][node.op] += 1
            stack.extend(node.args)
    return counts


def _cap(labels: list[str]) -> str:
    """The labels joined by ", ", cut at a whole label (with "...") to stay within MAX_LABEL."""
    text = labels[0]
    for i, label in enumerate(labels[1:], 1):
        longer = f"{text}, {label}"
        if len(longer) + (5 if i < len(labels) - 1 else 0) > MAX_LABEL:  # room for ", ..." if more follow
            return f"{text}, ..."
        text = longer
    return text[:MAX_LABEL]
