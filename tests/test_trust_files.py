"""Hostile model and data files, and run directories with planted links: a crafted config, GGUF or
text is one line and exit 2 before anything is built, a large text streams, and no run output is
ever written through a symbolic link."""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import signal
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from helpers import build_tiny, byte_tokenizer, run_cli, tiny_export, write_corpus

from selfprune.data import corpora as data

# ---------------------------------------------------------------------------------------------
# helpers


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (not hang) when the block runs longer than ``seconds``: a 10^7-layer config used to."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def one_line_error(code: int, err: str) -> str:
    """The CLI's answer to bad input: exit 2 and a single line, no traceback."""
    assert code == 2, err[-3000:]
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err[-3000:]
    return err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


def ppl(capsys, monkeypatch, model: Path, corpus: Path) -> tuple[int, str, str]:
    capsys.readouterr()  # not what the test's own setup printed
    with deadline(120):
        return run_cli(capsys, monkeypatch, "ppl", "--model", str(model), "--data", str(corpus), "--seqlen", "32",
                       "--windows", "2", "--device", "cpu")


def saved_model(root: Path, **save) -> Path:
    """The tiny GQA Llama (4 layers, hidden 64, vocab 256, 8 x 8 query heads, 2 KV heads, 96 channels)."""
    build_tiny("llama_gqa").save_pretrained(root, **save)
    byte_tokenizer().save_pretrained(root)
    return root


