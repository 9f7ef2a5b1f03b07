"""Weight reconstruction: SparseGPT's OBS update (on a given mask, or its own), least squares for
structured pruning, layer by layer on the pruned model's own activations, in keys and exports."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import build_tiny, random_windows, run_cli, tiny_prune_args

from selfprune import reconstruct
from selfprune.core.errors import UserError
from selfprune.methods import sparsity
from selfprune.methods.sparsity import keep_mask, parse_pattern
from selfprune.model.arch import arch_of
from selfprune.reconstruct import layerwise, solvers


def correlated_inputs(n: int, width: int, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated channels of unequal scales, in no order (as real activations)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=g) / width ** 0.5 + torch.eye(width)
    scales = torch.linspace(0.2, 3.0, width)[torch.randperm(width, generator=g)]
    return torch.randn(n, width, generator=g) @ mix * scales


def output_error(weight: torch.Tensor, x: torch.Tensor, dense: torch.Tensor) -> float:
    return float((x @ weight.T - x @ dense.T).pow(2).mean())


@pytest.fixture
def layer() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(48, 256, generator=g), correlated_inputs(2048, 256)


def test_sparsegpt_keeps_the_given_mask_and_cuts_the_output_error(layer):
    w, x = layer
    keep = keep_mask(w.abs() * x.pow(2).mean(0).sqrt(), 0.6, parse_pattern("unstructured"))
    updated, used = solvers.sparsegpt(w, x.T @ x, keep)
    assert torch.equal(used, keep) and torch.equal(updated == 0, ~keep)  # zero exactly where the mask says
    masked = output_error(w * keep, x, w)
    assert output_error(updated, x, w) < 0.9 * masked  # the kept weights took over part of what the pruned ones did


@pytest.mark.parametrize("pattern,sparsity_", [("unstructured", 0.7), ("2:4", 0.5), ("4:8", 0.5)])
def test_adaptive_sparsegpt_chooses_its_own_mask_in_the_pattern(layer, pattern, sparsity_):
    w, x = layer
    pat = parse_pattern(pattern)
    updated, keep = solvers.sparsegpt(w, x.T @ x, None, sparsity_, pat)
    assert torch.equal(updated == 0, ~keep)
    if pat.kind == "nm":  # exactly N of every M consecutive inputs of a row survive
        assert torch.all(keep.reshape(48, -1, pat.m).sum(2) == pat.n)
    else:  # each block of 128 columns loses exactly its share, chosen across all rows
        for i in range(0, 256, solvers.BLOCK):
            assert int((~keep[:, i:i + solvers.BLOCK]).sum()) == int(48 * solvers.BLOCK * sparsity_)
    given = keep_mask(w.abs() * x.pow(2).mean(0).sqrt(), sparsity_, pat)
    assert output_error(updated, x, w) < output_error(w * given, x, w)


def test_least_squares_refit_is_the_best_fit_on_the_kept_inputs(layer):
    w, x = layer
    kept = torch.arange(0, 256, 2)
    fitted = solvers.least_squares(w, x.T @ x, kept)
    best = torch.linalg.lstsq(x[:, kept].double(), (x @ w.T).double()).solution.T.float()

    def err(cols: torch.Tensor) -> float:
        return float((x[:, kept] @ cols.T - x @ w.T).pow(2).mean())

    assert err(fitted) < 0.7 * err(w[:, kept])  # far better than keeping the columns as they were
    assert err(fitted) < 1.02 * err(best)  # and as good as the exact solution (1% dampening aside)


@pytest.mark.parametrize("how,pattern", [("sparsegpt", "unstructured"), ("sparsegpt", "2:4"),
                                         ("sparsegpt-adaptive", "unstructured")])
def test_a_reconstructed_model_is_closer_to_the_dense_one_and_leaves_it_alone(how, pattern):
    from selfprune.methods.wanda_sp import weight_scores
    from selfprune.model.stats import LINEAR_INPUT, capture

    model = build_tiny("llama_gqa")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    arch, windows = arch_of(model.config), random_windows(8, 64)
    per_layer = weight_scores(model, capture(model, windows))
    scores = lambda i: dict(zip(LINEAR_INPUT, per_layer(i)))  # noqa: E731
    pat = parse_pattern(pattern)
    rates = [pat.fixed_sparsity or 0.6] * arch.n_layers
    plain = sparsity.sparsify(model, arch, scores, rates, pat)
    rebuilt = layerwise.sparse_model(model, arch, windows, None if how == "sparsegpt-adaptive" else scores, rates, pat)
    with torch.no_grad():
        dense = model(windows).logits
        errors = [float((m(windows).logits - dense).pow(2).mean()) for m in (plain.model, rebuilt.model)]
    assert errors[1] < 0.9 * errors[0], errors
    if how == "sparsegpt":  # the metric's mask, exactly: the same zeros as without reconstruction
        assert rebuilt.layer_sparsity == plain.layer_sparsity
        for a, b in zip(plain.model.model.layers, rebuilt.model.model.layers):
            assert torch.equal(a.mlp.up_proj.weight == 0, b.mlp.up_proj.weight == 0)
    assert abs(rebuilt.realized - rates[0]) < 0.01
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the dense model untouched


def test_least_squares_refits_the_consumers_of_removed_units():
    from selfprune.methods import slicing, wanda_sp
    from selfprune.methods.structure import rates_to_structure
    from selfprune.model.stats import capture

    model = build_tiny("llama_gqa")
    arch, windows = arch_of(model.config), random_windows(8, 64)
    rankings = wanda_sp.rank(model, arch, capture(model, windows))
    structure = rates_to_structure(arch, [0.5, 0.3, 1.0, 0.0])
    plain = slicing.materialize(model, arch, rankings, structure)
    refit = layerwise.structured_model(model, arch, rankings, structure, windows)
    assert refit.config.selfprune_layers == plain.config.selfprune_layers
    with torch.no_grad():
        dense = model(windows).logits
        errors = [float((m(windows).logits - dense).pow(2).mean()) for m in (plain, refit)]
    assert errors[1] < 0.9 * errors[0], errors
    kept = refit.model.layers
    assert kept[1].mlp.up_proj.weight.shape == plain.model.layers[1].mlp.up_proj.weight.shape
    assert not torch.equal(kept[1].mlp.down_proj.weight, plain.model.layers[1].mlp.down_proj.weight)
    assert kept[3].mlp.down_proj.weight is model.model.layers[3].mlp.down_proj.weight  # nothing removed: shared


def test_a_reconstruction_joins_the_candidate_key_and_none_leaves_it_as_it_was():
    from dataclasses import replace

    from selfprune.engine.candidate import Sparse, from_json

    candidate = Sparse.of("wanda", "unstructured", 0.7, "uniform")
    plain = candidate.to_json()
    assert plain == {"metric": plain["metric"], "pattern": "unstructured", "allocation": "uniform", "sparsity": 0.7}
    assert replace(candidate, reconstruct="none").to_json() == plain
    rebuilt = Sparse.of("wanda", "unstructured", 0.7, "uniform", reconstruct="sparsegpt").to_json()
    assert rebuilt == plain | {"reconstruct": "sparsegpt", "reconstruct_version": reconstruct.RECONSTRUCT_VERSION}
    assert replace(candidate, reconstruct="sparsegpt-adaptive").to_json() != rebuilt
    assert from_json(rebuilt).to_json() == rebuilt and from_json(plain) == candidate  # read back as written
    with pytest.raises(UserError, match="lsq"):
        replace(candidate, reconstruct="lsq")  # a structured refit is no sparse candidate's


def test_cli_prunes_with_reconstruction_and_the_export_loads_back(tiny_workspace, tmp_path, capsys, monkeypatch):
    import selfprune

    for name, extra in [("sgpt", ["--metric", "wanda", "--reconstruct", "sparsegpt", "--sparsity", "0.6"]),
                        ("lsq", ["--reconstruct", "lsq", "--ratio", "0.4"])]:
        code, _, err = run_cli(capsys, monkeypatch, *tiny_prune_args(tiny_workspace, tmp_path / name, *extra))
        assert code == 0, err
        record = json.loads((tmp_path / name / "selfprune.json").read_text())
        assert record["reconstruct"] == {"name": extra[extra.index("--reconstruct") + 1],
                                         "version": reconstruct.RECONSTRUCT_VERSION}
    plain = selfprune.prune(str(tiny_workspace / "model"), 0.4, data=str(tiny_workspace / "corpus.txt"), samples=4,
                            calib_seqlen=64, device="cpu")
    loaded = selfprune.load_pruned(tmp_path / "lsq", device="cpu")
    down = loaded.model.model.layers[0].mlp.down_proj.weight
    assert down.shape == plain.model.model.layers[0].mlp.down_proj.weight.shape
    assert not torch.equal(down, plain.model.model.layers[0].mlp.down_proj.weight)


@pytest.mark.parametrize("extra,message", [
    (["--metric", "wanda", "--reconstruct", "lsq"], "--reconstruct lsq applies to structured pruning"),
    (["--reconstruct", "sparsegpt"], "use lsq"),
    (["--metric", "wanda", "--reconstruct", "sparsegpt-adaptive"], "chooses its own mask"),
    (["--reconstruct", "obs"], "unknown reconstruction 'obs'"),
])
def test_cli_refuses_a_reconstruction_that_does_not_fit_before_loading(tiny_workspace, tmp_path, capsys, monkeypatch,
                                                                      extra, message):
    code, _, err = run_cli(capsys, monkeypatch, *tiny_prune_args(tiny_workspace, tmp_path / "bad", *extra))
    assert code == 2 and message in " ".join(err.split()), err
    assert not (tmp_path / "bad").exists()


def test_report_rows_with_reconstruction(tiny_workspace, tmp_path):
    from selfprune.config import ReportConfig
    from selfprune.evaluate.report import report

    summary = report(ReportConfig(model=str(tiny_workspace / "model"), data=str(tiny_workspace / "corpus.txt"),
                                  samples=4, calib_seqlen=64, seqlen=64, test_windows=4, device="cpu", ratios=[],
                                  allocations=[], metrics=["wanda"], sparsities=[0.6], metric_allocations=["uniform"],
                                  reconstructs=["none", "sparsegpt"], cloze_items=4, limit=2,
                                  out=str(tmp_path / "report")))
    rows = {r.label: r for r in summary.rows}
    assert {"wanda uniform", "wanda uniform + sparsegpt"} <= set(rows)
    assert rows["wanda uniform + sparsegpt"].structure["reconstruct"] == "sparsegpt"
    assert rows["wanda uniform + sparsegpt"].ppl != rows["wanda uniform"].ppl


def test_prune_help_names_every_registered_reconstruction(capsys, monkeypatch):
    code, out, _ = run_cli(capsys, monkeypatch, "prune", "--help")
    text = " ".join(out.split())
    assert code == 0 and all(name in text for name in ["none", *reconstruct.RECONSTRUCTIONS.names()])
