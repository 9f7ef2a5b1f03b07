"""Turning an oracle's untrusted reply into valid rate vectors.

A model may answer with the JSON we asked for, with JSON inside a Markdown fence, or with the
paper's bracketed lists mixed into prose; it may also get the length, the range or the mean wrong.
Parsing never raises: whatever cannot be read is simply not a candidate. Its work is bounded: JSON
nested past Python's recursion limit is not JSON to it, nested values are walked with a stack of
their own, and the search stops once ``limit`` vectors are found.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from itertools import islice
from typing import Any

from ..allocators.rates import project_to_mean

MEAN_EPS = 1e-6

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)
_INNER_LIST = re.compile(r"\[([^\[\]]*)\]")
_SEPARATOR = re.compile(r"[,\s]+")
_NUMBER = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$")


def parse_candidates(text: str, n_layers: int, limit: int | None = None) -> list[list[float]]:
    """The rate vectors found in ``text`` (the first ``limit`` of each reading), in order of
    appearance (lengths are not enforced here).

    Tried in turn: JSON (an object holding lists of numbers, e.g. ``{"rates": [[...]]}``, or a
    bare list of lists, either possibly inside a fence), then bracketed lists of numbers in prose.
    The first reading that yields a vector of ``n_layers`` entries wins; if none does, the
    vectors found are returned anyway, so that :func:`repair` counts them as rejected.
    """
    if not isinstance(text, str) or not text.strip():
        return []
    readings = [list(islice(_leaf_lists(doc), limit)) for doc in _json_documents(text)]
    readings.append(list(islice(_prose_lists(text), limit)))
    for found in readings:
        if any(len(c) == n_layers for c in found):
            return found
    return next((found for found in readings if found), [])


def repair(candidates: list[list[float]], n_layers: int, beta: float, p_max: float) -> tuple[list[list[float]], int]:
    """Make candidates feasible, or reject them; returns ``(valid, rejected_count)``.

    A candidate of the wrong length or with a non-finite entry is rejected: there is no faithful
    way to guess what was meant. Otherwise it is clipped to ``[0, p_max]`` and then projected
    onto ``mean = beta`` with :func:`project_to_mean`, i.e. every rate is shifted by the same
    amount ``t`` (re-clipped), the smallest Euclidean change that fixes the mean. Clipping first
    means an out-of-range entry is read as "as much / as little as allowed" rather than dragging
    the shift for all other layers. Every returned vector satisfies ``0 <= p_i <= p_max`` and
    ``|mean(p) - beta| < 1e-6``.
    """
    valid: list[list[float]] = []
    rejected = 0
    for cand in candidates:
        if len(cand) != n_layers or not all(math.isfinite(x) for x in cand):
            rejected += 1
            continue
        rates = project_to_mean([min(max(float(x), 0.0), p_max) for x in cand], beta, p_max)
        if abs(sum(rates) / n_layers - beta) < MEAN_EPS and all(0.0 <= r <= p_max for r in rates):
            valid.append(rates)
        else:
            rejected += 1
    return valid, rejected


def _json_documents(text: str) -> list[Any]:
    """JSON values in the reply: fenced blocks, the whole text, the outermost {...} or [...] span."""
    spans = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    for open_, close in (("{", "}"), ("[", "]")):
        start, end = text.find(open_), text.rfind(close)
        if 0 <= start < end:
            spans.append(text[start : end + 1])
    docs = []
    for span in spans:
        try:
            docs.append(json.loads(span))
        except (ValueError, RecursionError):  # RecursionError: nested deeper than Python's limit
            continue
    return docs


def _leaf_lists(value: Any) -> Iterator[list[float]]:
    """The lists of numbers (or numeric strings) nested anywhere in a JSON value, in document order,
    walked with a stack of its own (a deep reply cannot exhaust Python's)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, list):
            if item and all(_is_number(x) for x in item):
                yield [_as_float(x) for x in item]
            else:
                stack.extend(reversed(item))


def _as_float(x: Any) -> float:
    """``float(x)``; an integer too large for a float is infinite (and :func:`repair` rejects it)."""
    try:
        return float(x)
    except OverflowError:
        return math.inf


def _is_number(x: Any) -> bool:
    if isinstance(x, str):
        return bool(_NUMBER.match(x.strip()))
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _prose_lists(text: str) -> Iterator[list[float]]:
    """Innermost ``[...]`` spans whose items (comma- or space-separated, maybe quoted) are all numbers."""
    for m in _INNER_LIST.finditer(text):
        items = [s.strip("\"'") for s in _SEPARATOR.split(m.group(1).strip())]
        if all(_NUMBER.match(s) for s in items):
            yield [_as_float(s) for s in items]