def edit_config(model_dir: Path, **fields) -> None:
    path = model_dir / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | fields))


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def write_gguf(path: Path, embedding_length: int = 64) -> Path:
    """The tiny Llama as an f32 GGUF with a byte-level tokenizer, written with gguf's own writer;
    ``embedding_length`` is the hidden size the metadata claims."""
    import gguf
    from tokenizers import pre_tokenizers

    model = build_tiny("llama_gqa")
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(512)
    w.add_embedding_length(embedding_length)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(sorted(pre_tokenizers.ByteLevel.alphabet()))
    w.add_token_types([1] * 256)
    w.add_token_scores([0.0] * 256)
    w.add_token_merges([])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    top = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
           "model.norm.weight": "output_norm.weight"}
    for name, tensor in model.state_dict().items():
        if name not in top:
            _, _, i, *module, _ = name.split(".")
            top[name] = f"blk.{i}.{GGUF_NAMES['.'.join(module)]}.weight"
        w.add_tensor(top[name], tensor.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---------------------------------------------------------------------------------------------
# (a) a config checked against its weights' headers before anything is built

LIES = {  # field: (what the planted config says, what the weights hold)
    "hidden_size": (1 << 20, 64),
    "vocab_size": (10**9, 256),
    "num_hidden_layers": (10**7, 4),
    "intermediate_size": (1 << 26, 96),
    "num_key_value_heads": (8, 2),
}


@pytest.mark.parametrize("field", list(LIES))
def test_a_config_that_disagrees_with_its_weights_is_refused_before_anything_is_built(field, tmp_path, corpus, capsys,
                                                                                      monkeypatch):
    lie, truth = LIES[field]
    model = saved_model(tmp_path / "model")
    edit_config(model, **{field: lie})
    err = one_line_error(*ppl(capsys, monkeypatch, model, corpus)[::2])
    assert field in err and str(lie) in err and str(truth) in err and "config.json" in err


def test_layers_are_counted_over_every_shard_and_too_few_is_refused_too(tmp_path, corpus, capsys, monkeypatch):
    """A sharded checkpoint: the layer indices come from every shard's header. A config with fewer
    layers than the weights used to load silently, dropping layers."""
    model = saved_model(tmp_path / "model", max_shard_size="40KB")
    assert (model / "model.safetensors.index.json").is_file() and len(list(model.glob("*.safetensors"))) > 2
    code, _, err = ppl(capsys, monkeypatch, model, corpus)
    assert code == 0 and "ppl " in err, err[-3000:]
    edit_config(model, num_hidden_layers=2)
    err = one_line_error(*ppl(capsys, monkeypatch, model, corpus)[::2])
    assert "num_hidden_layers" in err and "2" in err and "4" in err


def test_a_bin_checkpoint_is_checked_from_its_pickle_without_reading_data(tmp_path, corpus, capsys, monkeypatch):
    import torch

    model = tmp_path / "model"
    model.mkdir()
    torch.save(build_tiny("llama_gqa").state_dict(), model / "pytorch_model.bin")
    build_tiny("llama_gqa").config.save_pretrained(model)
    byte_tokenizer().save_pretrained(model)
    edit_config(model, hidden_size=1 << 20)
    err = one_line_error(*ppl(capsys, monkeypatch, model, corpus)[::2])
    assert "hidden_size" in err and str(1 << 20) in err and "64" in err


@pytest.fixture(scope="module")
def export(tiny_workspace, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "pruned"
    tiny_export(tiny_workspace, out, "--ratio", "0.5")
    return out


@pytest.mark.parametrize("edit", ["layers", "widths out of range", "widths of 2 layers", "widths not the weights'"])
def test_a_planted_export_config_is_refused(edit, export, tmp_path, corpus, capsys, monkeypatch):
    planted = tmp_path / "export"
    shutil.copytree(export, planted)
    kept = json.loads((planted / "config.json").read_text())["selfprune_layers"]
    layer, (groups, channels) = next((i, w) for i, w in enumerate(kept) if w[1] > 1)
    narrower = [w if i != layer else [groups, channels - 1] for i, w in enumerate(kept)]
    fields = {"layers": {"num_hidden_layers": 10**7},
              "widths out of range": {"selfprune_layers": [[2, 10**9]] * 4},
              "widths of 2 layers": {"selfprune_layers": kept[:2]},
              "widths not the weights'": {"selfprune_layers": narrower}}[edit]
    edit_config(planted, **fields)
    err = one_line_error(*ppl(capsys, monkeypatch, planted, corpus)[::2])
    assert "selfprune_layers" in err
    if edit == "layers":
        assert "num_hidden_layers" in err and str(10**7) in err
    if edit == "widths not the weights'":
        assert f"selfprune_layers[{layer}]" in err and f"{channels - 1} in the config but {channels}" in err


# ---------------------------------------------------------------------------------------------
# (b) a corrupt config or GGUF: one line

BAD_CONFIGS = {
    "not JSON": "{not json",
    "a list": "[]",
    "a string for a size": {"hidden_size": "sixty-four"},
    "no heads": {"num_attention_heads": 0},
    "a float layer count": {"num_hidden_layers": 4.5},
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_a_corrupt_config_is_one_line(case, tmp_path, corpus, capsys, monkeypatch):
    model = saved_model(tmp_path / "model")
    bad = BAD_CONFIGS[case]
    if isinstance(bad, dict):
        edit_config(model, **bad)
    else:
        (model / "config.json").write_text(bad)
    err = one_line_error(*ppl(capsys, monkeypatch, model, corpus)[::2])
    assert "config" in err


def test_a_valid_gguf_loads_and_its_metadata_is_checked_against_its_tensors(tmp_path, corpus, capsys, monkeypatch):
    code, _, err = ppl(capsys, monkeypatch, write_gguf(tmp_path / "tiny.gguf"), corpus)
    assert code == 0 and "ppl " in err, err[-3000:]
    lying = write_gguf(tmp_path / "lying.gguf", embedding_length=1 << 20)
    err = one_line_error(*ppl(capsys, monkeypatch, lying, corpus)[::2])
    assert "hidden_size" in err and str(1 << 20) in err and "64" in err


@pytest.mark.parametrize("damage", ["random bytes", "magic then random", "truncated header", "truncated tensors"])
def test_a_corrupt_gguf_is_one_line(damage, tmp_path, corpus, capsys, monkeypatch):
    good = write_gguf(tmp_path / "good.gguf").read_bytes()
    noise = random.Random(0).randbytes(len(good))
    content = {"random bytes": noise, "magic then random": b"GGUF" + noise[4:], "truncated header": good[:200],
               "truncated tensors": good[: len(good) // 2]}[damage]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    err = one_line_error(*ppl(capsys, monkeypatch, bad, corpus)[::2])
    assert str(bad) in err and "GGUF" in err


def test_a_truncated_safetensors_shard_is_one_line(tmp_path, corpus, capsys, monkeypatch):
    model = saved_model(tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    err = one_line_error(*ppl(capsys, monkeypatch, model, corpus)[::2])
    assert str(weights) in err and "not a readable safetensors file" in err


# ---------------------------------------------------------------------------------------------
# (c) a large text streams through the split rule


def test_a_large_text_of_short_paragraphs_splits_in_memory_proportional_to_what_is_kept(tmp_path):
    path = tmp_path / "big.txt"
    rng = random.Random(0)
    words = "the a of and to in is was he she".split()
    with open(path, "w") as f:
        for _ in range(330_000):  # about 2.5 MB of one-to-three-word paragraphs
            f.write(" ".join(rng.choice(words) for _ in range(rng.randint(1, 3))) + "\n\n")
    size = path.stat().st_size
    data._split_corpus_cached.cache_clear()
    data._load_split_cached.cache_clear()
    tracemalloc.start()
    try:
        calibration = data.load_split(str(path), "calibration")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        data._split_corpus_cached.cache_clear()
        data._load_split_cached.cache_clear()
    assert 0.75 * size < len(calibration) < 0.85 * size
    assert peak < 2.5 * size, f"peak {peak / size:.1f}x the file's size"


RULE = [  # text -> its paragraphs under the split rule (what the whole-text rule has always given)
    ("\n\n  a b  \n c\n\n\n d \r\n \r\ne\rf\n", ["  a b  \n c", " d", "e\nf"]),
    ("   \nfirst\n\nsecond", ["   \nfirst", "second"]),
    ("\n \nx\n\x0c\ny \t", ["x", "y"]),
    ("only\u2028one\x85para\n", ["only\u2028one\x85para"]),
    (" \n \n", []),
]


@pytest.mark.parametrize("text,expected", RULE)
def test_the_streamed_rule_cuts_paragraphs_as_the_whole_text_rule(text, expected, tmp_path):
    assert data.paragraphs(text) == expected
    path = tmp_path / "t.txt"
    path.write_bytes(text.encode("utf-8"))
    assert data.split_text(text) == data._split_corpus_cached(data._data_key(str(path)))


# ---------------------------------------------------------------------------------------------
# (d) run outputs: atomic replace, never through a link

OUTPUTS = ("evaluations.jsonl", "fitness.png", "rates.png", "metrics.png", "best.json")


def plant_links(out: Path, outside: Path) -> dict[Path, bytes]:
    """A link named as each run output, pointing at a file of someone else's outside ``out``."""
    out.mkdir(parents=True)
    outside.mkdir()
    targets = {}
    for name in OUTPUTS:
        target = outside / name
        target.write_bytes(f"precious {name}\n".encode())
        (out / name).symlink_to(target)
        targets[target] = target.read_bytes()
    return targets


def assert_untouched(targets: dict[Path, bytes]) -> None:
    for target, content in targets.items():
        assert target.read_bytes() == content, f"{target} was written through a link"


def test_the_writers_of_a_run_replace_planted_links_and_leave_their_targets_alone(tmp_path, caplog):
    from types import SimpleNamespace

    from selfprune.artifacts.report import plot_history, plot_metric_graph, plot_rates
    from selfprune.config import AutopruneConfig, SearchConfig
    from selfprune.evolve.pipeline import GenerationFitness, write_summary
    from selfprune.storage.fileio import append_line

    out = tmp_path / "run"
    targets = plant_links(out, tmp_path / "outside")
    append_line(out / "evaluations.jsonl", '{"n": 1}')
    append_line(out / "evaluations.jsonl", '{"n": 2}')
    record = SimpleNamespace(history=[GenerationFitness(0, 20.0, 30.0), GenerationFitness(1, 18.0, 25.0)])
    graph = [{"text": "W", "generation": 0, "fitness": 20.0, "source": "built-in", "parents": []}]
    rates = SimpleNamespace(record=record, rates=[0.2, 0.4], test_ppl=19.0)  # what the plots read of a summary
    metric = SimpleNamespace(record=record, graph=graph, metric="W", test_ppl={"found": {0.6: 19.0}})
    plot_history(rates, SearchConfig(ratio=0.3), out / "fitness.png")
    plot_rates(rates, SearchConfig(ratio=0.3), out / "rates.png")
    plot_metric_graph(metric, AutopruneConfig(), out / "metrics.png")
    write_summary(SimpleNamespace(to_json=lambda: {"fitness": 18.0}), out)
    assert_untouched(targets)
    assert not any((out / name).is_symlink() for name in OUTPUTS)
    assert (out / "evaluations.jsonl").read_text() == '{"n": 1}\n{"n": 2}\n'
    assert (out / "fitness.png").read_bytes().startswith(b"\x89PNG") and json.loads((out / "best.json").read_text())
    assert "evaluations.jsonl" in caplog.text and "link" in caplog.text


def test_a_search_flow_in_a_run_directory_with_planted_links_writes_none_through_them(prefect_api, tiny_workspace,
                                                                                      tmp_path):
    from selfprune.config import SearchConfig
    from selfprune.flows.search import search

    out = tmp_path / "run"
    targets = plant_links(out, tmp_path / "outside")
    search(SearchConfig(model=str(tiny_workspace / "model"), data=str(tiny_workspace / "corpus.txt"), out=str(out),
                        ratio=0.5, population=4, mutations=1, crossovers=1, generations=1, samples=4, calib_seqlen=64,
                        seqlen=64, fitness_windows=2, test_windows=2, device="cpu", baselines="none"))
    assert_untouched(targets)
    for name in ("evaluations.jsonl", "fitness.png", "rates.png", "best.json"):
        assert (out / name).is_file() and not (out / name).is_symlink()
    assert len((out / "evaluations.jsonl").read_text().splitlines()) >= 4
