"""The GP metric oracle keeps the oracle contract (valid, canonical, distinct, new metrics), is
deterministic across instances and processes, selects by fitness, records every metric's lineage;
describe_edit labels what an edit changed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from selfprune.evolve.gp import GPOracle
from selfprune.metrics import METRICS, parse_metric
from selfprune.metrics.edits import MAX_LABEL, describe_edit
from selfprune.metrics.search_space import MetricContext


def ctx(seed: int = 0, gradient: bool = False) -> MetricContext:
    return MetricContext("tiny", 0.5, seed=seed, gradient=gradient)


def scored(texts: list[str]) -> list[tuple[str, float]]:
    return [(t, 10.0 + i) for i, t in enumerate(texts)]


def test_initialize_starts_with_builtins_and_returns_valid_distinct_metrics() -> None:
    for gradient in (False, True):
        got = GPOracle().initialize(ctx(gradient=gradient), 12)
        builtins = [METRICS.get(n).text for n in METRICS.names() if gradient or not METRICS.get(n).needs_gradient]
        assert got[: len(builtins)] == builtins
        assert len(got) == 12 and len(set(got)) == 12
        assert all(parse_metric(t).text == t for t in got)
        assert gradient or not any(parse_metric(t).needs_gradient for t in got)
    assert GPOracle().initialize(ctx(), 2) == [METRICS.get("magnitude").text, METRICS.get("wanda").text]


def test_initialize_and_evolve_are_deterministic() -> None:
    a, b = GPOracle(), GPOracle()
    init = a.initialize(ctx(seed=3), 10)
    assert init == b.initialize(ctx(seed=3), 10)
    kids = a.evolve(ctx(seed=3), scored(init), 4, 4, 1)
    assert kids == b.evolve(ctx(seed=3), scored(init), 4, 4, 1)
    assert a.lineage.nodes == b.lineage.nodes
    assert kids != GPOracle().evolve(ctx(seed=4), scored(init), 4, 4, 1)
    assert kids != GPOracle().evolve(ctx(seed=3), scored(init), 4, 4, 2)


def test_same_outputs_in_another_process() -> None:
    """No dependence on str hashing or set order: a process with another hash seed agrees."""
    code = ("import json; from selfprune.evolve.gp import GPOracle; from selfprune.metrics.search_space import "
            "MetricContext as C; c = C('tiny', 0.5, seed=5, gradient=True); o = GPOracle(); i = o.initialize(c, 8); "
            "print(json.dumps([i, o.evolve(c, [(t, float(n)) for n, t in enumerate(i)], 3, 3, 1)]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    o = GPOracle()
    c = MetricContext("tiny", 0.5, seed=5, gradient=True)
    init = o.initialize(c, 8)
    assert json.loads(out) == [init, o.evolve(c, [(t, float(n)) for n, t in enumerate(init)], 3, 3, 1)]


def test_evolve_returns_new_valid_metrics_with_lineage() -> None:
    oracle = GPOracle()
    c = ctx(seed=1)
    population = scored(oracle.initialize(c, 8))
    kids = oracle.evolve(c, population, n_crossover=5, n_mutation=5, generation=1)
    assert len(kids) == 10
    keys = [c.canonical(k) for k in kids]
    assert len(set(keys)) == 10 and not set(keys) & {c.canonical(t) for t, _ in population}
    parents = {t for t, _ in population}
    for kid in kids:
        assert parse_metric(kid).text == kid and not parse_metric(kid).needs_gradient
        origin = oracle.lineage.nodes[kid]
        assert origin.source == "gp" and origin.generation == 1 and origin.edit
        assert origin.parents and set(origin.parents) <= parents
    seeds = [oracle.lineage.nodes[t] for t, _ in population]
    assert [o.source for o in seeds[:3]] == ["built-in"] * 3 and all(not o.parents for o in seeds)
    assert {o.edit for o in seeds} == {"seed", "random"}


def test_tournament_favours_the_fittest() -> None:
    oracle = GPOracle()
    c = ctx(seed=2)
    texts = oracle.initialize(c, 8)
    best, worst = texts[0], texts[-1]
    population = [(t, 1.0 if t == best else 100.0 if t == worst else 50.0) for t in texts]
    population[3] = (population[3][0], float("nan"))  # a broken candidate ranks last
    kids = oracle.crossover(c, population, 40, 1, {c.canonical(t) for t in texts})
    count = Counter(p for kid in kids for p in oracle.lineage.nodes[kid].parents)
    assert len(kids) >= 30
    assert count[best] > count[worst] and count[best] > count[population[3][0]]


def test_evolve_empty_population_is_refused_and_zero_asks_nothing() -> None:
    assert GPOracle().evolve(ctx(), [], 0, 0, 1) == []
    with pytest.raises(ValueError):
        GPOracle().evolve(ctx(), [], 1, 0, 1)


@pytest.mark.parametrize("parent, child, expected", [
    ("abs(W)", "abs(W) * X_rms", "+X_rms"),
    ("X_rms * abs(W)", "abs(W) / X_rms", "swap * -> /"),
    ("abs(W)", "rowzscore(abs(W))", "+rowzscore"),
    ("sqrt(abs(W)) * X_rms", "abs(W) * X_rms", "-sqrt"),
    ("abs(W) * X_var", "abs(W)", "-X_var"),
    ("abs(W) * X_rms", "abs(W) * X_mean", "X_rms -> X_mean"),
    ("abs(W) * X_rms ** 2", "abs(W) * X_rms ** 0.5", "swap ** 2 -> ** 0.5"),
    ("abs(W) + 2 * X_rms", "abs(W) + 0.5 * X_rms", "constant changed"),
    ("abs(W) * X_rms", "X_rms * abs(W)", "unchanged"),
    ("abs(W) - X_rms", "X_rms - abs(W)", "restructured"),
])
def test_describe_edit(parent: str, child: str, expected: str) -> None:
    assert expected in describe_edit(parent, child)


def test_describe_edit_is_capped() -> None:
    label = describe_edit("W", "exp(sqrt(tanh(log(sigmoid(rowzscore(colzscore(X_rms * X_mean * X_var * G * abs(W))))))))")
    assert len(label) <= MAX_LABEL and label.endswith("...")
