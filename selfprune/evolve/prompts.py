"""The Self-Pruner prompts (paper, Figures 2 and 3), kept in one place so they can be read and diffed.

The wording follows the paper. Two deliberate changes, both marked in the templates:

* The rate bound is ``{p_max}`` rather than 1: a rate of 1 removes a whole layer, and the search
  bounds every rate (see :class:`selfprune.evolve.search_context.SearchContext`).
* The paper asks for bare bracketed lists "without any additional text". We ask for one JSON
  object ``{"rates": [[...], ...]}`` instead, which servers with a JSON mode can enforce. The reply
  parser (:mod:`selfprune.evolve.replies`) still accepts the paper's free-text form, because a
  model may ignore the instruction.

Selection is not a separate prompt in the paper: the evolution prompt shows the population with
its fitnesses and the model picks the parents itself, once for mutation and once for crossover.
"""

from __future__ import annotations

from typing import Literal

Operation = Literal["mutation", "crossover"]

_ATTRIBUTES = """\
### Solution attributes ###
- Contain {n_layers} decimals between 0 and {p_max}, accurate to 5 decimal places.
- Ensure the average of these numbers equals {beta}.
- Be distinct, starting with "[" and ending with "]".
"""

# Replaces the paper's "only the configurations, without any additional text" (see module docstring).
_OUTPUT_FORMAT = """\
### Output format ###
Reply with only a JSON object of the form {{"rates": [[...], [...]]}}, where "rates" holds exactly \
{count} configurations, each a list of {n_layers} numbers. Do not add any other text.
"""

# Figure 2.
INITIALIZATION_TEMPLATE = (
    """\
### Problem description and task instruction ###
Let's think step by step! You are helping me prune the {model}, aiming to minimize perplexity \
on the {dataset} dataset. The model has {n_layers} transformer layers. Layer-wise pruning rate \
measures how many parameters are pruned from each layer of the model. Different layers may have \
different pruning rates based on their importance and contribution to the performance of model. \
You need to generate {count} valid layer-wise pruning rate configurations. Each configuration should:
"""
    + _ATTRIBUTES
    + _OUTPUT_FORMAT
)

# Figure 3 (one template; the paper fills "mutation/crossover" with the operation asked for).
EVOLUTION_TEMPLATE = (
    """\
### Problem description and task instruction ###
Let's think step by step! You will receive {population_size} lists representing the layer-wise \
pruning rates of the {model} and a fitness value for each list. The lower the fitness value, the \
better. Your task is to perform the {operation} operation in the evolutionary algorithm to \
generate new configurations. Each new pruning rate configuration list should:
"""
    + _ATTRIBUTES
    + """\
Please provide exactly {count} new configurations based on the existing data provided below.
"""
    + _OUTPUT_FORMAT
    + """\
### Current Population and Fitnesses ###
Here are the existing layer-wise pruning rate configurations and their fitness values:
{population}
"""
)


def format_rates(rates: list[float]) -> str:
    """Five decimals, as the prompts ask of the model: the model sees what it is asked to write."""
    return "[" + ", ".join(f"{r:.5f}" for r in rates) + "]"


# Not in the paper: the known allocations that join the initial population, shown so the model can
# aim past them. Absent when there are none, so the paper's prompt is unchanged.
BASELINES_TEMPLATE = """### Known allocations ###
These published layer-wise allocations at the same average will be evaluated beside your configurations; propose configurations that could do better than them:
{baselines}
"""


def initialization_prompt(model: str, n_layers: int, count: int, beta: float, p_max: float, dataset: str,
                          baselines: tuple[tuple[str, tuple[float, ...]], ...] = ()) -> str:
    """Figure 2: ask for ``count`` initial configurations (shown the ``baselines``, labelled, if any)."""
    prompt = INITIALIZATION_TEMPLATE.format(model=model, dataset=dataset, n_layers=n_layers, count=count, beta=beta, p_max=p_max)
    if not baselines:
        return prompt
    return prompt + BASELINES_TEMPLATE.format(baselines="\n".join(f"{name}: {format_rates(list(rates))}"
                                                                   for name, rates in baselines))


def evolution_prompt(
    operation: Operation,
    model: str,
    n_layers: int,
    population: list[tuple[list[float], float]],
    count: int,
    beta: float,
    p_max: float,
    labels: list[str | None] | None = None,
) -> str:
    """Figure 3: show the scored population and ask for ``count`` offspring by ``operation``; a
    member that is a known allocation carries its name (``labels``, by position)."""
    labels = labels or [None] * len(population)
    lines = "\n".join(
        f"Configuration{i}{f' ({label})' if label else ''}: {format_rates(rates)}, Fitness{i}: {fitness:.4f}"
        for i, ((rates, fitness), label) in enumerate(zip(population, labels), start=1)
    )
    return EVOLUTION_TEMPLATE.format(
        population_size=len(population),
        model=model,
        operation=operation,
        n_layers=n_layers,
        count=count,
        beta=beta,
        p_max=p_max,
        population=lines,
    )
