"""AutoPrune's metric search on a tiny model: the library and the flow run one loop, the GP oracle
is deterministic, a rerun evaluates nothing, SIGKILL resumes, an LLM oracle's hostile replies run
nothing, and the found metric prunes through `selfprune prune --metric best.json`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_openai_server import FakeOpenAI, reply
from helpers import run_cli, tiny_prune_args

TINY = dict(population=6, mutations=2, crossovers=2, generations=2, sparsities=[0.5], samples=4, calib_seqlen=64,
            seqlen=64, fitness_windows=2, test_windows=2, device="cpu")
BUILT_INS = {"magnitude", "wanda", "ria", "pruner-zero"}


def config(ws: Path, out: Path, **overrides):
    from selfprune.config import AutopruneConfig

    return AutopruneConfig(model=str(ws / "model"), data=str(ws / "corpus.txt"), out=str(out), **(TINY | overrides))


@pytest.fixture(scope="module")
def first(prefect_api, tiny_workspace, tmp_path_factory):
    from selfprune.flows.autoprune import autoprune

    out = tmp_path_factory.mktemp("autoprune") / "run"
    return autoprune(config(tiny_workspace, out)), out


def test_the_flow_writes_best_json_the_graph_and_scores_against_the_built_ins(first):
    from selfprune.metrics import parse_metric

    summary, out = first
    best = json.loads((out / "best.json").read_text())
    assert best["metric"] == summary["metric"] == parse_metric(best["metric"]).text
    assert set(best["test_ppl"]) == {"found"} | BUILT_INS and all(set(v) == {"0.5"} for v in best["test_ppl"].values())
    assert best["evaluations"] == 6 + 2 * (2 + 2) and best["cache_hits"] == 0
    assert best["lineage"][-1]["text"] == best["metric"] and best["lineage"][0]["parents"] == []
    sources = {n["source"] for n in best["graph"]}
    assert {"built-in", "gp"} <= sources and all(n["fitness"] is not None for n in best["graph"])
    assert best["fitness"] == min(n["fitness"] for n in best["graph"])
    assert (out / "metrics.png").read_bytes()[:4] == b"\x89PNG" and (out / "fitness.png").exists()


def test_the_library_runs_the_same_search(first, tiny_workspace, tmp_path):
    import selfprune

    summary, _ = first
    again = selfprune.autoprune(config(tiny_workspace, tmp_path / "lib"))
    assert (again.metric, again.fitness, again.test_ppl) == (summary["metric"], summary["fitness"], summary["test_ppl"])
    assert (tmp_path / "lib" / "best.json").read_text() == json.dumps(again.to_json(), indent=2)


# best.json's keys, in the order the summary's dict had them before it was typed
KEYS = ["metric", "key", "fitness", "lineage", "test_ppl", "test_tokens", "seqlen", "graph", "invalid", "evaluations",
        "cache_hits", "fitness_tokens", "oracle_calls", "oracle_fallbacks", "oracle", "wall_s", "history",
        "model_fingerprint", "stats_key", "precision", "protocol", "fitness_protocol", "config"]


def test_the_summary_reads_back_the_best_json_it_wrote_byte_for_byte(first):
    """The flow's best.json and result are :meth:`MetricSummary.to_json` (with the flow's replay
    count last); reading either back with ``from_json`` gives the same bytes again."""
    from selfprune.evolve.autoprune import MetricSummary

    result, out = first
    text = (out / "best.json").read_text()
    assert list(json.loads(text)) == KEYS + ["oracle_replays"] and json.dumps(result, indent=2) == text
    read = MetricSummary.from_json(json.loads(text))
    assert json.dumps(read.to_json(), indent=2) == text and MetricSummary.from_json(read.to_json()) == read
    assert read.record.history[0].generation == 0 and read.oracle_replays == 0


def test_a_rerun_evaluates_nothing(first, tiny_workspace, tmp_path):
    from selfprune.flows.autoprune import autoprune

    summary, _ = first
    again = autoprune(config(tiny_workspace, tmp_path / "rerun"))
    assert again["evaluations"] == 0 and again["cache_hits"] == summary["evaluations"]
    assert again["metric"] == summary["metric"]


def test_the_found_metric_prunes_and_reports(first, tiny_workspace, tmp_path, capsys, monkeypatch):
    _, out = first
    code, _, err = run_cli(capsys, monkeypatch, *tiny_prune_args(tiny_workspace, tmp_path / "found", "--metric",
                                                                 str(out / "best.json"), "--sparsity", "0.5"))
    assert code == 0, err
    record = json.loads((tmp_path / "found" / "selfprune.json").read_text())
    assert record["metric"]["text"] == json.loads((out / "best.json").read_text())["metric"]


@pytest.mark.slow
def test_seeds_run_the_search_once_per_seed(first, tiny_workspace, tmp_path):
    """--seeds: one subflow per seed (seed 0 is ``first``'s search, all from the cache), and the
    spread of the found metric's figures; the library's seeds give the same."""
    import selfprune
    from selfprune.flows.autoprune import autoprune

    summary, _ = first
    seeds = autoprune(config(tiny_workspace, tmp_path / "seeds", seeds=[0, 1]))
    seed0 = json.loads((tmp_path / "seeds" / "seed-0" / "best.json").read_text())
    assert seed0["evaluations"] == 0 and seed0["metric"] == summary["metric"]
    assert set(seeds["spread"]) == {"fitness", "test_ppl@0.5"}
    assert seeds["spread"]["test_ppl@0.5"]["values"]["0"] == summary["test_ppl"]["found"]["0.5"]
    assert json.loads((tmp_path / "seeds" / "seeds.json").read_text()) == seeds
    library = selfprune.autoprune(config(tiny_workspace, tmp_path / "library", seeds=[0, 1]))
    assert library.spread == seeds["spread"] and library.to_json() == seeds | {"config": library.config}


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_with_the_same_best(first, tiny_workspace, tmp_path):
    summary, _ = first
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "PREFECT_LOCAL_STORAGE_PATH")}
    env["SELFPRUNE_HOME"] = str(tmp_path / "home")
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "selfprune.app.cli", "autoprune", "--model", str(tiny_workspace / "model"), "--data",
           str(tiny_workspace / "corpus.txt"), "--out", str(out)]
    for k, v in TINY.items():
        cmd += [f"--{'sparsity' if k == 'sparsities' else k.replace('_', '-')}", ",".join(map(str, v)) if isinstance(v, list) else str(v)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ledger = out / "evaluations.jsonl"
    deadline = time.monotonic() + 180
    while (not ledger.exists() or len(ledger.read_text().splitlines()) < 8) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = json.loads((out / "best.json").read_text())
    assert (resumed["metric"], resumed["fitness"]) == (summary["metric"], summary["fitness"])
    assert resumed["cache_hits"] >= 7


HOSTILE = [
    "__import__('os').system('touch {sentinel}')",
    "open('{sentinel}', 'w')",
    "[W for W in range(3)]",
    "lambda: W",
    "W.__class__.__mro__",
]


@pytest.mark.slow
def test_an_llm_oracle_with_hostile_replies_runs_nothing_and_is_replayed(prefect_api, tiny_workspace, tmp_path):
    from selfprune.flows.autoprune import autoprune

    sentinel = tmp_path / "pwned"
    proposals = [{"parent": "m1", "other_parent": None, "edit": "x", "metric": h.format(sentinel=sentinel)} for h in HOSTILE]
    hostile = json.dumps({"reasoning": "trust me", "metrics": proposals})
    good = json.dumps({"reasoning": "scale by the input variance", "metrics": [
        {"parent": "m1", "other_parent": None, "edit": "+X_var", "metric": "abs(W) * X_var ** 0.5"},
        {"parent": "m1", "other_parent": None, "edit": "+rowzscore", "metric": "rowzscore(abs(W)) * X_rms"}]})
    with FakeOpenAI([reply(hostile), reply(good)]) as server:
        cfg = config(tiny_workspace, tmp_path / "llm", oracle="openai:fake-gpt", base_url=server.base_url, oracle_timeout=10)
        summary = autoprune(cfg)
        sent = len(server.requests)
        again = autoprune(cfg.model_copy(update={"out": str(tmp_path / "llm-again")}))
        assert len(server.requests) == sent > 0  # every reply replayed from the cache
    assert not sentinel.exists()
    assert summary["oracle"]["fallbacks"] > 0 and summary["oracle"]["refused"] >= len(HOSTILE)
    assert any(n["source"] == "llm" for n in summary["graph"])
    assert again["metric"] == summary["metric"] and again["evaluations"] == 0


@pytest.mark.parametrize("extra,message", [
    (["--pattern", "2:4", "--sparsity", "0.6"], "2:4 prunes exactly 0.5"),
    (["--pattern", "2:4", "--sparsity", "0.5", "--allocation", "sdsa"], "--allocation uniform"),
    (["--allocation", "rates.json"], "must be registered"),
    (["--oracle", "ga"], "unknown"),
    (["--sparsity", "1.5"], "--sparsity"),
    (["--seed", "3", "--seeds", "0,1"], "give --seed or --seeds, not both"),
    (["--seeds", "0,1,0"], "repeats a seed"),
])
def test_bad_autoprune_input_exits_2_before_any_work(tiny_workspace, tmp_path, capsys, monkeypatch, extra, message):
    args = ["autoprune", "--model", str(tiny_workspace / "model"), "--data", str(tiny_workspace / "corpus.txt"),
            "--out", str(tmp_path / "bad"), "--device", "cpu", *extra]
    code, _, err = run_cli(capsys, monkeypatch, *args)
    assert code == 2 and message in " ".join(err.split()), err[-2000:]


@pytest.mark.slow
def test_metrics_judged_after_reconstruction_under_atp(tiny_workspace, tmp_path):
    """``--reconstruct sparsegpt --allocation atp``: each metric is judged on the model its mask gives
    after SparseGPT's update, under ATP's per-layer sparsities (the same mask as without it, other
    weights); SparseGPT's own mask, which no metric decides, is refused."""
    import selfprune
    from selfprune.core.errors import UserError

    plain = selfprune.autoprune(config(tiny_workspace, tmp_path / "plain", allocation="atp", generations=1))
    rebuilt = selfprune.autoprune(config(tiny_workspace, tmp_path / "sgpt", allocation="atp", generations=1,
                                         reconstruct="sparsegpt"))
    assert rebuilt.record.config["reconstruct"] == "sparsegpt"
    assert rebuilt.test_ppl["wanda"] != plain.test_ppl["wanda"]  # the same mask, other weights
    with pytest.raises(UserError, match="chooses its own mask"):
        selfprune.autoprune(config(tiny_workspace, tmp_path / "bad", reconstruct="sparsegpt-adaptive"))
