"""The search as a real Prefect flow on a tiny model: results, caching, resume after SIGKILL,
and the LLM oracle through the real openai client against a local HTTP server."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from fake_openai_server import FakeOpenAI, reply

from selfprune.allocators.rates import project_to_mean
from selfprune.engine.candidate import Structured

# The paper's generation 0 (no baselines): these tests count evaluations exactly.
SMALL = dict(population=6, mutations=2, crossovers=2, generations=4, samples=4, calib_seqlen=64, seqlen=64,
             fitness_windows=4, test_windows=4, device="cpu", baselines="none")
REQUIRED = {"rates", "structure", "fitness", "test_ppl", "evaluations", "cache_hits", "oracle_calls",
            "oracle_fallbacks", "wall_s"}


def run_search(ws: Path, out: Path, return_state: bool = False, **overrides):
    from selfprune.config import SearchConfig
    from selfprune.flows.search import search

    config = SearchConfig(model=str(ws / "model"), data=str(ws / "corpus.txt"), out=str(out),
                          **({"ratio": 0.5} | SMALL | overrides))
    return search(config, return_state=return_state)


def ledger(out: Path) -> list[dict]:
    path = out / "evaluations.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def first_run(prefect_api, tiny_workspace, tmp_path_factory):
    """The search, its run directory, and its cached scores (this module's results start empty)."""
    from selfprune.tasks.prefect_env import results_dir

    out = tmp_path_factory.mktemp("search") / "run"
    return run_search(tiny_workspace, out), out, sorted(results_dir().glob("score_candidate-*"))


def test_search_writes_best_json_and_plots(first_run):
    summary, out, _ = first_run
    best = json.loads((out / "best.json").read_text())
    assert REQUIRED <= set(best) and best["rates"] == summary["rates"]
    assert abs(sum(best["rates"]) / 4 - 0.5) < 1e-6 and max(best["rates"]) <= 0.9
    assert best["evaluations"] == 6 + 4 * (2 + 2) and best["cache_hits"] == 0
    assert [h["generation"] for h in best["history"]] == list(range(5))
    assert all(a["best"] >= b["best"] for a, b in zip(best["history"], best["history"][1:]))  # elitist
    assert best["fitness"] == best["history"][-1]["best"] <= best["uniform_fitness"]
    assert (out / "fitness.png").stat().st_size > 1000 and (out / "rates.png").stat().st_size > 1000
    # Every evaluation is in the ledger once: the candidates and the three final scores (best and
    # uniform on the test split, uniform on the fitness split).
    assert len(ledger(out)) == best["evaluations"] + 3


def test_rerun_evaluates_nothing_and_finds_the_same_best(first_run, tiny_workspace, tmp_path):
    summary, *_ = first_run
    again = run_search(tiny_workspace, tmp_path / "rerun")
    assert again["evaluations"] == 0 and again["cache_hits"] == summary["evaluations"]
    assert (again["rates"], again["fitness"], again["test_ppl"]) == (summary["rates"], summary["fitness"], summary["test_ppl"])
    assert ledger(tmp_path / "rerun") == []


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(first_run, tiny_workspace, tmp_path):
    """Kill the CLI mid-search with SIGKILL, run the same command again: no candidate is
    evaluated twice (but the one in flight), and the result equals the uninterrupted run's."""
    summary, *_ = first_run
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "PREFECT_LOCAL_STORAGE_PATH")}
    env["SELFPRUNE_HOME"] = str(tmp_path / "home")  # a cold cache; the API server is shared
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "selfprune.app.cli", "search", "--model", str(tiny_workspace / "model"),
           "--data", str(tiny_workspace / "corpus.txt"), "--ratio", "0.5", "--out", str(out)]
    for k, v in SMALL.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(ledger(out)) < 9 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"the search ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = len(ledger(out))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = json.loads((out / "best.json").read_text())
    assert (resumed["rates"], resumed["fitness"], resumed["test_ppl"]) == (summary["rates"], summary["fitness"], summary["test_ppl"])
    counts = Counter((json.dumps(e["structure"]), e["split"]) for e in ledger(out))
    repeated = [k for k, n in counts.items() if n > 1]
    assert len(repeated) <= 1, repeated  # only the evaluation in flight at the kill
    assert resumed["cache_hits"] >= before - 1 and resumed["evaluations"] + resumed["cache_hits"] == 22


