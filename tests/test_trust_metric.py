"""A metric text is untrusted (an LLM may write it): what is accepted once is accepted again from its
canonical text, its evaluation holds a bounded number of layer-sized tensors (measured), and scores
that are not finite on a real layer never become a mask."""

from __future__ import annotations

import json
import math
import random
import weakref

import pytest
import torch
from fake_openai_server import FakeOpenAI, reply
from helpers import run_cli, tiny_prune_args
from torch.utils._python_dispatch import TorchDispatchMode

from selfprune.evolve.gp import GPOracle
from selfprune.metrics import MetricError, parse_metric
from selfprune.metrics.canonical import render
from selfprune.metrics.language import MAX_DEPTH, Num, Op, Var, parse
from selfprune.metrics.search_space import MetricContext
from selfprune.metrics.tensors import bind, evaluate

# Finite on the 8x16 probe layer (rowsum(W ** 0) is the width: 16 ** 24 ~ 8e28) but not on the tiny
# model's layers, 64 and 96 wide (64 ** 24 ~ 2e43 overflows float32): every score is inf.
FINITE_ON_PROBE_ONLY = "abs(W) * ((rowsum(W ** 0) ** 4) ** 3) ** 2"


def balanced_sum(terms: list[str]) -> str:
    if len(terms) == 1:
        return terms[0]
    half = len(terms) // 2
    return f"({balanced_sum(terms[:half])} + {balanced_sum(terms[half:])})"


# (a) acceptance == re-acceptance

def test_a_balanced_sum_within_every_limit_whose_canonical_text_is_too_deep_is_refused_up_front():
    text = balanced_sum(["W"] * 40)  # nested 7 deep as written; its canonical W + W + ... + W is 40 deep
    parse(text)  # within every limit as written
    with pytest.raises(MetricError, match=rf"written canonically .* nested 40 deep; the limit is {MAX_DEPTH}.*fewer terms"):
        parse_metric(text)


def test_every_accepted_metric_is_accepted_again_from_its_canonical_text():
    """GP-grown metrics and balanced sums and products of them (fixed seeds): whatever parse_metric
    accepts, it accepts again from the canonical text, with the same text."""
    gp, ctx = GPOracle(), MetricContext("tiny", 0.5)
    accepted = refused_for_depth = 0
    for seed in range(400):
        rng = random.Random(seed)
        terms = [render(gp._grow(rng, ctx, rng.randint(2, 5))) for _ in range(rng.choice([1, 2, 8, 20, 33, 40]))]
        text = balanced_sum(terms) if rng.random() < 0.5 else balanced_sum(terms).replace(" + ", " * ")
        try:
            parse(text)
            metric = parse_metric(text)
        except MetricError as e:
            refused_for_depth += "written canonically" in str(e)
            continue
        accepted += 1
        assert parse_metric(metric.text).text == metric.text, text
    assert accepted > 100 and refused_for_depth > 10


# (b) evaluation memory

class LiveBytes(TorchDispatchMode):
    """Bytes of the tensors made inside this block that are still alive, and their peak: every op's
    output storage is counted until it is freed (a weakref finalizer), an in-place result once;
    storages of ``known`` tensors (the inputs) are not counted."""

    def __init__(self, *known: torch.Tensor) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.counted: dict[int, weakref.finalize] = {}
        self.known = {t.untyped_storage().data_ptr() for t in known}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr not in self.counted and ptr not in self.known:
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    self.counted[ptr] = weakref.finalize(storage, self._freed, ptr, storage.nbytes())
        return out

    def _freed(self, ptr: int, nbytes: int) -> None:
        self.live -= nbytes
        self.counted.pop(ptr, None)


def layer_inputs(out: int = 64, in_: int = 256) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    rms = torch.rand(in_, generator=gen) + 0.1
    return {"W": torch.randn(out, in_, generator=gen), "X_rms": rms, "X_mean": rms * 0.5, "X_var": rms * 0.75,
            "G": torch.randn(out, in_, generator=gen)}


def peak_layers(tree, inputs: dict[str, torch.Tensor]) -> float:
    """The peak of the tensors one evaluation made, in layers (out x in float32)."""
    env, size = bind(frozenset(inputs), inputs)
    with torch.no_grad(), LiveBytes(*inputs.values(), *env.values()) as live:
        result = evaluate(tree, env, size)
        assert result.shape == size
    return live.peak / (size[0] * size[1] * 4)


def test_the_tracker_sees_every_held_tensor():
    inputs = layer_inputs()
    w = inputs["W"]
    with LiveBytes(w) as live:
        held = [w * i for i in range(5)]
        assert live.live == 5 * w.numel() * 4
        del held
    assert live.live == 0 and live.peak == 5 * w.numel() * 4


