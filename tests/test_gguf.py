"""GGUF export: every structure of every supported family in llama.cpp, equal to transformers.

A tiny random model of each family (MHA and GQA Llama, Qwen2 with q/k/v biases, Mistral, and a
Llama with attention and MLP biases) is pruned to structures with partial KV groups, a layer with no
attention (the first, and one inside), a layer with no MLP, a fully removed layer (inside, and the
last), written as GGUF, loaded by llama.cpp (llama-cpp-python) and compared with transformers on
the same export: prompt log-probabilities and greedy tokens at f32, perplexity at q8_0 and q4_k_m.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import build_tiny, demo_uniform_and_searched, random_windows, run_cli

from selfprune.core.errors import UserError
from selfprune.export.gguf import check_gguf_export, layer_widths, write_gguf
from selfprune.export.hf import load_pruned, save_pruned
from selfprune.export.llamacpp import llamacpp_score
from selfprune.methods import slicing, wanda_sp
from selfprune.methods.structure import LayerKeep, rates_to_structure
from selfprune.model import stats
from selfprune.model.arch import arch_of

# slow: real llama.cpp on every GGUF written, each in a process of its own (minutes; skips without llama-cpp-python)
pytestmark = pytest.mark.slow

pytest.importorskip("llama_cpp", reason="pip install 'selfprune[llm-server]' (llama-cpp-python)")

PROMPT = random_windows(1, 24, seed=7)[0].tolist()


def merged_tokenizer():
    """The byte tokenizer with four merges (ids 256-259): llama.cpp loads a BPE vocabulary with merges only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "a")]
    vocab = {ch: i for i, ch in enumerate(alphabet)} | {a + b: 256 + i for i, (a, b) in enumerate(merges)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0])


def _tiny(kind: str, **config):
    """A tiny model of ``kind`` with the merged tokenizer's 260 ids (and ``config`` changes)."""
    cfg = build_tiny(kind).config
    for k, v in ({"vocab_size": 260} | config).items():
        setattr(cfg, k, v)
    torch.manual_seed(1)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(cfg).eval().requires_grad_(False)


def _export(tmp_path, kind: str, structure=None, rates=None, **config):
    model = _tiny(kind, **config)
    arch = arch_of(model.config)
    ranks = wanda_sp.rank(model, arch, stats.capture(model, random_windows(4, 32, 0)))
    structure = structure or rates_to_structure(arch, rates)
    pruned = slicing.materialize(model, arch, ranks, structure)
    name = f"{kind}-{abs(hash(structure)) % 10**8}"
    return save_pruned(pruned, merged_tokenizer(), tmp_path / name, {"rates": rates, "base_model": {"source": kind}})


def _hf(export) -> tuple[torch.Tensor, list[int]]:
    """transformers on the export: each prompt token's log-probability after its prefix, greedy tokens."""
    lm = load_pruned(export, device="cpu", dtype="float32")
    ids = torch.tensor([PROMPT])
    logprobs = torch.log_softmax(lm.model(ids).logits[0].double(), -1)[:-1].gather(1, ids[0, 1:, None])[:, 0]
    greedy = lm.model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(PROMPT):].tolist()
    return logprobs, greedy


def _gguf(path) -> tuple[torch.Tensor, list[int]]:
    got = llamacpp_score(path, PROMPT, new_tokens=8)
    return torch.tensor(got["logprobs"], dtype=torch.float64), got["greedy"]


def _ppl(logprobs: torch.Tensor) -> float:
    return math.exp(-float(logprobs.mean()))


STRUCTURES = {
    # partial KV groups, no attention, no MLP, the last layer fully removed
    "mixed": lambda a: (LayerKeep(a.n_kv_heads - 1, 50), LayerKeep(0, 96), LayerKeep(1, 0), LayerKeep(0, 0)),
    # the first layer without attention, a layer fully removed inside
    "first-removed": lambda a: (LayerKeep(0, 30), LayerKeep(0, 0), LayerKeep(a.n_kv_heads, 96), LayerKeep(1, 7)),
}


