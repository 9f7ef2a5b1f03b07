"""Zero-shot evaluation through lm-eval on tiny dense and pruned models, and the offline tasks."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml
from helpers import build_tiny, byte_tokenizer, random_windows

from selfprune.core.errors import UserError
from selfprune.evaluate.cloze import CLOZE_TASK, LASTWORD_TASK, build_cloze_task, build_lastword_task
from selfprune.evaluate.zeroshot import PAPER_TASKS, evaluate_zero_shot, summarize
from selfprune.methods import slicing, wanda_sp
from selfprune.methods.structure import LayerKeep
from selfprune.model import stats
from selfprune.model.arch import arch_of

WORDS = ("the king queen sword crown night river stone light shadow speak bring honour love death "
         "fair noble gentle heart blood hand eye word grief joy war peace lord lady time").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A local text corpus with enough lines in its test split (10%) for small tasks."""
    rng = random.Random(7)
    paragraphs = []
    for _ in range(300):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))).capitalize() + "."
                 for _ in range(rng.randint(3, 6))]
        paragraphs.append("\n".join(lines))
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(paragraphs))
    return str(path)


def pruned_tiny(kind: str, structure):
    model = build_tiny(kind)
    arch = arch_of(model.config)
    rankings = wanda_sp.rank(model, arch, stats.capture(model, random_windows(4, 32)))
    return model, slicing.materialize(model, arch, rankings, structure)


