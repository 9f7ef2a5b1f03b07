"""Pruning single weights by a metric (unstructured, per layer, N:M), SDSA, and the export round trip,
on tiny real models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import build_tiny, random_windows, run_cli, tiny_prune_args

from selfprune.allocators.sdsa import SDSA_LAMBDA, sdsa_rates, skewness
from selfprune.core.errors import UserError
from selfprune.methods import sparsity
from selfprune.methods.sparsity import keep_mask, parse_pattern
from selfprune.model import stats


def test_unstructured_prunes_the_lowest_scores_of_each_row():
    scores = torch.randn(8, 40, generator=torch.Generator().manual_seed(0))
    keep = keep_mask(scores, 0.3, parse_pattern("unstructured"))
    assert (~keep).sum(1).tolist() == [12] * 8
    for row, k in zip(scores, keep):
        assert row[~k].max() < row[k].min()


def test_per_layer_pattern_compares_the_whole_matrix():
    scores = torch.arange(40.0).reshape(4, 10)  # row 0 holds the 10 lowest scores
    keep = keep_mask(scores, 0.25, parse_pattern("unstructured-layer"))
    assert (~keep).sum() == 10 and not keep[0].any() and keep[1:].all()


@pytest.mark.parametrize("text,n,m", [("2:4", 2, 4), ("4:8", 4, 8)])
def test_n_m_keeps_n_of_every_m_consecutive_inputs(text, n, m):
    scores = torch.randn(6, 32, generator=torch.Generator().manual_seed(1))
    pattern = parse_pattern(text)
    keep = keep_mask(scores, pattern.fixed_sparsity, pattern)
    groups, kept = scores.reshape(6, -1, m), keep.reshape(6, -1, m)
    assert (kept.sum(2) == n).all()
    assert (groups.masked_fill(~kept, math.inf).min(2).values >= groups.masked_fill(kept, -math.inf).max(2).values).all()
    with pytest.raises(UserError, match=f"divisible by {m}"):
        keep_mask(torch.randn(2, m + 1), 0.5, pattern)


@pytest.mark.parametrize("bad", ["3:2", "0:4", "2-4", "structured", "2:4:8"])
def test_bad_patterns_name_the_choices(bad):
    with pytest.raises(UserError, match="unstructured-layer.*2:4"):
        parse_pattern(bad)


def test_sdsa_prunes_skewed_layers_less_with_the_exact_mean():
    skews = [0.5, 8.0, 1.0, 3.0, 0.2, 12.0]
    rates = sdsa_rates(skews, 0.6)
    assert abs(sum(rates) / len(rates) - 0.6) < 1e-9
    assert all(abs(r - 0.6) <= SDSA_LAMBDA + 1e-9 for r in rates)
    order = sorted(range(len(skews)), key=skews.__getitem__)
    assert [rates[i] for i in order] == sorted(rates, reverse=True)  # more skew, less sparsity
    assert sdsa_rates([2.0] * 4, 0.5) == [0.5] * 4  # no skew difference: uniform


def test_skewness_of_known_distributions():
    g = torch.Generator().manual_seed(0)
    assert abs(skewness([torch.randn(200_000, generator=g)])) < 0.05
    exponential = -torch.log(torch.rand(200_000, generator=g))
    assert abs(skewness([exponential]) - 2.0) < 0.1  # the exponential's skewness is 2


@pytest.fixture(scope="module")
def bench(tiny_workspace):
    from selfprune.engine.models import load_model
    from selfprune.engine.settings import Calibration
    from selfprune.engine.workbench import Workbench

    lm = load_model(str(tiny_workspace / "model"), "cpu")
    return Workbench(lm, Calibration(str(tiny_workspace / "corpus.txt"), 4, 64))


@pytest.mark.parametrize("spec", ["uniform", "owl", "sdsa"])
def test_sparsify_reaches_the_target_and_leaves_the_dense_model_alone(bench, spec):
    from selfprune.metrics import resolve_metric

    before = {k: v.clone() for k, v in bench.lm.model.state_dict().items()}
    rates, result = bench.pruner.sparse(resolve_metric("wanda"), spec, 0.5, parse_pattern("unstructured"))
    assert abs(sum(rates) / len(rates) - 0.5) < 1e-6
    assert abs(result.realized - 0.5) < 0.01 and all(abs(s - r) < 0.02 for s, r in zip(result.layer_sparsity, rates))
    assert sparsity.zeros(bench.arch, rates, parse_pattern("unstructured")) / sparsity.weights(bench.arch) == result.realized
    after = bench.lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert result.model.model.layers[0].mlp.down_proj.weight is not bench.lm.model.model.layers[0].mlp.down_proj.weight
    assert result.model.model.embed_tokens.weight is bench.lm.model.model.embed_tokens.weight  # shared, not copied


@pytest.mark.parametrize("pattern", ["unstructured-layer", "2:4"])
def test_zeros_are_known_from_the_shapes(bench, pattern):
    from selfprune.metrics import resolve_metric

    pat = parse_pattern(pattern)
    rates, result = bench.pruner.sparse(resolve_metric("magnitude"), "uniform", pat.fixed_sparsity or 0.3, pat)
    assert sparsity.zeros(bench.arch, rates, pat) / sparsity.weights(bench.arch) == result.realized


def test_the_wanda_metric_prunes_what_wanda_prunes(bench):
    """Wanda by hand: per output row, drop the lowest |W_ij| * ||x_j||."""
    from selfprune.metrics import resolve_metric

    _, result = bench.pruner.sparse(resolve_metric("wanda"), "uniform", 0.5, parse_pattern("unstructured"))
    w = bench.lm.model.model.layers[1].self_attn.o_proj.weight.detach()
    score = w.abs() * stats.mean_sq(bench.calibrated.stats, 1, "attn_in").sqrt()
    expected = w * keep_mask(score, 0.5, parse_pattern("unstructured"))
    torch.testing.assert_close(result.model.model.layers[1].self_attn.o_proj.weight, expected, rtol=0, atol=0)


def test_owl_and_sdsa_read_outliers_from_the_metric(bench):
    from selfprune.metrics import resolve_metric

    pattern = parse_pattern("unstructured")
    by_metric = {m: bench.pruner.sparse(resolve_metric(m), "sdsa", 0.5, pattern)[0] for m in ("wanda", "magnitude")}
    assert by_metric["wanda"] != by_metric["magnitude"]


def test_export_round_trip_keeps_the_zeros_and_the_perplexity(tiny_workspace, tmp_path):
    import selfprune

    result = selfprune.prune(str(tiny_workspace / "model"), 0.5, "uniform", str(tiny_workspace / "corpus.txt"),
                             samples=4, calib_seqlen=64, device="cpu", metric="ria", pattern="2:4", out=tmp_path / "ria")
    assert result.record["pattern"] == "2:4" and result.record["realized_sparsity"] == 0.5
    loaded = selfprune.load_pruned(tmp_path / "ria", device="cpu")
    for k, v in result.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[k], v, rtol=0, atol=0)
    ids = random_windows(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, result.model(ids).logits)


def test_cli_prunes_by_a_metric_expression(tiny_workspace, tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(capsys, monkeypatch, *tiny_prune_args(
        tiny_workspace, tmp_path / "expr", "--metric", "abs(W) * X_rms ** 2", "--sparsity", "0.6", "--allocation", "sdsa"))
    assert code == 0, err
    record = json.loads((tmp_path / "expr" / "selfprune.json").read_text())
    assert record["metric"]["text"] == "X_rms ** 2 * abs(W)" and record["pattern"] == "unstructured"
    assert abs(record["realized_sparsity"] - 0.6) < 0.01 and "realized sparsity" in " ".join(err.split())


@pytest.mark.parametrize("extra,message", [
    (["--metric", "wanda", "--pattern", "2:4", "--sparsity", "0.6"], "2:4 prunes exactly 0.5"),
    (["--metric", "wanda", "--pattern", "2:4", "--allocation", "owl"], "2:4 prunes exactly 0.5"),
    (["--metric", "__import__('os').system('true')"], "not allowed"),
    (["--metric", "wanda", "--format", "deci"], "exports as hf"),
    (["--metric", "wanda", "--pattern", "3:2"], "not a sparsity pattern"),
])
def test_cli_refuses_bad_metric_settings_before_loading(tiny_workspace, tmp_path, capsys, monkeypatch, extra, message):
    code, _, err = run_cli(capsys, monkeypatch, *tiny_prune_args(tiny_workspace, tmp_path / "bad", *extra))
    assert code == 2 and message in err, err
    assert not (tmp_path / "bad").exists()


def test_gradient_statistic_is_the_root_of_summed_per_window_squares():
    from selfprune.engine import gradients

    model = build_tiny("llama_gqa")
    model.requires_grad_(False)
    windows = random_windows(3, 16)
    g = gradients.capture(model, windows)
    w = model.model.layers[2].mlp.up_proj.weight
    expected = torch.zeros_like(w)
    for window in windows:
        w.requires_grad_(True)
        loss = model(input_ids=window[None], labels=window[None]).loss
        (grad,) = torch.autograd.grad(loss, w)
        expected += grad.pow(2)
        w.requires_grad_(False)
    torch.testing.assert_close(g["2.mlp.up_proj"], expected.sqrt())
    assert len(g) == 4 * 7 and not any(p.requires_grad or p.grad is not None for p in model.parameters())


def test_a_gradient_metric_is_computed_once_and_stored(tiny_workspace, monkeypatch):
    from selfprune.engine import gradients
    from selfprune.engine.models import load_model
    from selfprune.engine.settings import Calibration
    from selfprune.engine.workbench import Workbench
    from selfprune.metrics import resolve_metric

    calibration = Calibration(str(tiny_workspace / "corpus.txt"), 4, 64)
    first = Workbench(load_model(str(tiny_workspace / "model"), "cpu"), calibration)
    _, a = first.pruner.sparse(resolve_metric("pruner-zero"), "uniform", 0.5, parse_pattern("unstructured"))
    again = Workbench(load_model(str(tiny_workspace / "model"), "cpu"), calibration)
    monkeypatch.setattr(gradients, "capture", lambda *a, **k: pytest.fail("G was computed again"))
    again_grads = again.calibrated.gradients()  # from the store: equal to the first computation
    assert all(torch.equal(again_grads[k], v) for k, v in first.calibrated.gradients().items())
    _, b = again.pruner.sparse(resolve_metric("pruner-zero"), "uniform", 0.5, parse_pattern("unstructured"))
    assert abs(a.realized - 0.5) < 0.01
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_a_metric_ranks_units_by_the_scores_of_the_weights_they_own(bench):
    from selfprune.methods.registry import unit_scores

    arch = bench.arch
    layer = bench.lm.model.model.layers[3]
    w = {p: layer.get_submodule(p).weight.detach().abs().double() for p in stats.LINEAR_INPUT}
    groups, channels = unit_scores(arch, {p: v.float() for p, v in w.items()})
    hd, per = arch.head_dim, arch.group_size * arch.head_dim
    for g in range(arch.n_kv_heads):
        expected = (w["self_attn.q_proj"][g * per:(g + 1) * per].sum() + w["self_attn.k_proj"][g * hd:(g + 1) * hd].sum()
                    + w["self_attn.v_proj"][g * hd:(g + 1) * hd].sum() + w["self_attn.o_proj"][:, g * per:(g + 1) * per].sum())
        assert abs(groups[g] - expected) < 1e-3 * expected
    c = 5
    expected = w["mlp.gate_proj"][c].sum() + w["mlp.up_proj"][c].sum() + w["mlp.down_proj"][:, c].sum()
    assert abs(channels[c] - expected) < 1e-3 * expected


@pytest.mark.slow
def test_search_by_a_metric_shares_nothing_with_wanda_sp_and_resumes_from_its_own_cache(prefect_api, tiny_workspace, tmp_path):
    from selfprune.config import SearchConfig
    from selfprune.flows.search import search

    small = dict(model=str(tiny_workspace / "model"), data=str(tiny_workspace / "corpus.txt"), ratio=0.4, population=4,
                 mutations=2, crossovers=2, generations=1, samples=4, calib_seqlen=64, seqlen=64, fitness_windows=4,
                 test_windows=4, device="cpu")
    wanda = search(SearchConfig(**small, out=str(tmp_path / "wanda")))
    ria = search(SearchConfig(**small, metric="ria", out=str(tmp_path / "ria")))
    assert ria["cache_hits"] == 0 and ria["config"]["method"] == "metric:ria"
    assert ria["uniform_test_ppl"] != wanda["uniform_test_ppl"]  # other units pruned at the same rates
    again = search(SearchConfig(**small, metric="X_rms ** 0.5 * (abs(W) / colsum(abs(W)) + abs(W) / rowsum(abs(W)))",
                                out=str(tmp_path / "ria-spelled-out")))
    assert again["evaluations"] == 0 and again["fitness"] == ria["fitness"]  # one canonical metric, one cache
