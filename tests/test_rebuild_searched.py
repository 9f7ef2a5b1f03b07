"""``prune --allocation best.json`` rebuilds the searched model: a search's best.json records every
setting that decides which units survive, the ratio included, and a prune from it uses them unless
told otherwise (a ratio its rates do not average: exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import run_cli
from safetensors.torch import load_file

# Settings no default shares: a prune that ignored them would keep other units.
SEARCHED = dict(ratio=0.4, samples=6, calib_seqlen=48, seqlen=64, population=4, mutations=1, crossovers=1,
                generations=1, fitness_windows=2, test_windows=4, device="cpu", baselines="none")


@pytest.fixture(scope="module")
def searched(tiny_workspace, tmp_path_factory) -> tuple[Path, dict]:
    """A real (tiny) search through the library: its best.json and what it holds."""
    import selfprune

    out = tmp_path_factory.mktemp("rebuild") / "search"
    selfprune.search(model=str(tiny_workspace / "model"), data=str(tiny_workspace / "corpus.txt"), out=str(out),
                     **SEARCHED)
    return out / "best.json", json.loads((out / "best.json").read_text())


def tensors(export: Path) -> dict[str, torch.Tensor]:
    found = {}
    for shard in sorted(export.glob("*.safetensors")):
        found |= load_file(shard)
    assert found, f"no weights in {export}"
    return found


def test_prune_from_best_json_rebuilds_the_searched_model(searched, tiny_workspace, tmp_path, capsys, monkeypatch):
    import selfprune

    best_json, best = searched
    code, _, err = run_cli(capsys, monkeypatch, "prune", "--model", str(tiny_workspace / "model"), "--ratio", "0.4",
                           "--allocation", str(best_json), "--device", "cpu", "--out", str(tmp_path / "rebuilt"))
    assert code == 0, err
    line = " ".join(err.split())
    assert "from best.json" in line and "--samples 6" in line and "--calib-seqlen 48" in line and "differ" not in line
    expected = selfprune.prune(str(tiny_workspace / "model"), 0.4, best["rates"], str(tiny_workspace / "corpus.txt"),
                               samples=6, calib_seqlen=48, device="cpu", out=tmp_path / "expected")
    assert expected.record["structure"] == best["structure"]
    rebuilt, wanted = tensors(tmp_path / "rebuilt"), tensors(tmp_path / "expected")
    assert rebuilt.keys() == wanted.keys()
    assert all(torch.equal(rebuilt[k], wanted[k]) for k in wanted), "the rebuilt weights differ from the searched model's"
    assert json.loads((tmp_path / "rebuilt" / "selfprune.json").read_text())["structure"] == best["structure"]
    ppl = selfprune.perplexity(str(tmp_path / "rebuilt"), str(tiny_workspace / "corpus.txt"), "test", seqlen=64,
                               windows=4, device="cpu")
    assert ppl["ppl"] == best["test_ppl"]


def test_an_explicit_setting_overrides_best_json_and_says_the_model_differs(searched, tiny_workspace, tmp_path, capsys,
                                                                           monkeypatch):
    best_json, _ = searched
    code, _, err = run_cli(capsys, monkeypatch, "prune", "--model", str(tiny_workspace / "model"), "--ratio", "0.4",
                           "--allocation", str(best_json), "--samples", "5",
                           "--device", "cpu", "--out", str(tmp_path / "other"))
    assert code == 0, err
    lines = [line for line in err.splitlines() if "best.json" in line]
    assert len(lines) == 1, err
    line = " ".join(err.split())
    assert "--calib-seqlen 48" in line and "--samples 5" in line and "the search used 6" in line
    assert "differ from the searched one" in line
    record = json.loads((tmp_path / "other" / "selfprune.json").read_text())
    assert record["calibration"]["samples"] == 5 and record["calibration"]["seqlen"] == 48


def test_without_ratio_prune_takes_the_searched_one(searched, tiny_workspace, tmp_path, capsys, monkeypatch):
    """The search ran at 0.4, not the default 0.5 (which its rates do not average): no --ratio is needed."""
    best_json, best = searched
    code, _, err = run_cli(capsys, monkeypatch, "prune", "--model", str(tiny_workspace / "model"),
                           "--allocation", str(best_json), "--device", "cpu", "--out", str(tmp_path / "rebuilt"))
    assert code == 0, err
    line = " ".join(err.split())
    assert "from best.json: --ratio 0.4 " in line and "differ" not in line and "(target 0.4)" in line
    assert json.loads((tmp_path / "rebuilt" / "selfprune.json").read_text())["structure"] == best["structure"]


def test_a_ratio_that_contradicts_best_json_exits_2_before_any_work(searched, tiny_workspace, tmp_path, capsys,
                                                                    monkeypatch):
    best_json, _ = searched
    code, _, err = run_cli(capsys, monkeypatch, "prune", "--model", str(tiny_workspace / "model"), "--ratio", "0.5",
                           "--allocation", str(best_json), "--device", "cpu", "--out", str(tmp_path / "other"))
    line = " ".join(err.split())
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert "--ratio 0.5 contradicts best.json" in line and "at --ratio 0.4" in line and "drop --ratio" in line
    assert not (tmp_path / "other").exists()


def test_the_library_takes_the_same_settings(searched, tiny_workspace):
    import selfprune
    from selfprune.core.errors import UserError

    best_json, best = searched
    result = selfprune.prune(str(tiny_workspace / "model"), allocation=str(best_json), device="cpu")
    assert result.record["structure"] == best["structure"] and result.ratio == 0.4
    assert result.record["calibration"]["samples"] == 6 and "from best.json: --ratio 0.4 " in result.settings_note
    assert selfprune.prune(str(tiny_workspace / "model"), 0.4, str(best_json), device="cpu").record == result.record
    with pytest.raises(UserError, match="--ratio 0.3 contradicts best.json"):
        selfprune.prune(str(tiny_workspace / "model"), 0.3, str(best_json), device="cpu")


def test_a_sparsity_search_is_rebuilt_with_its_metric_and_pattern(tiny_workspace, tmp_path, capsys, monkeypatch):
    import selfprune

    model, corpus = str(tiny_workspace / "model"), str(tiny_workspace / "corpus.txt")
    best = selfprune.search(model=model, data=corpus, out=str(tmp_path / "s"), metric="ria", pattern="unstructured",
                            **SEARCHED)
    code, _, err = run_cli(capsys, monkeypatch, "prune", "--model", model, "--allocation",  # its sparsity: taken
                           str(tmp_path / "s" / "best.json"), "--device", "cpu", "--out", str(tmp_path / "rebuilt"))
    assert code == 0, err
    line = " ".join(err.split())
    assert "from best.json: --sparsity 0.4 " in line and "--metric ria --pattern unstructured" in line
    expected = selfprune.prune(model, 0.4, best.structure["rates"], corpus, samples=6, calib_seqlen=48,
                               metric="ria", device="cpu", out=tmp_path / "expected")
    rebuilt, wanted = tensors(tmp_path / "rebuilt"), tensors(expected.out)
    assert rebuilt.keys() == wanted.keys() and all(torch.equal(rebuilt[k], wanted[k]) for k in wanted)
    ppl = selfprune.perplexity(str(tmp_path / "rebuilt"), corpus, "test", seqlen=64, windows=4, device="cpu")
    assert ppl["ppl"] == best.test_ppl
