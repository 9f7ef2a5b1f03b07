"""The metric search's prompts: graph-driven chain of thought (GCoT), kept in one place so they can be
read and diffed.

Our design (AutoPrune's prompts are not public). Every prompt has four parts:

1. **The task**: the metric language (inputs, operators, functions, guards, rules), that the lowest
   scores are pruned, and the sparsity, pattern and allocation a metric is judged at.
2. **The graph** of the metrics so far (:func:`render_graph`): one line per metric with an id
   (``m1``, ``m2``... best first), its perplexity and generation, and one line per edge
   ``m3 -> m7 [+X_var] Δppl -4.21``: which edit made the child and what it did to perplexity. It is
   bounded: the best :data:`GRAPH_NODES` metrics plus each one's parents.
3. **A fixed chain of reasoning** over the graph (:data:`REASONING_STEPS`): which edits helped and
   which hurt, what the best metrics share, what is untried, then the proposals.
4. **The reply format**: one JSON object (:func:`metrics_schema`) naming, for every proposal, the
   parent id(s) it edits; the oracle resolves the ids with the map :func:`render_graph` returns.

A refused metric is sent back with its reason (:func:`refusal_prompt`) in the same conversation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

from ..metrics.edits import describe_edit
from ..metrics.language import FUNCTIONS, INPUTS, MAX_CHARS, MAX_CONSTANT, MAX_DEPTH, MAX_EXPONENT, MAX_NODES, MetricError
from ..metrics.search_space import Lineage, MetricContext, canonical_text

Operation = Literal["mutation", "crossover"]

GRAPH_NODES = 20  # the best metrics drawn; each one's parents come too
_MAX_SHOWN = 160  # characters of an untrusted metric text quoted back in a follow-up

INPUT_LINES = {
    "W": "the layer's weight matrix, shape (out, in)",
    "X_rms": "root mean square of each input channel's activations on calibration data, shape (1, in)",
    "X_mean": "mean of each input channel's activations, shape (1, in)",
    "X_var": "variance of each input channel's activations, shape (1, in)",
    "G": "per weight, the root of the summed squared per-sample gradients of the loss, shape (out, in)",
}

FUNCTION_LINES = {
    "abs": "absolute value",
    "sqrt": "square root of |x|",
    "log": "log(|x| + 1e-6)",
    "exp": "exp(min(x, 30))",
    "tanh": "hyperbolic tangent",
    "sigmoid": "logistic sigmoid",
    "min": "min(a, b), elementwise",
    "max": "max(a, b), elementwise",
    "minmax": "(x - min) / (max - min) over the whole matrix",
    "rowminmax": "min-max scaling along each row (over the inputs of one output)",
    "colminmax": "min-max scaling along each column (over the outputs of one input)",
    "zscore": "(x - mean) / std over the whole matrix",
    "rowzscore": "z-score along each row",
    "colzscore": "z-score along each column",
    "rowsum": "sum along each row, shape (out, 1)",
    "rowmean": "mean along each row, shape (out, 1)",
    "rownorm": "L2 norm along each row, shape (out, 1)",
    "colsum": "sum along each column, shape (1, in)",
    "colmean": "mean along each column, shape (1, in)",
    "colnorm": "L2 norm along each column, shape (1, in)",
}

PATTERN_LINES = {
    "unstructured": "the weights of each output row compete: each row loses its lowest-scoring fraction",
    "unstructured-row": "the weights of each output row compete: each row loses its lowest-scoring fraction",
    "unstructured-layer": "all weights of a matrix compete: the matrix loses its lowest-scoring fraction",
}

REASONING_STEPS = (
    "Edits: from the edges, which edits lowered perplexity (negative Δppl) and which raised it?",
    "Shared traits: which inputs and normalisations do the best (lowest perplexity) metrics share?",
    "Gaps: which inputs, functions and combinations have not been tried yet?",
    "Proposals: propose {count} new metric(s), each {how}; every one must differ from every metric "
    "in the graph and from each other.",
)

_HOW = {
    "mutation": 'an edit of one named parent (mutation: "other_parent" is null)',
    "crossover": 'a combination of two named parents (crossover: "parent" and "other_parent" are both ids)',
    "initialization": 'an edit of a named seed (mutation) or a combination of two seeds (crossover), '
                      'or a new idea ("parent": null)',
}

_TASK = """\
### Task ###
You design pruning metrics for the language model {model}. A metric is ONE expression in the small \
language below that gives every weight of a linear layer a score. The weights with the LOWEST scores \
are pruned (set to zero). Each metric is judged at sparsity {sparsity:g} with the {pattern} pattern \
({pattern_line}) and the {allocation} allocation of sparsity over layers. Its fitness is the perplexity \
of the pruned model on {dataset}: LOWER is better.

