"""bench-model on a tiny dense model and its export: every field printed; the DeciLM export paths;
bad input exits 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run_cli, tiny_export, tiny_prune_args

from selfprune.app.cli import BENCH_FIELDS

FAST = ["--prompt-tokens", "16", "--new-tokens", "4", "--repeats", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def export(tiny_workspace) -> Path:
    return tiny_export(tiny_workspace, tiny_workspace / "bench-uniform-0.5", "--ratio", "0.5")


def test_bench_model_prints_every_field(export, tiny_workspace, capsys, monkeypatch):
    code, _, err = run_cli(capsys, monkeypatch, "bench-model", "--model", str(tiny_workspace / "model"),
                       "--pruned", str(export), *FAST)
    assert code == 0, err
    for label, *_ in BENCH_FIELDS:
        assert label in err, label
    assert "dense: model" in err and "pruned: bench-uniform-0.5" in err and "x)" in err
    assert "prefill" in err and "decode" in err and "peak memory" in err


def test_bench_model_json_dense_vs_pruned(export, tiny_workspace, capsys, monkeypatch):
    code, out, err = run_cli(capsys, monkeypatch, "bench-model", "--model", str(tiny_workspace / "model"),
                         "--pruned", str(export), "--json", *FAST)
    assert code == 0, err
    dense, pruned = json.loads(out)
    for m in (dense, pruned):
        assert {key for _, key, *_ in BENCH_FIELDS} <= set(m) and m["prefill_tokens_per_s"] > 0
        assert (m["prompt_tokens"], m["new_tokens"], m["repeats"], m["device"]) == (16, 4, 1, "cpu")
    assert pruned["params"] < dense["params"] and pruned["kv_cache_bytes_per_token"] < dense["kv_cache_bytes_per_token"]


def test_prune_format_deci_and_export_deci(export, tiny_workspace, tmp_path, capsys, monkeypatch):
    # uniform 0.1 keeps every KV group (MLP widths are free): DeciLM can hold it
    code, _, err = run_cli(capsys, monkeypatch, *tiny_prune_args(tiny_workspace, tmp_path / "deci", "--ratio", "0.1", "--format", "deci"))
    assert code == 0, err
    config = json.loads((tmp_path / "deci" / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas" and len(config["block_configs"]) == 4
    assert (tmp_path / "deci" / "selfprune_record.json").is_file() and not (tmp_path / "deci" / "selfprune.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["deci"]  # the temporary export is gone
    # uniform 0.5 keeps 1 of 2 KV groups per layer: refused, naming the layers, nothing written
    code, _, err = run_cli(capsys, monkeypatch, *tiny_prune_args(tiny_workspace, tmp_path / "no", "--ratio", "0.5", "--format", "deci"))
    assert code == 2 and "layer 0 keeps 1 of 2 KV groups" in err and "layer 3" in err and not (tmp_path / "no").exists()
    code, _, err = run_cli(capsys, monkeypatch, "export-deci", str(export), str(tmp_path / "no2"))
    assert code == 2 and "layer 0 keeps 1 of 2 KV groups" in err and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--pruned", "{model}"], "not a selfprune export"),
    (["--repeats", "0"], "must all be at least 1"),
    (["--vllm"], "vLLM is not installed in selfprune's own environment"),
])
def test_bad_bench_input_exits_2(args, message, tiny_workspace, capsys, monkeypatch):
    monkeypatch.delenv("SELFPRUNE_VLLM_PYTHON", raising=False)
    args = [a.replace("{model}", str(tiny_workspace / "model")) for a in args]
    code, _, err = run_cli(capsys, monkeypatch, "bench-model", "--model", str(tiny_workspace / "model"), *FAST, *args)
    assert code == 2 and message in err and "Traceback" not in err, err[-2000:]


def test_prune_bad_format_exits_2(tiny_workspace, tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(capsys, monkeypatch, *tiny_prune_args(tiny_workspace, tmp_path / "x", "--format", "onnx"))
    assert code == 2 and "format 'onnx' is not known" in err