def _llm_reply(n: int, seed: int) -> str:
    rng = random.Random(seed)
    vectors = [[round(x, 4) for x in project_to_mean([rng.uniform(0, 0.9) for _ in range(4)], 0.5, 0.9)] for _ in range(n)]
    return "Here are the configurations:\n" + json.dumps({"rates": vectors})


@pytest.mark.slow
def test_llm_oracle_search_replays_cached_replies(prefect_api, tiny_workspace, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret-123")
    script = [reply(_llm_reply(8, s)) for s in range(12)]
    with FakeOpenAI(script) as server:
        first = run_search(tiny_workspace, tmp_path / "llm", oracle="openai:fake-gpt", base_url=server.base_url,
                           generations=2, api_key_env="OPENAI_API_KEY")  # the key named for this server
        asked = len(server.requests)
        assert first["oracle_calls"] >= 3 and asked == first["oracle_calls"]
        assert server.requests[0].headers["authorization"] == "Bearer sk-test-secret-123"
        # The same command again (same server address, hence same request keys): all replayed.
        again = run_search(tiny_workspace, tmp_path / "llm2", oracle="openai:fake-gpt", base_url=server.base_url,
                           generations=2, api_key_env="OPENAI_API_KEY")
        assert len(server.requests) == asked
    assert (again["rates"], again["fitness"]) == (first["rates"], first["fitness"]) and again["oracle_calls"] == 0
    # Reply accounting: every request ended one way; replays account exactly as the first run did.
    assert sum(first["oracle"]["replies"].values()) == first["oracle"]["calls"] == asked
    assert again["oracle"] | {"seconds": 0} == first["oracle"] | {"seconds": 0}
    assert first["oracle"]["completion_tokens"] == asked
    # The key reaches no file the run wrote, and no cached result.
    from selfprune.tasks.prefect_env import results_dir

    for path in [*(tmp_path / "llm").rglob("*"), *results_dir().rglob("*")]:
        if path.is_file():
            assert b"sk-test-secret-123" not in path.read_bytes(), path


@pytest.mark.slow
def test_failed_generation_fails_the_run_and_a_retry_finishes_only_the_rest(prefect_api, tiny_workspace, tmp_path):
    """The oracle goes down past its retries mid-search: the flow run fails with the reason.
    `prefect flow-run retry` (what the UI's Retry does) then completes it, re-evaluating nothing."""
    from fake_openai_server import status

    from selfprune.llm.chat import OracleUnavailable

    out = tmp_path / "retry"
    good = [reply(_llm_reply(8, 50 + s)) for s in range(3)]  # candidates the other LLM test did not score
    with FakeOpenAI([*good, status(500)]) as server:
        # seed 7: requests the other LLM test did not make, so nothing comes from this module's cache
        state = run_search(tiny_workspace, out, oracle="openai:fake-gpt", base_url=server.base_url, generations=3,
                           seed=7, oracle_timeout=5.0, return_state=True)
        assert state.is_failed()
        with pytest.raises(OracleUnavailable, match="500"):
            state.result()
        evaluated = len(ledger(out))
        assert evaluated >= 6 and not (out / "best.json").exists()
        server.script = [reply(_llm_reply(8, 100 + s)) for s in range(1)]  # the oracle is back
        retry = subprocess.run(
            [sys.executable, "-m", "prefect", "flow-run", "retry", str(state.state_details.flow_run_id),
             "--entrypoint", "selfprune.flows.search.search"],
            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
        )
    assert retry.returncode == 0, retry.stdout[-3000:] + retry.stderr[-3000:]
    best = json.loads((out / "best.json").read_text())
    counts = Counter((json.dumps(e["structure"]), e["split"]) for e in ledger(out))
    assert max(counts.values()) == 1  # nothing that had completed ran again
    assert len(ledger(out)) > evaluated and REQUIRED <= set(best)


def test_library_search_runs_the_same_loop_as_the_flow(first_run, tiny_workspace, tmp_path):
    """selfprune.search (no Prefect, no task cache) follows the same path to the same best."""
    import selfprune

    summary, *_ = first_run
    plain = selfprune.search(model=str(tiny_workspace / "model"), data=str(tiny_workspace / "corpus.txt"), ratio=0.5,
                             out=str(tmp_path / "plain"), **SMALL)
    assert (plain.rates, plain.fitness, plain.test_ppl) == (summary["rates"], summary["fitness"], summary["test_ppl"])
    assert plain.to_json()["history"] == summary["history"] and plain.record.evaluations == summary["evaluations"]
    text = (tmp_path / "plain" / "best.json").read_text()
    assert text == json.dumps(plain.to_json(), indent=2) and list(json.loads(text)) == KEYS


# best.json's keys (no reconstruction, no baseline scored), in the order the summary's dict had them before it was typed
KEYS = ["rates", "structure", "fitness", "kept_params", "test_ppl", "test_tokens", "seqlen", "uniform_fitness",
        "uniform_test_ppl", "baselines", "evaluations", "cache_hits", "fitness_tokens", "oracle_calls", "oracle_fallbacks",
        "oracle", "wall_s", "history", "model_fingerprint", "stats_key", "precision", "protocol", "fitness_protocol",
        "config", "export"]


def test_the_summary_reads_back_the_best_json_it_wrote_byte_for_byte(first_run):
    """The flow's best.json and result are :meth:`RateSummary.to_json` (its replay count last);
    reading either back with ``from_json`` gives the same bytes again."""
    from selfprune.evolve.runner import RateSummary

    result, out, _ = first_run
    text = (out / "best.json").read_text()
    assert list(json.loads(text)) == KEYS + ["oracle_replays"] and json.dumps(result, indent=2) == text
    read = RateSummary.from_json(json.loads(text))
    assert json.dumps(read.to_json(), indent=2) == text and RateSummary.from_json(read.to_json()) == read
    assert read.reconstruct is None and read.best_baseline is None and read.record.history[-1].best == read.fitness


def test_a_corrupt_cached_result_is_recomputed_with_a_warning(first_run, tiny_workspace, tmp_path, caplog):
    summary, _, scores = first_run
    victim = scores[len(scores) // 2]
    victim.write_bytes(victim.read_bytes()[:40])  # truncated, as after a disk fault
    with caplog.at_level("WARNING", logger="selfprune.cache"):
        again = run_search(tiny_workspace, tmp_path / "again")
    assert any(victim.name in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)
    assert list(victim.parent.glob(victim.name + ".corrupt-*"))  # kept aside, not deleted
    assert (again["rates"], again["fitness"], again["test_ppl"]) == (summary["rates"], summary["fitness"], summary["test_ppl"])
    assert len(ledger(tmp_path / "again")) == 1  # only the corrupt entry was computed again


def test_float32_and_bfloat16_runs_share_no_cached_number(first_run, tiny_workspace, tmp_path):
    summary, *_ = first_run
    bf16 = run_search(tiny_workspace, tmp_path / "bf16", dtype="bfloat16", generations=1)
    assert bf16["cache_hits"] == 0 and bf16["evaluations"] == 6 + 4
    assert bf16["stats_key"] != summary["stats_key"] and bf16["precision"] == {"device": "cpu", "dtype": "bfloat16"}
    assert summary["precision"] == {"device": "cpu", "dtype": "float32"}
    assert len(ledger(tmp_path / "bf16")) == bf16["evaluations"] + 3  # the final scores too: nothing shared


def test_a_split_too_short_fails_before_the_calibration_pass(prefect_api, tiny_workspace, tmp_path, capsys, monkeypatch):
    from helpers import run_cli

    from selfprune.storage.store import ArtifactStore

    monkeypatch.setenv("SELFPRUNE_HOME", str(tmp_path / "home"))
    code, _, err = run_cli(capsys, monkeypatch, "search", "--model", str(tiny_workspace / "model"), "--data",
                           str(tiny_workspace / "corpus.txt"), "--samples", "4", "--calib-seqlen", "64", "--seqlen", "64",
                           "--test-windows", "100000", "--device", "cpu", "--out", str(tmp_path / "short"))
    assert code == 2 and "split test" in err and "100000 windows" in err
    assert "flow-run retry" not in err.strip().splitlines()[-1]  # bad input: a retry would fail the same way
    assert not list(ArtifactStore().root.rglob("*.safetensors"))  # no statistics were computed


@pytest.mark.slow
def test_a_late_oracle_reply_falls_back_and_is_asked_again_by_a_rerun(prefect_api, tiny_workspace, tmp_path, monkeypatch):
    from fake_openai_server import slow

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    script = [slow(3.0, _llm_reply(6, 300)), *[reply(_llm_reply(6, 301 + s)) for s in range(20)]]
    with FakeOpenAI(script) as server:
        late = run_search(tiny_workspace, tmp_path / "late", oracle="openai:fake-gpt", base_url=server.base_url,
                          generations=1, oracle_timeout=1.0, seed=11)
        assert late["oracle"]["replies"]["late"] == 1 and late["oracle_fallbacks"] >= 6  # G_0 came from the GA
        asked = len(server.requests)
        again = run_search(tiny_workspace, tmp_path / "again", oracle="openai:fake-gpt", base_url=server.base_url,
                           generations=1, oracle_timeout=1.0, seed=11)
    assert server.requests[asked].body == server.requests[0].body  # the late question, asked again
    assert again["oracle"]["replies"]["late"] == 0 and again["oracle_calls"] >= 1


def test_a_search_started_from_the_baselines_ends_at_or_below_the_best_of_them(prefect_api, tiny_workspace, tmp_path):
    """Generation 0 holds every registered allocation at the ratio (computed through the cached
    allocation task); the best found is at or below the best of them, and the library's search,
    which allocates in process, takes the same path."""
    import selfprune
    from selfprune.config import registered_allocations
    from selfprune.engine.models import load_model
    from selfprune.engine.settings import Calibration, Scoring
    from selfprune.engine.workbench import Workbench
    from selfprune.methods.structure import rates_to_structure, structure_to_json

    baselines = registered_allocations()
    small = SMALL | {"baselines": ",".join(baselines), "generations": 2, "reconstruct": "lsq"}
    summary = run_search(tiny_workspace, tmp_path / "flow", **small)
    assert [b["name"] for b in summary["baselines"]] == baselines
    best = summary["best_baseline"]
    assert best["fitness"] == min(b["fitness"] for b in summary["baselines"])
    assert summary["fitness"] <= best["fitness"] and summary["beyond_best_baseline"] >= 0
    assert summary["beyond_best_baseline"] == 1 - summary["fitness"] / best["fitness"]

    bench = Workbench(load_model(str(tiny_workspace / "model"), "cpu"), Calibration(str(tiny_workspace / "corpus.txt"), 4, 64))
    owl = next(b for b in summary["baselines"] if b["name"] == "owl")
    assert owl["rates"] == bench.pruner.allocate("owl", 0.5)  # the flow's cached task gave the library's rates
    fitness = bench.score(Structured(rates_to_structure(bench.arch, owl["rates"])),
                          Scoring(str(tiny_workspace / "corpus.txt"), "fitness", 64, 4)).ppl
    assert owl["fitness"] == fitness  # and generation 0 scored them as any candidate
    evaluated = [json.dumps(e["structure"]) for e in ledger(tmp_path / "flow") if e["split"] == "fitness"]
    assert json.dumps(structure_to_json(rates_to_structure(bench.arch, owl["rates"]))) in evaluated
    test = Scoring(str(tiny_workspace / "corpus.txt"), "test", 64, 4)
    rebuilt = bench.score(Structured(rates_to_structure(bench.arch, summary["rates"]), "lsq"), test).ppl
    assert summary["reconstruct"] == "lsq" and summary["reconstructed_test_ppl"] == rebuilt != summary["test_ppl"]

    plain = selfprune.search(model=str(tiny_workspace / "model"), data=str(tiny_workspace / "corpus.txt"), ratio=0.5,
                             out=str(tmp_path / "plain"), **small)
    assert (plain.rates, plain.fitness, plain.baselines) == (summary["rates"], summary["fitness"], summary["baselines"])
    assert list(plain.to_json()) == [k for k in summary if k != "oracle_replays"]  # the optional parts in their places


def test_reconstruct_top_keeps_the_candidate_best_after_reconstruction(prefect_api, tiny_workspace, tmp_path):
    """``reconstruct_top`` N: the search's N best and every baseline are rebuilt and scored on the
    fitness split; the lowest is kept, named in best.json, and what a prune from best.json takes.
    The flow and the library agree."""
    import selfprune
    from selfprune.allocators import rate_file
    from selfprune.core.errors import UserError
    from selfprune.engine.models import load_model
    from selfprune.engine.settings import Calibration, Scoring
    from selfprune.engine.workbench import Workbench
    from selfprune.methods.structure import rates_to_structure

    small = SMALL | {"baselines": "uniform,atp", "generations": 1, "reconstruct": "lsq", "reconstruct_top": 2}
    summary = run_search(tiny_workspace, tmp_path / "flow", **small)
    choices = summary["reconstructed_choices"]
    names = [c["name"] for c in choices]
    # the 2 best (a surviving baseline under its own name), then the other baselines; each once
    assert names[0] in ("search #1", "uniform", "atp") and {"uniform", "atp"} <= set(names)
    assert len(set(names)) == len(names) in (3, 4)
    kept = summary["reconstructed"]
    assert kept["reconstructed_fitness"] == min(c["reconstructed_fitness"] for c in choices)
    assert kept["name"] == min(choices, key=lambda c: c["reconstructed_fitness"])["name"]

    corpus = str(tiny_workspace / "corpus.txt")
    bench = Workbench(load_model(str(tiny_workspace / "model"), "cpu"), Calibration(corpus, 4, 64))
    structure = Structured(rates_to_structure(bench.arch, kept["rates"]), "lsq")
    assert bench.score(structure, Scoring(corpus, "fitness", 64, 4)).ppl == kept["reconstructed_fitness"]
    assert bench.score(structure, Scoring(corpus, "test", 64, 4)).ppl == summary["reconstructed_test_ppl"]
    allocate = rate_file(str(tmp_path / "flow" / "best.json"))
    assert allocate(None, bench.arch, {}, 0.5) == kept["rates"]  # prune --allocation best.json builds the kept one

    plain = selfprune.search(model=str(tiny_workspace / "model"), data=corpus, ratio=0.5, out=str(tmp_path / "lib"), **small)
    assert (plain.reconstructed, plain.reconstructed_test_ppl) == (kept, summary["reconstructed_test_ppl"])
    with pytest.raises(UserError, match="add --reconstruct lsq"):
        selfprune.search(model=str(tiny_workspace / "model"), data=corpus, ratio=0.5, out=str(tmp_path / "bad"),
                         **(small | {"reconstruct": "none"}))


@pytest.mark.slow
def test_a_sparsity_search_finds_per_layer_sparsities_of_a_metric(prefect_api, tiny_workspace, tmp_path):
    """``--metric wanda --pattern unstructured``: Self-Pruner's loop over per-layer sparsities of
    the metric's single-weight pruning, from the baselines (the metric's own OWL, ATP, ...), cached
    and resumable like the structured search, the library and the flow on one path."""
    import selfprune
    from selfprune.engine.candidate import from_json
    from selfprune.engine.models import load_model
    from selfprune.engine.settings import Calibration, Scoring
    from selfprune.engine.workbench import Workbench

    small = SMALL | {"baselines": "uniform,owl,atp", "generations": 2, "metric": "wanda", "pattern": "unstructured",
                     "ratio": 0.6, "reconstruct": "sparsegpt"}
    summary = run_search(tiny_workspace, tmp_path / "flow", **small)
    best = summary["structure"]
    assert best["metric"] == "X_rms * abs(W)" and best["pattern"] == "unstructured" and best["sparsity"] == 0.6
    assert abs(sum(best["rates"]) / 4 - 0.6) < 1e-4 and best["rates"] == [round(r, 5) for r in summary["rates"]]
    assert summary["fitness"] <= summary["best_baseline"]["fitness"]
    bench = Workbench(load_model(str(tiny_workspace / "model"), "cpu"), Calibration(str(tiny_workspace / "corpus.txt"), 4, 64))
    test = bench.score(from_json(best), Scoring(str(tiny_workspace / "corpus.txt"), "test", 64, 4)).ppl
    assert summary["test_ppl"] == test  # the best's model is the metric's, zeroed at the searched sparsities
    rebuilt = bench.score(replace(from_json(best), reconstruct="sparsegpt"), Scoring(str(tiny_workspace / "corpus.txt"), "test", 64, 4))
    assert summary["reconstructed_test_ppl"] == rebuilt.ppl < test  # and SparseGPT's update on its mask
    zeros = 1 - summary["kept_params"] / bench.arch.n_layers / bench.arch.layer_params
    assert abs(zeros - 0.6) < 0.01

    again = run_search(tiny_workspace, tmp_path / "again", **small)
    assert again["evaluations"] == 0 and again["rates"] == summary["rates"]  # every candidate from the cache
    plain = selfprune.search(model=str(tiny_workspace / "model"), data=str(tiny_workspace / "corpus.txt"),
                             out=str(tmp_path / "plain"), **small)
    assert (plain.rates, plain.fitness, plain.test_ppl) == (summary["rates"], summary["fitness"], summary["test_ppl"])


@pytest.mark.parametrize("extra,message", [({"pattern": "unstructured"}, "give --metric too"),
                                           ({"pattern": "2:4", "metric": "wanda"}, "no per-layer sparsities")])
def test_a_sparsity_search_needs_a_metric_and_a_free_pattern(extra, message):
    from selfprune.config import SearchConfig
    from selfprune.core.errors import UserError
    from selfprune.evolve.runner import check

    with pytest.raises((UserError, ValueError), match=message):
        check(SearchConfig(**extra))