def test_cloze_files_deterministic_and_valid(corpus, tmp_path):
    a = build_cloze_task(corpus, tmp_path / "a", n_items=12, n_choices=4, seed=3)
    build_lastword_task(corpus, tmp_path / "a", n_items=12, seed=3)
    again = build_cloze_task(corpus, tmp_path / "a", n_items=12, n_choices=4, seed=3)
    assert again == a == (tmp_path / "a").resolve()
    first = {p.name: p.read_bytes() for p in a.iterdir() if p.is_file()}
    build_lastword_task(corpus, tmp_path / "a", n_items=12, seed=3)
    assert {p.name: p.read_bytes() for p in a.iterdir() if p.is_file()} == first
    other = build_cloze_task(corpus, tmp_path / "b", n_items=12, n_choices=4, seed=4)
    assert (other / f"{CLOZE_TASK}.jsonl").read_text() != first[f"{CLOZE_TASK}.jsonl"].decode()

    config = yaml.safe_load((a / f"{CLOZE_TASK}.yaml").read_text())
    assert config["task"] == CLOZE_TASK and config["output_type"] == "multiple_choice"
    assert config["dataset_path"] == "json" and config["target_delimiter"] == "\n"
    data_file = config["dataset_kwargs"]["data_files"]["test"]
    assert data_file == str(a / f"{CLOZE_TASK}.jsonl") and data_file.startswith("/")
    assert {m["metric"] for m in config["metric_list"]} == {"acc", "acc_norm"}
    rows = [json.loads(line) for line in (a / f"{CLOZE_TASK}.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    labels = set()
    stream = "\n".join(line for line in open(corpus).read().splitlines() if line.strip())
    for row in rows:
        assert len(row["choices"]) == 4 == len(set(row["choices"]))
        assert 0 <= row["label"] < 4 and len(row["context"].splitlines()) == 3
        labels.add(row["label"])
        # the true line follows the context in the corpus (blank lines between paragraphs skipped)
        assert row["context"] + "\n" + row["choices"][row["label"]] in stream
    assert len(labels) > 1  # shuffled, not always in first place

    # what lm-eval makes of the YAMLs: the requests' text, choices and targets
    from lm_eval.tasks import TaskManager

    loaded = TaskManager(include_path=str(a), include_defaults=False).load([CLOZE_TASK, LASTWORD_TASK])["tasks"]
    task = loaded[CLOZE_TASK]
    doc = next(iter(task.test_docs()))
    assert task.doc_to_text(doc) == rows[0]["context"] and task.doc_to_choice(doc) == rows[0]["choices"]
    assert task.doc_to_target(doc) == rows[0]["label"] and task.config.target_delimiter == "\n"
    task = loaded[LASTWORD_TASK]
    doc = next(iter(task.test_docs()))
    assert task.doc_to_target(doc) == " " + doc["target"]  # loglikelihood requests get no delimiter

    lw = yaml.safe_load((a / f"{LASTWORD_TASK}.yaml").read_text())
    assert lw["output_type"] == "loglikelihood" and lw["task"] == LASTWORD_TASK
    for row in map(json.loads, (a / f"{LASTWORD_TASK}.jsonl").read_text().splitlines()):
        assert row["target"].isalpha() and row["context"].split("\n")[-1]


def test_cloze_too_little_text(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("\n\n".join(f"Line number {i} of a tiny corpus here." for i in range(30)))
    with pytest.raises(UserError, match="usable lines"):
        build_cloze_task(str(small), tmp_path / "t", n_items=50)


def test_local_tasks_dense_and_pruned_through_lm_eval(corpus, tmp_path):
    include = build_cloze_task(corpus, tmp_path / "tasks", n_items=6, context_lines=2)
    build_lastword_task(corpus, include, n_items=6, context_lines=1)
    tok = byte_tokenizer()
    pad_before = tok.pad_token
    # layer 0: attention and MLP removed; layer 1: one KV group, half the MLP; layer 3: attention removed
    dense, pruned = pruned_tiny("llama_gqa", (LayerKeep(0, 0), LayerKeep(1, 48), LayerKeep(2, 96), LayerKeep(0, 32)))
    results = {}
    for name, model in (("dense", dense), ("pruned", pruned)):
        out = evaluate_zero_shot(model, tok, [CLOZE_TASK, LASTWORD_TASK], include_path=include,
                                 batch_size=8, max_length=256, device="cpu")
        results[name] = out
        assert set(out["tasks"]) == {CLOZE_TASK, LASTWORD_TASK}
        cloze = out["tasks"][CLOZE_TASK]
        assert 0.0 <= cloze["acc"] <= 1.0 and 0.0 <= cloze["acc_norm"] <= 1.0
        assert cloze["acc_stderr"] is not None and cloze["samples"] == 6
        assert cloze["reported"] == "acc" and cloze["score"] == cloze["acc"]
        lastword = out["tasks"][LASTWORD_TASK]
        assert lastword["acc"] is not None and lastword["acc_norm"] is None
        assert out["mean_acc"] == pytest.approx((cloze["acc"] + lastword["acc"]) / 2)
        assert out["max_length"] == 256 and out["limit"] is None and out["lm_eval_version"]
    assert tok.pad_token == pad_before  # the caller's tokenizer is not touched
    assert pruned.config.selfprune_layers[0] == [0, 0]


def test_limit_and_device_mismatch(corpus, tmp_path):
    include = build_cloze_task(corpus, tmp_path / "tasks", n_items=8, context_lines=1)
    model = build_tiny("qwen2")
    random.seed(11)
    torch.manual_seed(11)
    py_state, torch_state = random.getstate(), torch.get_rng_state()
    out = evaluate_zero_shot(model, byte_tokenizer(), [CLOZE_TASK], include_path=include, limit=3, max_length=128)
    assert out["tasks"][CLOZE_TASK]["samples"] == 3 and out["limit"] == 3
    # lm-eval reseeds the global generators; the caller's streams are restored
    assert random.getstate() == py_state and torch.equal(torch.get_rng_state(), torch_state)
    with pytest.raises(UserError, match="model is on cpu"):
        evaluate_zero_shot(model, byte_tokenizer(), [CLOZE_TASK], include_path=include, device="cuda")


def test_unreachable_hub_is_a_user_error(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    (tmp_path / "hub_task.yaml").write_text(yaml.safe_dump({
        "task": "selfprune_hub_only", "dataset_path": "selfprune-tests/not-a-dataset", "output_type": "multiple_choice",
        "test_split": "test", "doc_to_text": "{{q}}", "doc_to_choice": "{{choices}}", "doc_to_target": "label",
        "metric_list": [{"metric": "acc"}],
    }))
    with pytest.raises(UserError, match="hub is unreachable.*include_path"):
        evaluate_zero_shot(build_tiny("llama_mha"), byte_tokenizer(), ["selfprune_hub_only"], include_path=tmp_path)


@pytest.mark.slow
def test_paper_tasks_known_and_unknown_rejected():
    with pytest.raises(UserError, match="unknown lm-eval task 'arc_easyy'.*did you mean.*arc_easy"):
        evaluate_zero_shot(build_tiny("llama_mha"), byte_tokenizer(), ["arc_easyy"])
    from selfprune.evaluate.zeroshot import _manager

    assert set(PAPER_TASKS) <= set(_manager(None, True).all_tasks)  # the index built above, memoized


def test_summary_convention():
    fake = {
        "results": {
            "hellaswag": {"alias": "hellaswag", "acc,none": 0.4, "acc_stderr,none": 0.01,
                          "acc_norm,none": 0.5, "acc_norm_stderr,none": 0.01},
            "boolq": {"alias": "boolq", "acc,none": 0.6, "acc_stderr,none": "N/A"},
            "openbookqa": {"acc,none": 0.2, "acc_stderr,none": 0.02, "acc_norm,none": 0.3, "acc_norm_stderr,none": 0.02},
        },
        "n-samples": {"boolq": {"original": 100, "effective": 10}},
    }
    s = summarize(fake, ["hellaswag", "boolq", "openbookqa"], limit=10, max_length=2048, batch_size=8,
                  lm_eval_version="x")
    assert s["tasks"]["hellaswag"]["reported"] == "acc_norm" and s["tasks"]["hellaswag"]["score"] == 0.5
    assert s["tasks"]["openbookqa"]["score"] == 0.3 and s["tasks"]["boolq"]["score"] == 0.6
    assert s["tasks"]["boolq"]["acc_stderr"] is None and s["tasks"]["boolq"]["samples"] == 10
    assert s["mean_acc"] == pytest.approx((0.5 + 0.6 + 0.3) / 3)
    assert s["mean_acc_plain"] == pytest.approx((0.4 + 0.6 + 0.2) / 3)


@pytest.mark.slow
@pytest.mark.demo
def test_cloze_from_demo_corpus(real_home, tmp_path):
    out = build_cloze_task("demo", tmp_path, n_items=20)
    rows = (out / f"{CLOZE_TASK}.jsonl").read_text().splitlines()
    assert len(rows) == 20 and all(len(json.loads(r)["choices"]) == 4 for r in rows)


def test_lm_evals_request_bars_follow_tqdm_disable(corpus, tmp_path, capfd, monkeypatch):
    """lm-eval passes tqdm's ``disable`` itself, so ``TQDM_DISABLE`` (set by the CLI and in flow
    processes) would not reach its request bars; the wrapped model honours it."""
    include = build_cloze_task(corpus, tmp_path / "tasks", n_items=4, context_lines=1)
    model = build_tiny("llama_mha")
    for value, shown in (("1", False), ("", True)):
        monkeypatch.setenv("TQDM_DISABLE", value)
        evaluate_zero_shot(model, byte_tokenizer(), [CLOZE_TASK], include_path=include, limit=2, max_length=128)
        err = capfd.readouterr().err
        assert ("Running loglikelihood requests" in err) is shown and ("Tokenizing inputs" in err) is shown, err[-2000:]