@pytest.mark.parametrize("kind", ["llama_mha", "llama_gqa", "qwen2", "mistral"])
@pytest.mark.parametrize("shape", ["uniform", *STRUCTURES])
def test_a_gguf_computes_what_the_export_computes(tmp_path, kind, shape):
    arch = arch_of(build_tiny(kind).config)
    export = (_export(tmp_path, kind, rates=[0.5] * 4) if shape == "uniform"
              else _export(tmp_path, kind, STRUCTURES[shape](arch)))
    path = write_gguf(export, tmp_path / "f32.gguf", "f32")
    hf, hf_greedy = _hf(export)
    got, greedy = _gguf(path)
    assert (got - hf).abs().max() < 1e-3
    assert greedy == hf_greedy


def test_biases_of_removed_units_are_kept_and_quantized_files_stay_close(tmp_path):
    """A Llama with attention and MLP biases: a removed attention or MLP still adds its output bias
    (written as a zero unit), and q8_0 / q4_k_m perplexity stay within 2% / 10% of the f32 file's."""
    export = _export(tmp_path, "llama_gqa", (LayerKeep(0, 40), LayerKeep(1, 0), LayerKeep(2, 96), LayerKeep(0, 0)),
                     attention_bias=True, mlp_bias=True)
    f32 = write_gguf(export, tmp_path / "f32.gguf", "f32")
    hf, _ = _hf(export)
    got, _ = _gguf(f32)
    assert (got - hf).abs().max() < 1e-3
    base = _ppl(got)
    for quant, tolerance in (("f16", 0.005), ("q8_0", 0.02), ("q4_k_m", 0.10)):
        q = write_gguf(export, tmp_path / f"{quant}.gguf", quant)
        assert q.stat().st_size < f32.stat().st_size
        assert abs(_ppl(_gguf(q)[0]) / base - 1) < tolerance, quant


