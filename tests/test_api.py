"""The library API a notebook calls: selfprune.prune, selfprune.perplexity and selfprune.report on the
tiny workspace model, and ``import selfprune`` staying free of torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import selfprune
from selfprune.core.errors import UserError


@pytest.fixture(scope="module")
def ws(tiny_workspace):
    return tiny_workspace


def corpus(ws) -> str:
    return str(ws / "corpus.txt")


def test_import_selfprune_does_not_import_torch():
    code = "import sys, selfprune; assert 'torch' not in sys.modules; print(callable(selfprune.prune))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "True"


def test_prune_exports_what_it_returns(ws, tmp_path):
    result = selfprune.prune(str(ws / "model"), 0.4, "owl", corpus(ws), samples=4, calib_seqlen=64, device="cpu",
                             out=tmp_path / "owl")
    assert isinstance(result, selfprune.PruneResult) and result.out == tmp_path / "owl"
    assert len(result.rates) == len(result.structure) == result.arch.n_layers == 4
    assert abs(result.realized_ratio - 0.4) < 0.02 and result.record["realized_ratio"] == result.realized_ratio
    assert json.loads((tmp_path / "owl" / "selfprune.json").read_text()) == json.loads(json.dumps(result.record))
    in_memory = selfprune.perplexity(result, corpus(ws), seqlen=64, windows=3)
    exported = selfprune.perplexity(str(tmp_path / "owl"), corpus(ws), seqlen=64, windows=3, device="cpu")
    assert in_memory["tokens"] == exported["tokens"] == 3 * 63
    assert in_memory["ppl"] == pytest.approx(exported["ppl"], rel=1e-5)
    assert exported["model"] == str(tmp_path / "owl") and exported["split"] == "test" and "model" not in in_memory


def test_prune_with_explicit_rates_leaves_the_loaded_model_intact(ws):
    from selfprune.engine.models import load_model

    lm = load_model(str(ws / "model"), device="cpu")
    before = {n: p.clone() for n, p in lm.model.named_parameters()}
    result = selfprune.prune(lm, 0.5, [0.2, 0.8, 0.5, 0.5], corpus(ws), samples=4, calib_seqlen=64)
    assert result.rates == [0.2, 0.8, 0.5, 0.5] and result.record["method"] == "wanda-sp/explicit"
    assert result.out is None
    assert sum(p.numel() for p in result.model.parameters()) < sum(p.numel() for p in before.values())
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())
    dense = selfprune.perplexity(lm, corpus(ws), seqlen=64, windows=2)
    assert dense["fingerprint"] == lm.fingerprint and dense["ppl"] > 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(ratio=1.5), "--ratio must lie strictly between 0 and 1"),
    (dict(format="gguf", out="x"), "format 'gguf' is not known"),
    (dict(allocation=[0.5, 0.5]), "2 entries but the model has 4 layers"),
])
def test_prune_bad_input(ws, kwargs, message):
    args = dict(ratio=0.5) | kwargs
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        selfprune.prune(str(ws / "model"), data=corpus(ws), samples=4, calib_seqlen=64, device="cpu", **args)


def test_report_without_prefect(ws, tmp_path):
    summary = selfprune.report(model=str(ws / "model"), data=corpus(ws), ratios=[0.5], tasks=["selfprune_cloze"], limit=2,
                               cloze_items=8, seqlen=64, test_windows=2, samples=4, calib_seqlen=64, max_length=256,
                               out=str(tmp_path / "r"), device="cpu")
    rows = summary.rows
    assert [(r.method, r.ratio) for r in rows] == [("dense", None), ("uniform", 0.5), ("owl", 0.5)]
    assert all(r.tokens == 2 * 63 and 0 <= r.mean_acc <= 1 for r in rows)
    assert rows[0].realized_ratio == 0 and abs(rows[1].realized_ratio - 0.5) < 0.02
    assert summary.meta.computed == 6 and summary.meta.cached == 0
    dense = selfprune.perplexity(str(ws / "model"), corpus(ws), seqlen=64, windows=2, device="cpu")
    assert rows[0].ppl == pytest.approx(dense["ppl"], rel=1e-6)
    from selfprune.evaluate.report import Report

    text = (tmp_path / "r" / "report.json").read_text()  # the dict form, byte for byte, and it reads back the same
    assert text == json.dumps(summary.to_json(), indent=2) and Report.from_json(json.loads(text)) == summary
    from selfprune.artifacts.comparison import render  # rendering is the application's

    files = render(summary, tmp_path / "r")
    assert {"report.md", "report.html", "rates.csv", "ppl.png", "accuracy.png"} == set(files)
