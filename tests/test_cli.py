"""The prune/ppl commands end to end on a tiny model, and every bad input: exit 2, one line, no traceback."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import run_cli


@pytest.fixture
def workspace(tiny_workspace) -> Path:
    return tiny_workspace


def prune_args(ws: Path, *extra: str) -> list[str]:
    return ["prune", "--model", str(ws / "model"), "--data", str(ws / "corpus.txt"), "--samples", "4",
            "--calib-seqlen", "64", "--device", "cpu", *extra]


def test_prune_then_ppl_json(workspace, capsys, monkeypatch):
    out_dir = workspace / "owl"
    code, _, err = run_cli(capsys, monkeypatch, *prune_args(workspace, "--ratio", "0.4", "--allocation", "owl", "--out", str(out_dir)))
    assert code == 0, err
    record = json.loads((out_dir / "selfprune.json").read_text())
    assert abs(record["realized_ratio"] - 0.4) < 0.005 + 194 / 27648
    assert len(record["kept_channels"]) == 4 and record["method"] == "wanda-sp/owl"
    assert "api_key" not in json.dumps(record).lower()
    code, out, err = run_cli(capsys, monkeypatch, "ppl", "--model", str(out_dir), "--data", str(workspace / "corpus.txt"),
                         "--seqlen", "64", "--windows", "3", "--json", "--device", "cpu")
    assert code == 0, err
    result = json.loads(out)
    assert result["tokens"] == 3 * 63 and result["seqlen"] == 64 and result["ppl"] > 1
    protocol = result["protocol"]  # what the figure was measured under, the export's calibration included
    assert (protocol["split"], protocol["windows"], protocol["seqlen"], protocol["dtype"]) == ("test", 3, 64, "float32")
    assert protocol["calibration"] == f"{workspace / 'corpus.txt'}, 4 x 64 tokens"
    assert protocol["model_fingerprint"] == result["fingerprint"] and protocol["torch_version"]


def test_rates_file_allocation(workspace, capsys, monkeypatch):
    rates = workspace / "rates.json"
    rates.write_text(json.dumps({"rates": [0.1, 0.5, 0.5, 0.9]}))
    code, _, err = run_cli(capsys, monkeypatch,
                           *prune_args(workspace, "--ratio", "0.5", "--allocation", str(rates), "--out", str(workspace / "f")))
    assert code == 0, err
    assert json.loads((workspace / "f" / "selfprune.json").read_text())["rates"] == [0.1, 0.5, 0.5, 0.9]


BAD = {
    "ratio": (["--ratio", "1.5"], "--ratio must lie strictly between 0 and 1"),
    "length": (["--allocation", "{rates}", "--ratio", "0.5"], "3 entries but the model has 4 layers"),
    "range": (["--allocation", "{rates}", "--ratio", "0.5"], "outside [0, 1.0]"),
    "mean": (["--allocation", "{rates}", "--ratio", "0.5"], "not the target ratio 0.5"),
    "allocation": (["--allocation", "bogus.json"], "does not exist"),
}
RATES = {"length": [0.5, 0.5, 0.5], "range": [0.5, 1.5, -0.5, 0.5], "mean": [0.9, 0.9, 0.9, 0.9]}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_prune_input(case, workspace, capsys, monkeypatch):
    args, message = BAD[case]
    rates = workspace / f"rates-{case}.json"
    rates.write_text(json.dumps(RATES.get(case, [])))
    args = [a.replace("{rates}", str(rates)) for a in args]
    code, _, err = run_cli(capsys, monkeypatch, *prune_args(workspace, *args, "--out", str(workspace / "x")))
    assert code == 2 and message in err.replace("\n", " ") and "Traceback" not in err


def test_missing_model_and_unsupported_arch(workspace, capsys, monkeypatch, tmp_path):
    code, _, err = run_cli(capsys, monkeypatch, "ppl", "--model", str(tmp_path / "missing"), "--device", "cpu")
    assert code == 2 and "does not exist" in err
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=256)).save_pretrained(tmp_path / "gpt2")
    code, _, err = run_cli(capsys, monkeypatch, "ppl", "--model", str(tmp_path / "gpt2"), "--device", "cpu")
    assert code == 2 and "unsupported architecture" in err and "Traceback" not in err


def test_corpus_too_short(workspace, capsys, monkeypatch):
    code, _, err = run_cli(capsys, monkeypatch, "ppl", "--model", str(workspace / "model"), "--data", str(workspace / "corpus.txt"),
                       "--seqlen", "512", "--windows", "500", "--device", "cpu")
    assert code == 2 and "tokens" in err and "Traceback" not in err


def test_corrupt_statistics_file_is_set_aside_and_recomputed(workspace, capsys, monkeypatch):
    args = prune_args(workspace, "--ratio", "0.3", "--out", str(workspace / "u"), "--calib-seqlen", "48")
    assert run_cli(capsys, monkeypatch, *args)[0] == 0
    from selfprune.storage.store import ArtifactStore

    newest = max(ArtifactStore().root.rglob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    newest.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match=f"statistics file {re.escape(str(newest))} is corrupt"):
        code, _, err = run_cli(capsys, monkeypatch, *args)
    assert code == 0 and "Traceback" not in err
    [aside] = newest.parent.glob(newest.name + ".corrupt-*")
    assert aside.read_bytes() == b"garbage"  # kept aside, not lost
    assert ArtifactStore().get_tensors(newest.stem)["tokens"] > 0  # recomputed in its place


def test_prefect_setup_needs_a_server(capsys, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    code, _, err = run_cli(capsys, monkeypatch, "prefect-setup")
    assert code == 2 and "PREFECT_API_URL is not set" in err and "Traceback" not in err


def test_search_options_are_the_config_fields(capsys, monkeypatch):
    """Every SearchConfig field is a search option; a bad value is one line naming the option."""
    from selfprune.config import SearchConfig, cli_flag

    code, out, _ = run_cli(capsys, monkeypatch, "search", "--help")
    flags = [cli_flag(SearchConfig, name) for name in SearchConfig.model_fields]
    assert code == 0 and all(flag in out or f"--no-{flag[2:]}" in out for flag in flags)  # a switch on by default: its off form
    code, _, err = run_cli(capsys, monkeypatch, "search", "--population", "1", "--ratio", "0.95")
    assert code == 2 and "--population" in err and "Traceback" not in err
