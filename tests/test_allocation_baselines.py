"""The literature's allocation baselines (ATP, DLP, AlphaPruning): each rule against a hand-computed
example, then each on a tiny model for structured and unstructured rates (mean = target, bounds,
determinism), and the cache keys of the one that tunes itself on perplexity."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from helpers import run_cli, tiny_prune_args

from selfprune import allocators
from selfprune.allocators import alphapruning, atp, dlp
from selfprune.allocators.rates import MEAN_TOLERANCE
from selfprune.core.errors import UserError
from selfprune.methods.sparsity import parse_pattern
from selfprune.methods.structure import realized_ratio

BASELINES = ["atp", "dlp", "alphapruning"]


def test_the_baselines_are_registered_after_the_built_ins():
    assert allocators.ALLOCATIONS.names()[:6] == ["uniform", "owl", "sdsa", *BASELINES]
    assert [allocators.tunes(n) for n in allocators.ALLOCATIONS.names()[:6]] == [False] * 3 + [True, False, False]


def test_atp_rule_by_hand():
    # L = 5, beta = 0.5, step 0.05: first = 0.5 - 0.05 * 4 / 2 = 0.4, then +0.05 per layer
    assert atp.progression(5, 0.5, 0.05) == pytest.approx([0.4, 0.45, 0.5, 0.55, 0.6])
    # largest legal step: min(2 * 0.5, 2 * 0.5) / 4 = 0.25; at beta = 0.7, L = 4: min(1.4, 0.6) / 3 = 0.2
    assert atp.max_step(5, 0.5) == pytest.approx(0.25) and atp.max_step(4, 0.7) == pytest.approx(0.2)
    assert atp.max_step(1, 0.5) == 0.0
    # the grid: 0, 1/5, ..., 4/5 of 0.25
    assert atp.steps(5, 0.5) == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    arch = SimpleNamespace(n_layers=5)
    # a fitness that prefers step 0.1: rates 0.5 - 0.1 * 2 + 0.1 i = [0.3, 0.4, 0.5, 0.6, 0.7]
    prefers_0_1 = lambda rates: abs((rates[1] - rates[0]) - 0.1)  # noqa: E731
    assert atp.atp(None, arch, {}, 0.5, fitness=prefers_0_1) == pytest.approx([0.3, 0.4, 0.5, 0.6, 0.7])
    assert atp.atp(None, arch, {}, 0.5, fitness=lambda rates: 1.0) == [0.5] * 5  # a tie: the smaller step, uniform
    with pytest.raises(UserError, match="fitness split"):
        atp.atp(None, arch, {}, 0.5)


def test_dlp_rule_by_hand():
    # a layer's median over all its linears' scores: [1, 5, 3] and [2, 9] pool to 1 2 3 5 9 -> 3
    assert dlp.median_score([torch.tensor([1.0, 5.0, 3.0]), torch.tensor([[2.0, 9.0]])]) == 3.0
    # medians 1 2 3 4 (sum 10): importance 0.9 0.8 0.7 0.6; min-max -> 1, 2/3, 1/3, 0; x 2 alpha (0.3)
    # -> 0.3 0.2 0.1 0 (mean 0.15); rates 0.5 - (s - 0.15) = 0.35 0.45 0.55 0.65
    assert dlp.importance([1, 2, 3, 4]) == pytest.approx([0.9, 0.8, 0.7, 0.6])
    assert dlp.rates([1, 2, 3, 4], 0.5) == pytest.approx([0.35, 0.45, 0.55, 0.65])
    assert dlp.rates([2.0] * 3, 0.4) == pytest.approx([0.4] * 3)  # equal medians: uniform


def test_alphapruning_rule_by_hand():
    # alphas 2 3 4 6, eps 0.2: phi = 0.8 + 0.4 (a - 2) / 4 = 0.8 0.9 1.0 1.2 (mean 0.975);
    # rates 0.5 phi / 0.975 = 0.41026 0.46154 0.51282 0.61538: higher alpha, pruned more
    assert alphapruning.rates([2, 3, 4, 6], 0.5, epsilon=0.2) == pytest.approx(
        [0.4 / 0.975, 0.45 / 0.975, 0.5 / 0.975, 0.6 / 0.975])
    # beta 0.9, eps 0.3, alphas 1 2: phi 0.7 1.3 (mean 1) -> 0.63 1.17; past 1, so projected: 0.8 1.0
    assert alphapruning.rates([1, 2], 0.9) == pytest.approx([0.8, 1.0])
    # eigenvalues of W^T W are the squared singular values: diag(1, 2, 3) -> 1 4 9
    assert alphapruning.eigenvalues(torch.diag(torch.tensor([3.0, 1.0, 2.0]))).tolist() == [1.0, 4.0, 9.0]
    # Hill above x_min = 1 of 1, e, e^2: 1 + 3 / (0 + 1 + 2) = 2
    assert alphapruning.hill(torch.tensor([1.0, math.e, math.e ** 2], dtype=torch.float64), 0) == pytest.approx(2.0)
    # KS distance of the fit alpha = 2 above 1 to 1, e, e^2: |1 - e^-j - j/3| for j = 0 1 2 -> max at j = 1
    assert alphapruning.ks_distance(torch.tensor([1.0, math.e, math.e ** 2], dtype=torch.float64), 0, 2.0) == \
        pytest.approx(max(abs(1 - math.exp(-j) - j / 3) for j in range(3)))
    # a Pareto sample with density ~ x^-3 (P(X > x) = x^-2): the estimate finds alpha = 3
    pareto = (torch.rand(2000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) ** -0.5).sort().values
    assert alphapruning.pl_alpha_hill(pareto) == pytest.approx(3.0, abs=0.15)


def test_a_heavier_tailed_layer_gets_a_smaller_alpha():
    """The direction AlphaPruning rests on: a spectrum with a power-law tail of exponent 2 reads a
    smaller alpha than one of exponent 4, so its layer is pruned less."""
    u = torch.rand(1000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    heavy, light = (u ** -1.0).sort().values, (u ** (-1 / 3)).sort().values  # P(X > x) = x^-1, x^-3
    a_heavy, a_light = alphapruning.pl_alpha_hill(heavy), alphapruning.pl_alpha_hill(light)
    assert a_heavy < a_light
    low, high = alphapruning.rates([a_heavy, a_light], 0.5)
    assert low < 0.5 < high


@pytest.fixture(scope="module")
def bench(tiny_workspace):
    from selfprune.engine.models import load_model
    from selfprune.engine.settings import Calibration
    from selfprune.engine.workbench import Workbench

    lm = load_model(str(tiny_workspace / "model"), "cpu")
    return Workbench(lm, Calibration(str(tiny_workspace / "corpus.txt"), 4, 64))


def check_rates(rates: list[float], ratio: float, n_layers: int) -> None:
    assert len(rates) == n_layers
    assert abs(sum(rates) / n_layers - ratio) <= MEAN_TOLERANCE
    assert all(0.0 <= r < 1.0 for r in rates)


@pytest.mark.parametrize("spec", BASELINES)
def test_structured_rates_on_a_tiny_model(bench, spec):
    rates = bench.pruner.allocate(spec, 0.4)
    check_rates(rates, 0.4, bench.arch.n_layers)
    assert bench.pruner.allocate(spec, 0.4) == rates  # deterministic
    assert abs(realized_ratio(bench.arch, bench.pruner.structure(rates)) - 0.4) < 0.05
    if spec != "atp":  # ATP may find uniform best; the others read a signal that differs by layer
        assert rates != pytest.approx([0.4] * bench.arch.n_layers)


@pytest.mark.parametrize("spec", BASELINES)
def test_unstructured_rates_on_a_tiny_model(bench, spec):
    from selfprune.metrics import resolve_metric

    rates, result = bench.pruner.sparse(resolve_metric("wanda"), spec, 0.6, parse_pattern("unstructured"))
    check_rates(rates, 0.6, bench.arch.n_layers)
    assert bench.pruner.sparse(resolve_metric("wanda"), spec, 0.6, parse_pattern("unstructured"))[0] == rates
    assert abs(result.realized - 0.6) < 0.01 and all(abs(s - r) < 0.02 for s, r in zip(result.layer_sparsity, rates))


def test_dlp_reads_the_metric_and_alphapruning_the_weights_alone(bench):
    from selfprune.metrics import resolve_metric

    pattern = parse_pattern("unstructured")
    by_metric = {s: {m: bench.pruner.sparse_rates(resolve_metric(m), s, 0.5, pattern) for m in ("wanda", "magnitude")}
                 for s in ("dlp", "alphapruning")}
    assert by_metric["dlp"]["wanda"] != by_metric["dlp"]["magnitude"]
    assert by_metric["dlp"]["wanda"] == pytest.approx(bench.pruner.allocate("dlp", 0.5))  # Wanda's scores are the default
    weights_alone = bench.pruner.allocate("alphapruning", 0.5)
    assert by_metric["alphapruning"]["wanda"] == by_metric["alphapruning"]["magnitude"] == weights_alone


@pytest.mark.parametrize("metric", [None, "wanda"])
def test_atp_picks_the_grid_point_of_lowest_fitness_perplexity(bench, metric):
    """The chosen progression is the argmin of perplexity on the fitness windows over the grid,
    measured here independently on the structured (or the metric's sparse) candidates."""
    from selfprune.engine.settings import allocation_scoring
    from selfprune.methods import sparsity
    from selfprune.metrics import resolve_metric
    from selfprune.model.ppl import perplexity

    n, ratio, scoring = bench.arch.n_layers, 0.5, allocation_scoring(bench.calibrated.calibration)
    if metric is None:
        chosen, build = bench.pruner.allocate("atp", ratio), lambda r: bench.pruner.structured(bench.pruner.structure(r))
    else:
        pattern, scores = parse_pattern("unstructured"), bench.pruner.metric_scores(resolve_metric(metric))
        chosen = bench.pruner.sparse_rates(resolve_metric(metric), "atp", ratio, pattern)
        build = lambda r: sparsity.sparsify(bench.lm.model, bench.arch, scores, r, pattern).model  # noqa: E731
    grid = [atp.progression(n, ratio, s) for s in atp.steps(n, ratio)]
    ppl = [perplexity(build(r), bench.scorer.windows(scoring), scoring.batch_size).ppl for r in grid]
    assert chosen == grid[ppl.index(min(ppl))]
    assert len(set(ppl)) > 1  # the grid's candidates really differ


def test_the_report_entry_of_each_baseline(bench):
    from selfprune.evaluate.report import allocation_entry
    from selfprune.metrics import resolve_metric

    for spec in BASELINES:
        entry = allocation_entry(bench, spec, 0.6, "wanda", "unstructured")
        assert entry["candidate"] == {"metric": "X_rms * abs(W)", "pattern": "unstructured", "allocation": spec,
                                      "sparsity": 0.6}
        check_rates(entry["rates"], 0.6, bench.arch.n_layers)
        assert entry["rates"] == bench.pruner.sparse_rates(resolve_metric("wanda"), spec, 0.6, parse_pattern("unstructured"))


def test_n_m_takes_only_the_uniform_allocation():
    """N:M prunes exactly 1 - N/M of every layer, so no allocation applies there (checked before a
    model loads); the baselines are refused like OWL and SDSA."""
    import selfprune

    for spec in BASELINES:
        with pytest.raises(UserError, match="2:4 prunes exactly 0.5 of every layer.*uniform"):
            selfprune.prune("no-model-needed", 0.5, spec, metric="wanda", pattern="2:4")


def test_cache_keys_name_what_atp_tunes_on(tiny_workspace):
    from selfprune.data.corpora import data_fingerprint
    from selfprune.engine.candidate import from_json
    from selfprune.engine.identity import allocation_task, candidate_task
    from selfprune.engine.settings import Calibration, ModelSpec, Scoring

    calibration = Calibration(str(tiny_workspace / "corpus.txt"), 4, 64, 4)
    spec = ModelSpec("model", "m", "cpu", "float32", "wanda-sp")
    common = dict(spec=spec, stats_key="s", ratio=0.5, calibration=calibration)
    owl = allocation_task(allocation="owl", **common)
    assert owl == {"model": "m", "stats": "s", "allocation": "owl", "ratio": 0.5}  # as before: no recompute
    fitness = {"data": data_fingerprint(calibration.data, "fitness"), "split": "fitness", "seqlen": 64, "windows": 8}
    structured = allocation_task(allocation="atp", **common)
    assert structured["allocation_fitness"] == fitness and structured["method"]["name"] == "wanda-sp"
    assert structured != allocation_task(allocation="atp", **common | {"spec": replace(spec, method="metric:abs(W)")})
    sparse = allocation_task(allocation="atp", metric="wanda", pattern="unstructured", **common)
    assert sparse["allocation_fitness"] == fitness and "method" not in sparse

    key = dict(spec=spec, stats_key="s", scoring=Scoring(calibration.data, "test", 64, 4, 4), calibration=calibration)
    candidate = {"metric": "X_rms * abs(W)", "pattern": "unstructured", "sparsity": 0.5}
    assert candidate_task(candidate=from_json(candidate | {"allocation": "atp"}), **key)["allocation_fitness"] == fitness
    assert "allocation_fitness" not in candidate_task(candidate=from_json(candidate | {"allocation": "dlp"}), **key)
    assert "allocation_fitness" not in candidate_task(candidate=from_json([[2, 96]] * 4), **key)


@pytest.mark.parametrize("spec", BASELINES)
def test_cli_prunes_with_each_baseline(tiny_workspace, tmp_path, capsys, monkeypatch, spec):
    import json

    code, _, err = run_cli(capsys, monkeypatch, *tiny_prune_args(tiny_workspace, tmp_path / spec, "--ratio", "0.4",
                                                                 "--allocation", spec))
    assert code == 0, err
    record = json.loads((tmp_path / spec / "selfprune.json").read_text())
    assert record["method"] == f"wanda-sp/{spec}"
    check_rates(record["rates"], 0.4, 4)


def test_atp_tunes_once_per_metric_and_sparsity_in_a_process(tiny_workspace):
    """A report row builds its candidate for the perplexity and again for zero-shot: ATP's tuning
    (a perplexity pass per grid point) runs once, and another metric or sparsity tunes anew."""
    from selfprune.engine.models import load_model
    from selfprune.engine.settings import Calibration
    from selfprune.engine.workbench import Workbench
    from selfprune.metrics import resolve_metric

    bench = Workbench(load_model(str(tiny_workspace / "model"), "cpu"), Calibration(str(tiny_workspace / "corpus.txt"), 4, 64))
    passes = []
    perplexity = bench.scorer.perplexity
    bench.scorer.perplexity = lambda model, scoring: passes.append(1) or perplexity(model, scoring)
    pattern = parse_pattern("unstructured")
    first = bench.pruner.sparse_rates(resolve_metric("wanda"), "atp", 0.6, pattern)
    grid = len(passes)
    assert grid == len(atp.steps(bench.arch.n_layers, 0.6)) > 1
    assert bench.pruner.sparse(resolve_metric("wanda"), "atp", 0.6, pattern)[0] == first and len(passes) == grid
    bench.pruner.sparse_rates(resolve_metric("magnitude"), "atp", 0.6, pattern)
    bench.pruner.sparse_rates(resolve_metric("wanda"), "atp", 0.5, pattern)
    assert len(passes) > 2 * grid
    first.append(0.0)  # the caller's list, not the memo's
    assert len(bench.pruner.sparse_rates(resolve_metric("wanda"), "atp", 0.6, pattern)) == bench.arch.n_layers