def test_a_50_term_sum_holds_a_constant_number_of_layers():
    """Each term is a layer-sized product; the sum is accumulated in place, so no more than the sum,
    one term and a scalar are ever alive (before: all 50 terms at once)."""
    terms = tuple(Op("*", (Num(float(i + 1)), Op("abs", (Op("-", (Var("W"), Var("G"))),)))) for i in range(50))
    assert peak_layers(Op("+", terms), layer_inputs()) <= 2.01


def test_measured_memory_never_exceeds_the_stated_bound():
    """For GP-grown metrics and the built-ins: the peak of live tensors an evaluation made is at most
    live_tensors(tree) layers, which parse_metric caps at MAX_LIVE."""
    from selfprune.metrics import METRICS
    from selfprune.metrics.language import MAX_LIVE
    from selfprune.metrics.tensors import live_tensors

    gp, ctx, inputs = GPOracle(), MetricContext("tiny", 0.5), layer_inputs()
    trees = [METRICS.get(name).tree for name in METRICS.names()]
    for seed in range(400):
        try:
            trees.append(parse_metric(render(gp._grow(random.Random(seed), ctx, 8))).tree)
        except MetricError:
            continue
    assert len(trees) > 150 and max(map(live_tensors, trees)) >= 5
    for tree in trees:
        bound = live_tensors(tree)
        assert bound <= MAX_LIVE and peak_layers(tree, inputs) <= bound, render(tree)


def test_a_metric_needing_more_live_tensors_than_the_limit_is_refused():
    from selfprune.metrics.language import MAX_LIVE

    text = "W"
    for _ in range(MAX_LIVE):  # the last term of a sum is computed while the sum so far is held: one more each level
        text = f"W + X_rms + abs({text})"
    parse(text)  # within the text's limits
    with pytest.raises(MetricError, match=rf"layer-sized values at once; the limit is {MAX_LIVE}"):
        parse_metric(text)


# (c) non-finite scores on real layers

def test_prune_with_a_metric_non_finite_on_real_layers_exits_2_before_any_mask(tiny_workspace, tmp_path, capsys,
                                                                               monkeypatch):
    assert torch.isfinite(parse_metric(FINITE_ON_PROBE_ONLY).scores(layer_inputs(8, 16))).all()
    code, _, err = run_cli(capsys, monkeypatch, *tiny_prune_args(tiny_workspace, tmp_path / "nan", "--metric",
                                                                 FINITE_ON_PROBE_ONLY, "--sparsity", "0.5"))
    said = " ".join(err.split())
    assert code == 2, err[-2000:]
    assert "layer 0" in said and "self_attn.q_proj" in said and parse_metric(FINITE_ON_PROBE_ONLY).text in said, said
    assert "NaN/inf" in said and "keep it bounded" in said and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error" in line.lower()]) == 1, err
    assert not (tmp_path / "nan" / "selfprune.json").exists()


@pytest.mark.parametrize("runner", ["library", "flow"])
def test_autoprune_counts_a_metric_non_finite_on_real_layers_invalid_and_goes_on(runner, tiny_workspace, tmp_path,
                                                                                  request):
    """The LLM proposes a metric finite on the probe but not on the model: the search ranks it last
    (NaN fitness), says why in ``invalid``, and finds a finite best; in the library and the flow."""
    import selfprune
    from selfprune.config import AutopruneConfig

    bad, good = parse_metric(FINITE_ON_PROBE_ONLY).text, parse_metric("abs(W) * X_var ** 0.5").text
    proposals = [{"parent": "m1", "other_parent": None, "edit": "x", "metric": m} for m in (bad, good)]
    with FakeOpenAI([reply(json.dumps({"reasoning": "r", "metrics": proposals}))]) as server:
        config = AutopruneConfig(model=str(tiny_workspace / "model"), data=str(tiny_workspace / "corpus.txt"),
                                 out=str(tmp_path / "run"), population=6, mutations=0, crossovers=0, generations=0,
                                 sparsities=[0.5], samples=4, calib_seqlen=64, seqlen=64, fitness_windows=2,
                                 test_windows=2, device="cpu", oracle="openai:fake-gpt", base_url=server.base_url,
                                 oracle_timeout=10)
        if runner == "flow":
            request.getfixturevalue("prefect_api")
            from selfprune.flows.autoprune import autoprune

            summary = autoprune(config)
            ledger = [json.loads(line) for line in (tmp_path / "run" / "evaluations.jsonl").read_text().splitlines()]
            assert [r["structure"]["metric"] for r in ledger if r.get("invalid")] == [bad]
        else:
            summary = selfprune.autoprune(config).to_json()
    fitness = {n["text"]: n["fitness"] for n in summary["graph"]}
    assert math.isnan(fitness[bad]) and math.isfinite(fitness[good])
    assert set(summary["invalid"]) == {bad} and "NaN/inf" in summary["invalid"][bad]
    assert summary["metric"] != bad and math.isfinite(summary["fitness"])