@pytest.mark.parametrize("scaling", [{"rope_type": "default", "rope_theta": 100000.0},
                                     {"rope_type": "linear", "rope_theta": 50000.0, "factor": 2.0},
                                     {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
def test_rotary_bases_and_scalings_reach_llama_cpp(tmp_path, scaling):
    """SmolLM2's base (1e5), a linear scaling and Llama 3's (its per-frequency divisors, rope_freqs)."""
    export = _export(tmp_path, "llama_gqa", rates=[0.4] * 4, rope_parameters=scaling)
    hf, hf_greedy = _hf(export)
    got, greedy = _gguf(write_gguf(export, tmp_path / "f32.gguf", "f32"))
    assert (got - hf).abs().max() < 1e-3 and greedy == hf_greedy


def test_the_tokenizer_and_chat_template_travel_with_the_file(tmp_path):
    """Tokens by id (rows beyond the tokenizer's as unused padding), special added tokens as control
    tokens, the merges, the special ids and the chat template, read back from the GGUF."""
    import gguf

    tokenizer = merged_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})  # id 260
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"
    export = _export(tmp_path, "llama_gqa", rates=[0.4] * 4, vocab_size=264)
    tokenizer.save_pretrained(export)
    reader = gguf.GGUFReader(str(write_gguf(export, tmp_path / "t.gguf", "f16")))

    def field(name):
        return reader.get_field(name).contents()

    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    assert len(tokens) == 264 and tokens[257] == "he" and tokens[260] == "<|im_end|>" and tokens[263] == "[PAD263]"
    assert (types[257], types[260], types[263]) == (gguf.TokenType.NORMAL, gguf.TokenType.CONTROL, gguf.TokenType.UNUSED)
    assert field("tokenizer.ggml.merges")[:2] == ["Ġ t", "h e"] and field("tokenizer.ggml.pre") == "default"
    assert field("tokenizer.chat_template") == tokenizer.chat_template and field("tokenizer.ggml.eos_token_id") == 0


@pytest.mark.demo
def test_the_demo_models_pre_tokenizer_is_its_gguf_s(real_home):
    from selfprune.data.demo import demo_model_dir
    from selfprune.export.gguf import tokenizer_pre

    assert tokenizer_pre(demo_model_dir()) == "smollm"

def test_zero_units_stand_only_where_llama_cpp_needs_them():
    arch = arch_of(build_tiny("llama_gqa").config)
    kept = [(0, 10), (0, 0), (2, 0), (0, 0)]
    w = layer_widths(kept, arch, set())
    assert [(x.heads, x.kv_heads, x.ff) for x in w] == [(4, 1, 10), (0, 0, 0), (8, 2, 1), (0, 0, 1)]
    assert [x.zero_attention for x in w] == [True, False, False, False]
    assert [x.zero_mlp for x in w] == [False, False, True, True]
    biased = layer_widths(kept, arch, {"attn.1", "mlp.1"})[1]
    assert (biased.heads, biased.kv_heads, biased.ff) == (4, 1, 1)  # the biases need a unit to live in


def test_an_unstructured_export_is_written_dense_shaped(tmp_path):
    import selfprune

    _tiny("llama_gqa").save_pretrained(tmp_path / "base")
    merged_tokenizer().save_pretrained(tmp_path / "base")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"paragraph {i} " + "some words of text " * 20 for i in range(200)))
    selfprune.prune(str(tmp_path / "base"), 0.5, data=str(corpus), samples=4, calib_seqlen=32, device="cpu",
                    metric="wanda", pattern="2:4", out=tmp_path / "sparse")
    path = write_gguf(tmp_path / "sparse", tmp_path / "sparse.gguf", "f32")
    hf, _ = _hf(tmp_path / "sparse")
    got, _ = _gguf(path)
    assert (got - hf).abs().max() < 1e-3


