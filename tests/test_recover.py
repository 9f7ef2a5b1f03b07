"""LoRA recovery of a tiny export through the CLI and the flow, and through the library's
``selfprune.recover``: lower loss and perplexity, the pruned shapes kept, the recovered export
loadable with its updated record; bad input exits 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run_cli, tiny_export


@pytest.fixture(scope="module")
def export(tiny_workspace) -> Path:
    return tiny_export(tiny_workspace, tiny_workspace / "recover-owl-0.3", "--ratio", "0.3", "--allocation", "owl")


def recover_args(ws: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return ["recover", "--model", str(model), "--data", str(ws / "corpus.txt"), "--steps", "25", "--lr", "5e-3",
            "--seqlen", "64", "--batch-size", "2", "--test-seqlen", "64", "--test-windows", "4", "--out", str(out),
            "--device", "cpu", *extra]


def test_recover_lowers_loss_and_keeps_shapes(prefect_api, export, tiny_workspace, tmp_path, capsys, monkeypatch):
    from selfprune.data.corpora import split_windows
    from selfprune.export.hf import load_pruned
    from selfprune.model.ppl import perplexity

    out = tmp_path / "recovered"
    code, _, err = run_cli(capsys, monkeypatch, *recover_args(tiny_workspace, export, out))
    assert code == 0, err
    assert "test ppl" in err and "->" in err
    record = json.loads((out / "selfprune.json").read_text())
    source = json.loads((export / "selfprune.json").read_text())
    rec = record["recovery"]
    assert record["method"] == source["method"] + "+lora" and record["kept_channels"] == source["kept_channels"]
    assert rec["loss_last"] < rec["loss_first"] and rec["test_after"]["ppl"] < rec["test_before"]["ppl"]
    assert rec["test_after"]["tokens"] == 4 * 63 and rec["steps"] == 25
    before, after = load_pruned(export, device="cpu"), load_pruned(out, device="cpu")
    shapes = lambda m: {n: tuple(p.shape) for n, p in m.named_parameters()}  # noqa: E731
    assert shapes(after.model) == shapes(before.model)
    assert json.loads((out / "config.json").read_text())["selfprune_layers"] == \
        json.loads((export / "config.json").read_text())["selfprune_layers"]
    test = split_windows(after.tokenizer, str(tiny_workspace / "corpus.txt"), "test", 64, 4)
    assert perplexity(after.model, test).ppl == pytest.approx(rec["test_after"]["ppl"], rel=1e-4)
    assert perplexity(before.model, test).ppl == pytest.approx(rec["test_before"]["ppl"], rel=1e-4)


def test_the_library_recovers_an_export_and_says_what_it_did(export, tiny_workspace, tmp_path):
    import selfprune

    out = tmp_path / "library"
    result = selfprune.recover(export, out, str(tiny_workspace / "corpus.txt"), steps=25, lr=5e-3, seqlen=64,
                               test_seqlen=64, test_windows=4, device="cpu")
    assert isinstance(result, selfprune.Recovery) and (result.source, result.out) == (export, out)
    assert result.after.ppl < result.before.ppl and result.losses[-1] < result.losses[0] and len(result.losses) == 25
    rec = json.loads((out / "selfprune.json").read_text())["recovery"]
    assert (rec["test_before"], rec["test_after"]) == (result.before.to_dict(), result.after.to_dict())
    summary = result.to_dict()  # the flow's return value: deployments' callers read these keys
    assert set(summary) == {"ppl_before", "ppl_after", "tokens", "test_seqlen", "losses", "loss_first", "loss_last",
                            "steps", "params", "out", "wall_s"}
    assert (summary["tokens"], summary["test_seqlen"], summary["steps"], summary["out"]) == (4 * 63, 64, 25, str(out))
    assert json.loads(json.dumps(summary)) == summary


@pytest.mark.parametrize("case, message", [
    ("dense", "is not a selfprune export"),
    ("same-out", "--out must differ"),
    ("steps", "LoRA needs steps"),
])
def test_bad_recover_input_exits_2(case, message, prefect_api, export, tiny_workspace, tmp_path, capsys, monkeypatch):
    model = tiny_workspace / "model" if case == "dense" else export
    out = export if case == "same-out" else tmp_path / "r"
    extra = ["--steps", "0"] if case == "steps" else []
    code, _, err = run_cli(capsys, monkeypatch, *recover_args(tiny_workspace, model, out, *extra))
    assert code == 2 and message in err and "Traceback" not in err, err[-2000:]
