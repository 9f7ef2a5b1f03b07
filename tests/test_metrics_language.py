"""The metric language: hostile texts are refused before anything runs, built-ins match their papers'
formulas, and equivalent spellings share one canonical text and key without changing the scores."""

from __future__ import annotations

import ast
import random
from pathlib import Path

import pytest
import torch

import selfprune.metrics as metrics_pkg
from selfprune.core.errors import UserError
from selfprune.metrics import INPUTS, METRICS, Metric, MetricError, parse_metric, resolve_metric
from selfprune.metrics.canonical import canonical, render
from selfprune.metrics.language import FUNCTIONS, parse
from selfprune.metrics.tensors import AXIS_OPS, BINARY, UNARY, bind, evaluate, probe_inputs


@pytest.fixture
def layer() -> dict[str, torch.Tensor]:
    return probe_inputs(out=6, in_=10, seed=1)


HOSTILE = {
    "W.__class__.__mro__": "attribute access",
    "open('/etc/passwd')": "call to `open`",
    "while True: pass": "statement (While",
    "import os": "statement (Import",
    "10**10**10": "exponent",
    "W ** W": "exponent",
    "W ** 5": "exponent",
    "[x for x in W]": "comprehension",
    "lambda: 1": "lambda",
    "W[0]": "indexing",
    "eval('1')": "call to `eval`",
    "getattr(W, 'T')": "call to `getattr`",
    "os": "name `os` is not an input",
    "W if G else W": "conditional expression",
    "W < G": "comparison",
    "(y := W)": "assignment expression",
    "f'{W}'": "f-string",
    "abs(x=W)": "keyword",
    "max(*W)": "starred",
    "abs(W, G)": "takes 1 argument",
    "W % 2": "operator",
    "True * W": "constant `True`",
    "'a' * W": "constant `'a'`",
    "W * 1e300": "too large",
    "X_rms * 2": "one per input channel, multiply by something of W's shape",
    "rowsum(W)": "one per output channel",
    "Here is my metric: it uses the weights": "no expression found",
    "x = 1; y = 2": "2 statements",
    "log(W - W)": "same score to every weight",
    "W * 1e6 * 1e6 * 1e6 * 1e6 * 1e6 * 1e6 * 1e6": "NaN/inf",
    "W" * 3000: "the limit is 2000",
    " + ".join(["W"] * 150): "the limit is 200",
    "abs(" * 40 + "W" + ")" * 40: "the limit is 32",
    "abs(x=" * 95 + "W" + ")" * 95: "the limit is 32",  # nesting through keywords counts too
    "while True: " + "-" * 1980 + "W": "statement (While",  # refused without walking the deep body
}


@pytest.mark.parametrize("text", list(HOSTILE), ids=lambda t: t[:30])
def test_hostile_text_is_refused_naming_the_problem(text):
    with pytest.raises(MetricError) as err:
        parse_metric(text)
    assert HOSTILE[text] in str(err.value)
    assert isinstance(err.value, UserError)


def test_nothing_in_a_refused_text_runs(tmp_path: Path):
    sentinel = tmp_path / "X"
    for text in (f"__import__('os').system('touch {sentinel}')", f"open('{sentinel}', 'w')",
                 f"`__import__('pathlib').Path('{sentinel}').touch()`", f"[open('{sentinel}', 'w') for W in [1]]"):
        with pytest.raises(MetricError, match="not allowed"):
            parse_metric(text)
    assert not sentinel.exists()