def test_what_llama_cpp_cannot_express_is_refused_before_writing(tmp_path):
    export = _export(tmp_path, "llama_gqa", rates=[0.5] * 4)
    with pytest.raises(UserError, match="--quant q3: use one of"):
        check_gguf_export(export, "q3")
    with pytest.raises(UserError, match="neither a selfprune export nor a model directory"):
        check_gguf_export(tmp_path, "f16")
    config = json.loads((export / "config.json").read_text())
    (export / "config.json").write_text(json.dumps(config | {"hidden_act": "gelu"}))
    with pytest.raises(UserError, match="SiLU"):
        check_gguf_export(export, "f16")
    (export / "config.json").write_text(json.dumps(config | {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(UserError, match="yarn"):
        check_gguf_export(export, "f16")
    (export / "config.json").write_text(json.dumps(config))
    (export / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="no tokenizer.json"):
        check_gguf_export(export, "f16")
    assert not list(tmp_path.glob("*.gguf"))


def test_the_cli_writes_a_quantized_gguf_and_refuses_bad_input_in_one_line(tmp_path, capsys, monkeypatch):
    export = _export(tmp_path, "qwen2", rates=[0.3] * 4)
    code, out, err = run_cli(capsys, monkeypatch, "export-gguf", str(export), str(tmp_path / "m.gguf"), "--quant", "q8_0")
    assert code == 0, err
    assert (tmp_path / "m.gguf").is_file() and "llama_cpp.server" in out + err and "ollama create" in out + err
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    code, out, err = run_cli(capsys, monkeypatch, "export-gguf", str(tmp_path), str(tmp_path / "x.gguf"))
    assert code == 2 and "neither a selfprune export" in err and not (tmp_path / "x.gguf").exists()
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    code, out, err = run_cli(capsys, monkeypatch, "export-gguf", str(export), str(tmp_path / "y.gguf"), "--quant", "q4_k_m")
    assert code == 2 and "pip install 'selfprune[llm-server]'" in err  # the extra's brackets are not rich markup


def test_bench_model_llamacpp_times_dense_and_pruned_at_each_quantization(tmp_path, capsys, monkeypatch):
    from selfprune.app.cli import LLAMACPP_FIELDS

    _tiny("llama_gqa").save_pretrained(tmp_path / "dense")
    merged_tokenizer().save_pretrained(tmp_path / "dense")
    export = _export(tmp_path, "llama_gqa", rates=[0.5] * 4)
    args = ["bench-model", "--model", str(tmp_path / "dense"), "--pruned", str(export), "--llamacpp", "--quant", "f16,q8_0",
            "--prompt-tokens", "16", "--new-tokens", "4", "--repeats", "1"]
    code, out, err = run_cli(capsys, monkeypatch, *args, "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [(r["dtype"], r["model"]) for r in rows] == [(q, m) for q in ("f16", "q8_0") for m in (str(tmp_path / "dense"), str(export))]
    for dense, pruned in (rows[:2], rows[2:]):
        assert pruned["params"] < dense["params"] and pruned["params_read_per_token"] < dense["params_read_per_token"]
        assert pruned["file_bytes"] < dense["file_bytes"] and dense["generate_tokens_per_s"] > 0 < dense["peak_memory_bytes"]
    assert rows[2]["file_bytes"] < rows[0]["file_bytes"]  # q8_0 below f16
    code, _, err = run_cli(capsys, monkeypatch, *args)
    assert code == 0, err
    assert all(label in err for label, *_ in LLAMACPP_FIELDS) and "q8_0" in err and "x)" in err
    code, _, err = run_cli(capsys, monkeypatch, *args[:-6], "--quant", "q3")
    assert code == 2 and "--quant q3" in err


def test_a_search_says_how_to_export_its_model_and_the_commands_work(tmp_path, capsys, monkeypatch):
    """best.json's ``export`` commands, run literally, build the searched model and its GGUF."""
    import shlex

    from helpers import write_corpus

    import selfprune

    _tiny("llama_gqa").save_pretrained(tmp_path / "dense")
    merged_tokenizer().save_pretrained(tmp_path / "dense")
    write_corpus(tmp_path / "corpus.txt")
    summary = selfprune.search(model=str(tmp_path / "dense"), data=str(tmp_path / "corpus.txt"), ratio=0.4, population=4,
                               mutations=2, crossovers=2, generations=1, samples=4, calib_seqlen=64, seqlen=64,
                               fitness_windows=2, test_windows=2, device="cpu", baselines="none", out=str(tmp_path / "run"))
    assert json.loads((tmp_path / "run" / "best.json").read_text())["export"] == summary.export
    for step in ("prune", "gguf"):
        code, _, err = run_cli(capsys, monkeypatch, *shlex.split(summary.export[step])[1:])
        assert code == 0, err[-2000:]
    layers = json.loads((tmp_path / "run" / "model" / "config.json").read_text())["selfprune_layers"]
    assert layers == summary.structure and (tmp_path / "run" / "model.q4_k_m.gguf").is_file()


def test_a_report_adds_each_rows_llama_cpp_speed(prefect_api, tmp_path, capsys, monkeypatch):
    """``selfprune report --llamacpp f16`` (the flow and its uncached speed task) times dense, a
    structured row and a metric row in llama.cpp; the library's report does too; a quantization
    llama.cpp does not know is refused before any work."""
    from helpers import write_corpus

    import selfprune

    _tiny("llama_gqa").save_pretrained(tmp_path / "dense")
    merged_tokenizer().save_pretrained(tmp_path / "dense")
    write_corpus(tmp_path / "corpus.txt")
    args = ["report", "--model", str(tmp_path / "dense"), "--data", str(tmp_path / "corpus.txt"), "--ratios", "0.5",
            "--allocation", "uniform", "--metric", "wanda", "--metric-allocation", "uniform", "--tasks", "selfprune_cloze",
            "--limit", "3", "--cloze-items", "8", "--seqlen", "64", "--test-windows", "2", "--samples", "4",
            "--calib-seqlen", "64", "--max-length", "256", "--device", "cpu", "--out", str(tmp_path / "report")]
    code, _, err = run_cli(capsys, monkeypatch, *args, "--llamacpp", "f16")
    assert code == 0, err[-2000:]
    rows = json.loads((tmp_path / "report" / "report.json").read_text())["rows"]
    assert {r["label"] for r in rows} >= {"dense", "uniform"} and all(r["llamacpp"]["decode_tokens_per_s"] > 0 for r in rows)
    dense = next(r for r in rows if r["label"] == "dense")["llamacpp"]
    pruned = next(r for r in rows if r["label"] == "uniform")["llamacpp"]
    assert pruned["params_read_per_token"] < dense["params_read_per_token"] and pruned["dtype"] == "f16"
    assert "llama.cpp f16 decode tok/s" in (tmp_path / "report" / "report.md").read_text()
    code, _, err = run_cli(capsys, monkeypatch, *args, "--llamacpp", "q3")
    assert code == 2 and "--quant q3" in err
    library = selfprune.report(model=str(tmp_path / "dense"), data=str(tmp_path / "corpus.txt"), ratios=[0.5],
                               allocations=["uniform"], tasks=["selfprune_cloze"], limit=3, cloze_items=8, seqlen=64,
                               test_windows=2, samples=4, calib_seqlen=64, max_length=256, device="cpu", llamacpp="f16",
                               out=str(tmp_path / "library"))
    assert all(r.llamacpp["file_bytes"] > 0 for r in library.rows)


@pytest.mark.demo
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_the_demo_model_pruned_uniformly_and_by_a_search_runs_in_llama_cpp_as_in_transformers(
        ratio, real_home, prefect_api, tmp_path, capsys, monkeypatch):
    """SmolLM2-135M at 0.3 and 0.5, uniform and searched (per-layer widths): each f32 GGUF gives
    transformers' log-probabilities on real text (within 1e-3) and greedy tokens; the searched one's
    q8_0 and q4_k_m files stay within 2% and 15% of the f32 file's perplexity."""
    from selfprune.data.corpora import split_windows
    from selfprune.engine.models import load_tokenizer

    demo_uniform_and_searched(ratio, tmp_path, capsys, monkeypatch)
    text = split_windows(load_tokenizer("demo"), "demo", "test", 64, 1)[0].tolist()
    for name in ("uniform", "searched"):
        export = tmp_path / name
        lm = load_pruned(export, device="cpu", dtype="float32")
        ids = torch.tensor([text])
        hf = torch.log_softmax(lm.model(ids).logits[0].double(), -1)[:-1].gather(1, ids[0, 1:, None])[:, 0]
        greedy = lm.model.generate(ids, max_new_tokens=8, do_sample=False)[0, len(text):].tolist()
        del lm
        f32 = write_gguf(export, tmp_path / f"{name}.f32.gguf", "f32")
        got = llamacpp_score(f32, text, new_tokens=8, threads=2)
        assert (torch.tensor(got["logprobs"], dtype=torch.float64) - hf).abs().max() < 1e-3, name
        assert got["greedy"] == greedy, name
        if name == "searched":
            base = math.exp(-sum(got["logprobs"]) / len(got["logprobs"]))
            for quant, tolerance in (("q8_0", 0.02), ("q4_k_m", 0.15)):
                q = write_gguf(export, tmp_path / f"{name}.{quant}.gguf", quant)
                scored = llamacpp_score(q, text, new_tokens=1, threads=2)["logprobs"]
                assert abs(math.exp(-sum(scored) / len(scored)) / base - 1) < tolerance, quant
                q.unlink()
        f32.unlink()