### The metric language ###
Inputs (row inputs broadcast over the output rows):
{inputs}
Numbers: constants with |c| <= {max_constant:g}.
Operators: + - * / and unary -; x ** c where c is a number constant with |c| <= {max_exponent}.
Functions (call by bare name):
{functions}
Guards make every metric total (no NaN, no crash): log and sqrt take |x|, exp is capped at 30, a \
divisor smaller than 1e-6 in size becomes 1e-6 with its sign, x ** c uses |x| for a non-integer c, \
min-max and z-score divide by at least 1e-6.
Rules: one expression, nothing else (no code, no assignments, no other names or functions); it must give \
one score per weight (its shape must be W's: e.g. multiply by abs(W)); it must not give every weight \
the same score; at most {max_chars} characters, {max_nodes} nodes, nesting depth {max_depth}.
"""

_GRAPH = """\
### {title} ###
Nodes: `id: metric | perplexity ("?": not known) | generation | source`. Edges: `parent -> child [edit] Δppl \
(child - parent)`; a negative Δppl means the edit helped.
{graph}
"""

_STEPS = """\
### Reasoning steps ###
Think through these steps in order, briefly, over the graph above:
{steps}
"""

_FORMAT = """\
### Reply format ###
Reply with only one JSON object, no other text:
{{"reasoning": "<short summary of steps 1-3>", "metrics": [{{"parent": "m3", "other_parent": "m5" or null, \
"edit": "<short description of the change>", "metric": "<expression>"}}]}}
"metrics" holds exactly {count} entries; "parent" and "other_parent" are ids from the graph (or null).
"""


def task_text(ctx: MetricContext) -> str:
    """Part (a): the task and the language, with the inputs this search may use."""
    inputs = [name for name in INPUTS if name != "G" or ctx.gradient]
    return _TASK.format(
        model=ctx.model_name,
        sparsity=ctx.sparsity,
        pattern=ctx.pattern,
        pattern_line=_pattern_line(ctx.pattern),
        allocation=ctx.allocation,
        dataset=ctx.dataset,
        inputs="\n".join(f"- {name}: {INPUT_LINES[name]}" for name in inputs),
        functions="\n".join(f"- {name}: {FUNCTION_LINES[name]}" for name in FUNCTIONS),
        max_constant=MAX_CONSTANT,
        max_exponent=MAX_EXPONENT,
        max_chars=MAX_CHARS,
        max_nodes=MAX_NODES,
        max_depth=MAX_DEPTH,
    )


def _pattern_line(pattern: str) -> str:
    if pattern in PATTERN_LINES:
        return PATTERN_LINES[pattern]
    n, _, m = pattern.partition(":")
    if n.isdigit() and m.isdigit():
        return f"each group of {m} consecutive inputs of a row keeps its {n} highest-scoring weights"
    return "the lowest-scoring weights are pruned"


def _prompt(ctx: MetricContext, title: str, graph_text: str, count: int, how: str) -> str:
    steps = "\n".join(f"{i}. {step.format(count=count, how=_HOW[how])}" for i, step in enumerate(REASONING_STEPS, 1))
    return (task_text(ctx) + "\n" + _GRAPH.format(title=title, graph=graph_text.strip() or "(empty)") + "\n"
            + _STEPS.format(steps=steps) + "\n" + _FORMAT.format(count=count))


def mutation_prompt(ctx: MetricContext, graph_text: str, n: int) -> str:
    """Ask for ``n`` mutants: each an edit of one parent named by its id in ``graph_text``."""
    return _prompt(ctx, "Graph of the metrics so far", graph_text, n, "mutation")


def crossover_prompt(ctx: MetricContext, graph_text: str, n: int) -> str:
    """Ask for ``n`` crossovers: each a combination of two parents named by their ids."""
    return _prompt(ctx, "Graph of the metrics so far", graph_text, n, "crossover")


def initialization_prompt(ctx: MetricContext, seeds_text: str, n: int) -> str:
    """Ask for ``n`` initial metrics beyond the seeds (the built-ins), drawn as the graph."""
    return _prompt(ctx, "Seed metrics (the built-ins, not yet evaluated)", seeds_text, n, "initialization")


def refusal_prompt(problems: list[tuple[str, str]], n: int) -> str:
    """The follow-up after a reply that fell short: each ``(metric, reason)`` it was refused for, and
    a request for the ``n`` metric(s) still missing, in the same format."""
    lines = "\n".join(f"- `{_shown(text)}` -> {reason}" for text, reason in problems)
    return (f"These could not be used:\n{lines}\n\n"
            f"Propose {n} more metric(s), each one expression in the metric language, different from every "
            "metric in the graph and from those above. Reply with only the JSON object, as before: "
            '{"reasoning": "<short>", "metrics": [{"parent": ..., "other_parent": ..., "edit": ..., "metric": ...}]} '
            f'with exactly {n} entries in "metrics".')


def _shown(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def metrics_schema(n: int) -> dict:
    """The JSON Schema of a reply proposing ``n`` metrics (reasoning first, so it is written first)."""
    parent = {"type": ["string", "null"]}
    entry = {"type": "object",
             "properties": {"parent": parent, "other_parent": parent, "edit": {"type": "string"},
                            "metric": {"type": "string"}},
             "required": ["parent", "other_parent", "edit", "metric"], "additionalProperties": False}
    return {"type": "object",
            "properties": {"reasoning": {"type": "string"},
                           "metrics": {"type": "array", "minItems": n, "maxItems": n, "items": entry}},
            "required": ["reasoning", "metrics"], "additionalProperties": False}


def render_graph(lineage: Lineage, fitness: Mapping[str, float | None],
                 limit: int = GRAPH_NODES) -> tuple[str, dict[str, str]]:
    """The graph part of a prompt and its ids: ``(text, {"m1": canonical text, ...})``.

    Nodes are the ``limit`` best metrics of ``fitness`` (texts canonical or not; lower is better, a
    NaN last, None for "not evaluated yet" after that) plus the parents :class:`Lineage` records for
    them, numbered best first (then by text, so the same inputs give the same text). Edges join a drawn metric to each drawn parent, labelled
    with the lineage's edit (for a second parent, the edit from it) and the change in perplexity
    (child - parent) when both are known.
    """
    scored: dict[str, float | None] = {}
    for text, value in fitness.items():
        key = _canonical(text)
        if key is not None:
            scored[key] = value
    best = sorted(scored, key=lambda t: _order(t, scored))[:limit]
    drawn = set(best)
    for text in best:
        origin = lineage.nodes.get(text)
        drawn.update(origin.parents if origin else ())
    ordered = sorted(drawn, key=lambda t: _order(t, scored))
    ids = {text: f"m{i}" for i, text in enumerate(ordered, 1)}
    nodes, edges = [], []
    for text in ordered:
        origin = lineage.nodes.get(text)
        value = scored.get(text)
        where = f"gen {origin.generation} | {origin.source}" if origin else "gen ? | given"
        nodes.append(f"{ids[text]}: {text} | {_ppl(value)} | {where}")
        for n, parent in enumerate(origin.parents if origin else ()):
            if parent in ids:
                edit = origin.edit if n == 0 else describe_edit(parent, text)  # the lineage's is from parent 1
                other = scored.get(parent)
                delta = value - other if value is not None and other is not None else math.nan
                shown = f"{delta:+.2f}" if math.isfinite(delta) else "?"
                edges.append(f"{ids[parent]} -> {ids[text]} [{edit or 'edit'}] Δppl {shown}")
    return "\n".join(nodes + edges), {i: text for text, i in ids.items()}


def seeds_graph(lineage: Lineage, seeds: list[str]) -> tuple[str, dict[str, str]]:
    """The seeds (not yet evaluated) as a graph: each one a node without perplexity."""
    return render_graph(lineage, dict.fromkeys(seeds), limit=len(seeds))


def _order(text: str, scored: Mapping[str, float | None]) -> tuple[int, float, str]:
    value = scored.get(text)
    rank = 2 if value is None else int(math.isnan(value))
    return (rank, value if rank == 0 else 0.0, text)


def _ppl(value: float | None) -> str:
    if value is None:
        return "ppl ?"
    return f"ppl {value:.2f}" if math.isfinite(value) else ("ppl failed" if math.isnan(value) else "ppl inf")


def _canonical(text: str) -> str | None:
    try:
        return canonical_text(text)
    except MetricError:
        return None


__all__ = ["GRAPH_NODES", "REASONING_STEPS", "crossover_prompt", "initialization_prompt", "metrics_schema",
           "mutation_prompt", "refusal_prompt", "render_graph", "seeds_graph", "task_text"]