def test_the_package_never_evaluates_text_or_looks_up_names():
    """The evaluator maps names through explicit dicts: no eval/exec/compile/getattr anywhere."""
    banned = {"eval", "exec", "compile", "getattr", "__import__"}
    for path in Path(metrics_pkg.__file__).parent.glob("*.py"):
        calls = {n.func.id for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert not calls & banned, path


def test_every_function_of_the_language_is_evaluated():
    assert set(FUNCTIONS) == (set(UNARY) | set(BINARY) | set(AXIS_OPS)) - {"neg", "+", "-", "*", "/"}


def test_guards_keep_scores_finite(layer):
    nested = parse_metric("exp(exp(exp(W)))")  # exp clamps its argument at 30: exp(30) ~ 1e13, then clamped again
    assert torch.isfinite(nested.scores({"W": layer["W"] * 100})).all()
    by_zero = parse_metric("W / 0")  # a divisor below EPS = 1e-6 becomes EPS with its sign (+EPS for 0)
    assert torch.allclose(by_zero.scores(layer), layer["W"] / 1e-6)
    logs = parse_metric("log(W) * sqrt(X_mean)")  # log(|x| + EPS), sqrt(|x|)
    assert torch.allclose(logs.scores(layer), torch.log(layer["W"].abs() + 1e-6) * layer["X_mean"].abs().sqrt())


def test_row_and_col_operations_act_on_the_broadcast_matrix(layer):
    """"row" reduces along a row (over inputs, giving (out, 1)); a sum over a broadcast value counts
    every copy, so rowsum(X_rms) is the same for each row and rowsum(2) is 2 * in."""
    w, x = layer["W"], layer["X_rms"]
    cases = {"rowsum(abs(W)) * W": w.abs().sum(1, keepdim=True) * w, "colmean(W) * W": w.mean(0, keepdim=True) * w,
             "rowsum(2) * W": 2 * w.shape[1] * w, "colsum(X_rms) * W": w.shape[0] * x * w,
             "rownorm(X_rms) + W": x.norm() + w, "rowzscore(W)": (w - w.mean(1, keepdim=True)) / w.std(1, correction=0, keepdim=True)}
    for text, want in cases.items():
        assert torch.allclose(parse_metric(text).scores(layer), want, rtol=1e-5), text


def test_fences_and_assignments_are_unwrapped():
    wanda = METRICS.get("wanda")
    for text in ("```python\nscore = abs(W) * X_rms\n```", "`X_rms*abs(W)`", "  metric = abs(W)*X_rms  ", "```abs(W)*X_rms```"):
        assert parse_metric(text).key == wanda.key


def test_builtins(layer):
    keys = {name: METRICS.get(name).key for name in METRICS.names()}
    assert set(keys) == {"magnitude", "wanda", "ria", "pruner-zero"} and len(set(keys.values())) == 4
    w, x = layer["W"], layer["X_rms"]
    assert torch.equal(resolve_metric("magnitude").scores(layer), w.abs())
    assert torch.allclose(resolve_metric("wanda").scores(layer), w.abs() * x)
    ria = (w.abs() / w.abs().sum(1, keepdim=True) + w.abs() / w.abs().sum(0, keepdim=True)) * x.sqrt()
    assert torch.allclose(resolve_metric("ria").scores(layer), ria)
    g = layer["G"]
    zero = resolve_metric("pruner-zero")
    assert zero.needs_gradient and not resolve_metric("wanda").needs_gradient
    assert torch.allclose(zero.scores(layer), w**2 * (g - g.min()) / (g.max() - g.min()))
    with pytest.raises(MetricError, match="missing: G"):
        zero.scores({"W": w})


def test_scores_are_float32_of_the_layer_shape(layer):
    weight = torch.nn.Parameter(layer["W"].half())
    out = resolve_metric("wanda").scores({"W": weight, "X_rms": layer["X_rms"].double()})
    assert out.dtype == torch.float32 and out.shape == weight.shape and not out.requires_grad
    with pytest.raises(MetricError, match="must be"):
        resolve_metric("wanda").scores({"W": layer["W"], "X_rms": layer["X_rms"][:3]})


def test_resolve_names_both_possibilities():
    assert resolve_metric("wanda") is METRICS.get("wanda")
    assert resolve_metric("X_rms * abs(W) + 0").key == METRICS.get("wanda").key
    with pytest.raises(MetricError, match="neither a registered metric .*wanda.* nor a valid expression"):
        resolve_metric("wandaa")
    with pytest.raises(UserError, match="registered: magnitude"):
        METRICS.get("wandaa")


def test_equivalent_spellings_share_a_key():
    same = ["abs(W)*X_rms", "X_rms * abs(W)", "(X_rms*abs(W))*1", "abs(W) * X_rms + 0", "abs(abs(W)) * X_rms ** 1",
            "--abs(W) * (X_rms / 1)", "sqrt(W ** 2) * X_rms", "abs(W) * 2 * X_rms * 0.5"]
    assert len({parse_metric(t).key for t in same}) == 1
    assert parse_metric("abs(W)*X_rms").key != parse_metric("abs(W)*X_var").key
    assert parse_metric("max(W, G) - G").key == parse_metric("max(G, W) - G").key
    assert parse_metric("W - G").key != parse_metric("G - W").key
    assert parse_metric("W * 2 * 3").text == "6 * W"
    assert parse_metric("W * 0.1").text == "0.1 * W"
    assert parse_metric("abs(W ** 2) + abs(sqrt(G)) + abs(exp(W))").text == "W ** 2 + exp(W) + sqrt(G)"
    assert parse_metric("abs(W ** 3)").text == "abs(W ** 3)"  # an odd power keeps the sign: not simplified


DRAWN_UNARY = ['abs', 'sqrt', 'log', 'tanh', 'sigmoid', 'exp', 'minmax', 'rowzscore', 'colminmax', 'rowmean', 'colnorm', 'rowsum']


def _random_text(rng: random.Random, depth: int) -> str:
    if depth == 0 or rng.random() < 0.2:
        return rng.choice([*INPUTS, "2", "0.5", "1", "0", "3", "-1.5"])
    a, b = _random_text(rng, depth - 1), _random_text(rng, depth - 1)
    return rng.choice([
        f"({a} {rng.choice('+-*/')} {b})", f"{rng.choice(['min', 'max'])}({a}, {b})", f"-({a})",
        f"{rng.choice(DRAWN_UNARY)}({a})",
        f"({a}) ** {rng.choice(['2', '1', '0.5', '-1', '3'])}", f"({a}) * 1", f"({a}) + 0", f"abs(abs({a}))",
        f"sqrt(({a}) ** 2)", f"-(-({a}))", f"({a}) / 1", f"({a}) * 2 * 3",
    ])


def test_canonical_form_is_idempotent_and_keeps_the_scores():
    env, size = bind(frozenset(INPUTS), probe_inputs())
    compared = 0
    for seed in range(300):
        text = f"({_random_text(random.Random(seed), 4)}) * W"
        tree = parse(text)
        canon = canonical(tree)
        assert canonical(parse(render(canon))) == canon and render(canonical(parse(render(canon)))) == render(canon), text
        raw = evaluate(tree, env, size)
        if torch.isfinite(raw).all():
            compared += 1
            got = evaluate(canon, env, size)
            assert torch.allclose(got, raw, rtol=1e-4, atol=1e-5 * (1 + float(raw.abs().max()))), (text, render(canon))
    assert compared > 200


def test_metric_identity_is_its_canonical_text():
    a, b = parse_metric("abs(W)*X_rms"), parse_metric("X_rms * abs(W)")
    assert a == b and isinstance(a, Metric) and a.inputs == {"W", "X_rms"}
    assert parse_metric(a.text).text == a.text and len(a.key) == 16
