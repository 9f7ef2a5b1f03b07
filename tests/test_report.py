"""The comparison report over two small search runs: every table, plot and artifact; a rerun
recomputes nothing; bad input exits 2."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import run_cli

from selfprune.evaluate.report import Report, ReportMeta, Row, merge_seeds

SMALL = dict(population=4, mutations=2, crossovers=2, generations=1, samples=4, calib_seqlen=64, seqlen=64,
             fitness_windows=4, test_windows=4, device="cpu")
METHODS = [("dense", None), ("uniform", 0.3), ("owl", 0.3), ("search", 0.3), ("uniform", 0.5), ("owl", 0.5), ("search", 0.5)]


@pytest.fixture(scope="module")
def searches(prefect_api, tiny_workspace, tmp_path_factory) -> list[Path]:
    from selfprune.config import SearchConfig
    from selfprune.flows.search import search

    root = tmp_path_factory.mktemp("searches")
    for r in (0.3, 0.5):
        search(SearchConfig(model=str(tiny_workspace / "model"), data=str(tiny_workspace / "corpus.txt"), ratio=r,
                            out=str(root / f"s{r}"), **SMALL))
    return [root / f"s{r}" / "best.json" for r in (0.3, 0.5)]


def report_args(ws: Path, searches: list[Path], out: Path, *extra: str) -> list[str]:
    args = ["report", "--model", str(ws / "model"), "--data", str(ws / "corpus.txt"), "--ratios", "0.3,0.5",
            "--tasks", "selfprune_cloze", "--limit", "3", "--cloze-items", "8", "--seqlen", "64",
            "--test-windows", "4", "--max-length", "256", "--out", str(out), "--device", "cpu"]
    for s in searches:
        args += ["--search", str(s)]
    return args + list(extra)


@pytest.fixture(scope="module")
def first_report(searches, tiny_workspace, tmp_path_factory):
    from selfprune.config import ReportConfig
    from selfprune.flows.report import report

    out = tmp_path_factory.mktemp("report") / "r"
    summary = report(ReportConfig(model=str(tiny_workspace / "model"), data=str(tiny_workspace / "corpus.txt"),
                                  ratios=[0.3, 0.5], searches=[str(s) for s in searches], tasks=["selfprune_cloze"],
                                  limit=3, cloze_items=8, seqlen=64, test_windows=4, max_length=256, out=str(out),
                                  device="cpu"))
    return summary, out


@pytest.mark.slow
def test_report_has_every_table_and_plot(first_report, searches):
    summary, out = first_report
    rows = summary["rows"]
    assert [(r["method"], r["ratio"]) for r in rows] == METHODS
    for r in rows:
        assert r["ppl"] > 1 and r["tokens"] == 4 * 63 and r["seqlen"] == 64
        assert 0 <= r["acc"]["selfprune_cloze"] <= 1 and r["mean_acc"] == r["acc"]["selfprune_cloze"]
        assert r["zero_shot"]["tasks"]["selfprune_cloze"]["samples"] == 3
    # The search's own test scores are the report's (one cached task for both).
    for best_path, r in zip(searches, [rows[3], rows[6]]):
        best = json.loads(best_path.read_text())
        assert r["ppl"] == best["test_ppl"] and r["rates"] == best["rates"]
        uniform = next(u for u in rows if u["method"] == "uniform" and u["ratio"] == best["config"]["ratio"])
        assert uniform["ppl"] == best["uniform_test_ppl"]
    assert summary["meta"]["cached"] == 4 and summary["meta"]["computed"] == 10

    md = (out / "report.md").read_text()
    assert "| ratio | method | realized | kept params | test ppl | selfprune_cloze | mean acc | candidates |" in md
    assert md.count("| search (ga) |") == 2 and md.count("| owl |") == 2 and md.count("| dense |") == 1
    assert "4 non-overlapping windows of 64 tokens" in md and "](ppl.png)" in md and "](accuracy.png)" in md
    # The protocol, once above the table: what every row was measured under.
    import torch

    protocol = rows[0]["protocol"]
    assert all(r["protocol"] | {"seed": None} == protocol for r in rows)
    assert protocol["split"] == "test" and protocol["windows"] == 4 and protocol["seqlen"] == 64
    assert protocol["calibration"].endswith("4 x 64 tokens") and protocol["dtype"] == "float32"
    assert md.count(f"torch {torch.__version__}") == 1 and md.count("calibration: ") == 1
    assert [r["seed"] for r in rows if r["method"] == "search"] == [0, 0]
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "src='ppl.png'" not in html
    assert html.count("<tr>") == 1 + 7 and "<th>selfprune_cloze</th>" in html
    for name in ("ppl.png", "accuracy.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG" and (out / name).stat().st_size > 5000
    assert json.loads((out / "report.json").read_text())["rows"] == json.loads(json.dumps(rows))
    text = (out / "report.json").read_text()  # the flow's result with its files, and what it wrote, read back
    assert json.dumps(Report.from_json(json.loads(text)).to_json(), indent=2) == text
    assert Report.from_json(summary).to_json() == summary and set(summary["files"]) >= {"report.md", "ppl.png"}


@pytest.mark.slow
def test_report_artifacts_published(first_report, prefect_api):
    import httpx

    keys = ["selfprune-report-r", "selfprune-report-r-table"]
    found = httpx.post(f"{prefect_api.rstrip('/')}/artifacts/filter",
                       json={"artifacts": {"key": {"any_": keys}}, "sort": "CREATED_DESC", "limit": 10}).json()
    assert {a["type"] for a in found} == {"markdown", "table"}
    table = next(a for a in found if a["type"] == "table")
    data = json.loads(table["data"]) if isinstance(table["data"], str) else table["data"]
    assert len(data) == 7 and {"test ppl", "mean acc", "selfprune_cloze"} <= set(data[0])
    markdown = next(a for a in found if a["type"] == "markdown")
    assert "| search (ga) |" in markdown["data"]


@pytest.mark.slow
def test_rerun_through_cli_computes_nothing(first_report, searches, tiny_workspace, tmp_path, capsys, monkeypatch):
    summary, _ = first_report
    code, _, err = run_cli(capsys, monkeypatch, *report_args(tiny_workspace, searches, tmp_path / "again"))
    assert code == 0, err
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert again["meta"]["computed"] == 0 and again["meta"]["cached"] == 14
    assert [r["ppl"] for r in again["rows"]] == [r["ppl"] for r in summary["rows"]]
    assert not (tmp_path / "again" / "evaluations.jsonl").exists()
    assert "search" in err and "computed 0" in err


@pytest.mark.slow
@pytest.mark.parametrize("extra, message", [
    (["--ratios", "0.3,abc"], "--ratios: Input should be a valid number"),
    (["--ratios", "1.5"], "--ratios: Input should be less than 1"),
    (["--search", "{missing}"], "does not exist"),
    (["--include-path", "{missing}"], "built from --data"),
    (["--samples", "8"], "other calibration statistics"),
])
def test_bad_report_input_exits_2(extra, message, searches, tiny_workspace, tmp_path, capsys, monkeypatch):
    extra = [a.replace("{missing}", str(tmp_path / "missing.json")) for a in extra]
    code, _, err = run_cli(capsys, monkeypatch, *report_args(tiny_workspace, searches, tmp_path / "bad"), *extra)
    assert code == 2 and message in err.replace("\n", " ") and "Traceback" not in err, err[-2000:]


PROTOCOL = {"model": "m", "model_fingerprint": "f" * 12, "data": "d", "data_fingerprint": "e" * 16, "split": "test",
            "seqlen": 64, "windows": 4, "calibration": "d, 4 x 64 tokens", "device": "cpu", "dtype": "float32", "seed": None,
            "selfprune_version": "1", "torch_version": "2", "transformers_version": "3", "lm_eval_version": "4",
            "zero_shot": "lm-eval 4, tasks none"}
META = ReportMeta(model="m", model_fingerprint="f" * 12, data="d", method="wanda-sp", seqlen=64, test_windows=4,
                  test_tokens=252, tasks=[], limit=None, max_length=256, lm_eval_version="4", convention="c",
                  include_path=None, samples=4, calib_seqlen=64, stats_key="s" * 12, ratios=[0.5], allocations=["uniform"],
                  searches=[], computed=1, cached=0, wall_s=1.5)
# build_rows' keys, in report.json's order (a merged search row adds ppl_spread, mean_acc_spread, seeds)
ROW_KEYS = ["label", "method", "ratio", "rates", "structure", "oracle", "seed", "candidates", "realized_ratio",
            "kept_params", "ppl", "tokens", "seqlen", "windows", "acc", "mean_acc", "zero_shot", "protocol", "llamacpp"]


def _row(**values) -> Row:
    """A measured row: uniform at 0.5 unless ``values`` say otherwise."""
    return Row(**dict(label="uniform", method="uniform", ratio=0.5, rates=[0.5, 0.5], structure=None, oracle=None,
                      seed=None, candidates=None, realized_ratio=0.5, kept_params=10, ppl=12.0, tokens=252, seqlen=64,
                      windows=4, acc={}, mean_acc=None, zero_shot=None, protocol=PROTOCOL, llamacpp=None) | values)


def test_report_json_keeps_the_dict_form_and_reads_back():
    """A row's JSON has the keys report.json always had, in its order (a merged search row's
    three after them), and a report read back writes the same text."""
    zs = {"tasks": {"t": {"score": 0.5}}, "mean_acc": 0.5, "lm_eval_version": "4", "convention": "c"}
    seed0 = _row(label="search (ga)", method="search", seed=0, candidates=8, acc={"t": 0.5}, mean_acc=0.5, zero_shot=zs,
                 oracle={"calls": 1}, structure=[[1, 2]], llamacpp={"dtype": "f16", "prefill_tokens_per_s": 1.0,
                                                                  "decode_tokens_per_s": 2.0})
    seed1 = replace(seed0, seed=1, ppl=14.0, rates=[0.4, 0.6], candidates=9, protocol=PROTOCOL | {"seed": 1})
    merged, dense = merge_seeds([seed0, seed1, _row(label="dense", method="dense", ratio=None, rates=None)])
    assert list(dense.to_json()) == ROW_KEYS and list(seed0.to_json()) == ROW_KEYS
    assert list(merged.to_json()) == [*ROW_KEYS, "ppl_spread", "mean_acc_spread", "seeds"]
    assert merged.to_json()["seeds"][1] == {"seed": 1, "ppl": 14.0, "mean_acc": 0.5, "rates": [0.4, 0.6],
                                            "candidates": 9, "oracle": {"calls": 1}}
    assert (merged.ppl, merged.candidates, merged.rates, merged.protocol["seed"]) == (13.0, 8.5, None, [0, 1])
    report = Report(META, [dense, merged], {"report.md": "r/report.md"})
    assert list(report.to_json()) == ["meta", "rows", "files"] and list(Report(META, []).to_json()) == ["meta", "rows"]
    text = json.dumps(report.to_json(), indent=2)
    again = Report.from_json(json.loads(text))
    assert again == report and json.dumps(again.to_json(), indent=2) == text


def test_report_shows_each_llm_search_oracle_accounting():
    from selfprune.artifacts.comparison import html_report, markdown

    oracle = {"calls": 12, "replies": {"valid": 2, "repaired": 8, "invalid": 1, "cut": 1, "late": 0}, "reasks": 3,
              "fallbacks": 4, "prompt_tokens": 5000, "completion_tokens": 900, "cost_usd": 0.0215}
    row = _row(label="search", method="search", oracle=oracle)
    ga_row = replace(row, label="search (ga)", oracle=None)
    meta = META
    md = markdown([row, ga_row], [], meta)
    line = ("- search @ 0.5: 12 requests (2 valid, 8 repaired, 1 invalid, 1 cut, 0 late), 3 re-asks, 4 GA fallbacks, "
            "5,000 prompt + 900 completion tokens, $0.0215")
    assert "## LLM oracle replies" in md and line in md and "search (ga) @" not in md.split("## LLM oracle replies")[1]
    assert "LLM oracle replies" in html_report([row], [], meta, {})
    assert "LLM oracle replies" not in markdown([ga_row], [], meta)


@pytest.mark.slow
def test_report_rows_for_metric_pattern_and_allocation(prefect_api, tiny_workspace, tmp_path):
    """Rows of single-weight pruning: each metric x pattern x allocation (N:M: uniform at its own
    sparsity), their perplexity the library's, and a rerun that computes nothing."""
    import selfprune
    from selfprune.config import ReportConfig
    from selfprune.flows.report import report

    config = ReportConfig(model=str(tiny_workspace / "model"), data=str(tiny_workspace / "corpus.txt"), ratios=[0.6],
                          metrics=["wanda", "abs(W)"], patterns=["unstructured", "2:4"],
                          metric_allocations=["uniform", "sdsa"], tasks=["selfprune_cloze"], limit=3, cloze_items=8,
                          seqlen=64, test_windows=4, max_length=256, samples=4, calib_seqlen=64, device="cpu",
                          out=str(tmp_path / "metrics"))
    summary = report(config)
    metric_rows = [(r["label"], r["ratio"]) for r in summary["rows"] if r["method"] == "metric"]
    assert sorted(metric_rows) == sorted([("wanda uniform 2:4", 0.5), ("abs(W) uniform 2:4", 0.5),
                                          ("wanda uniform", 0.6), ("wanda sdsa", 0.6),
                                          ("abs(W) uniform", 0.6), ("abs(W) sdsa", 0.6)])
    by_label = {r["label"]: r for r in summary["rows"]}
    assert by_label["wanda uniform 2:4"]["realized_ratio"] == 0.5
    assert abs(by_label["wanda sdsa"]["realized_ratio"] - 0.6) < 0.01
    assert by_label["wanda sdsa"]["rates"] != by_label["wanda uniform"]["rates"]
    assert "| wanda sdsa |" in (tmp_path / "metrics" / "report.md").read_text()

    pruned = selfprune.prune(str(tiny_workspace / "model"), 0.6, "sdsa", str(tiny_workspace / "corpus.txt"), samples=4,
                             calib_seqlen=64, device="cpu", metric="wanda")
    library = selfprune.perplexity(pruned, str(tiny_workspace / "corpus.txt"), "test", 64, 4)
    assert library["ppl"] == by_label["wanda sdsa"]["ppl"]

    again = report(config.model_copy(update={"out": str(tmp_path / "again")}))
    assert again["meta"]["computed"] == 0


@pytest.mark.parametrize("field, value", [("seqlen", 128), ("split", "validation"), ("torch_version", "2.1"),
                                          ("calibration", "d, 8 x 64 tokens")])
def test_a_table_refuses_rows_of_two_protocols(field, value):
    """Two rows measured differently (here, one field apart) never share a table: the report says
    which field differs, and both values; rows that differ only in their seed do share one."""
    from selfprune.artifacts.comparison import html_report, markdown
    from selfprune.core.errors import UserError

    row = _row()
    other = replace(row, label="owl", method="owl", protocol=PROTOCOL | {field: value})
    for render in (lambda rows: markdown(rows, [], META), lambda rows: html_report(rows, [], META, {})):
        with pytest.raises(UserError, match=f"'uniform' and 'owl' .*different protocols: {field} is "
                                            f"{PROTOCOL[field]!r} and {value!r}"):
            render([row, other])
    seeded = replace(other, protocol=PROTOCOL | {"seed": 3})
    assert "| 0.5 | owl |" in markdown([row, seeded], [], META)


@pytest.mark.slow
def test_seeds_search_and_its_report_row(prefect_api, tiny_workspace, tmp_path, capsys, monkeypatch):
    """--seeds runs one search per seed (seed-N) and writes their spread; the library's seeds give
    the same figures; the report shows the seeds as one row (mean, std and each seed's value, each
    measured again under the report's protocol) beside the ATP and DLP allocations."""
    import statistics

    import selfprune

    ws, out = tiny_workspace, tmp_path / "seeds"
    args = ["search", "--model", str(ws / "model"), "--data", str(ws / "corpus.txt"), "--ratio", "0.5",
            "--seeds", "0,1", "--out", str(out), *(f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items())]
    code, _, err = run_cli(capsys, monkeypatch, *args)
    assert code == 0, err[-3000:]
    assert "mean ± std" in err and "seeds.json" in err
    summary = json.loads((out / "seeds.json").read_text())
    bests = {s: json.loads((out / f"seed-{s}" / "best.json").read_text()) for s in (0, 1)}
    assert [b["config"]["seed"] for b in bests.values()] == [0, 1] and summary["runs"]["1"] == "seed-1/best.json"
    test = summary["spread"]["test_ppl"]
    assert test["values"] == {str(s): b["test_ppl"] for s, b in bests.items()}
    assert test["mean"] == statistics.fmean(b["test_ppl"] for b in bests.values())
    assert test["std"] == statistics.stdev(b["test_ppl"] for b in bests.values())
    assert bests[0]["rates"] != bests[1]["rates"]  # the seeds searched differently
    assert bests[1]["protocol"]["seed"] == 1 and bests[1]["protocol"]["windows"] == 4
    assert summary["candidates"] == {str(s): b["evaluations"] + b["cache_hits"] for s, b in bests.items()}
    assert bests[1]["fitness_protocol"]["split"] == "fitness" and bests[1]["fitness_protocol"]["windows"] == 4

    library = selfprune.search(model=str(ws / "model"), data=str(ws / "corpus.txt"), ratio=0.5, seeds=[0, 1],
                               out=str(tmp_path / "library"), **SMALL)
    assert library.spread == summary["spread"]

    code, _, err = run_cli(capsys, monkeypatch, "report", "--model", str(ws / "model"), "--data", str(ws / "corpus.txt"),
                           "--allocation", "uniform,atp,dlp", "--search", str(out / "seeds.json"),
                           "--search", str(out / "seed-0" / "best.json"), "--tasks",  # seed 0 named twice counts once
                           "selfprune_cloze", "--limit", "3", "--cloze-items", "8", "--seqlen", "64", "--test-windows",
                           "4", "--max-length", "256", "--device", "cpu", "--out", str(tmp_path / "report"))
    assert code == 0, err[-3000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [r["label"] for r in report["rows"]] == ["dense", "uniform", "atp", "dlp", "search (ga)"]
    row = report["rows"][-1]
    assert row["ppl_spread"]["values"] == {"0": bests[0]["test_ppl"], "1": bests[1]["test_ppl"]}  # same protocol here
    assert row["ppl"] == test["mean"] and row["protocol"]["seed"] == [0, 1]
    assert row["candidates"] == statistics.fmean(summary["candidates"].values())
    assert [s["rates"] for s in row["seeds"]] == [bests[0]["rates"], bests[1]["rates"]]
    md = (tmp_path / "report" / "report.md").read_text()
    each = ", ".join(f"{b['test_ppl']:.3f}" for b in bests.values())
    assert f"| {test['mean']:.3f} ± {test['std']:.3f} (seeds 0, 1: {each}) |" in md
    assert "- search (ga) @ 0.5, seed 1: `[" in md
    import csv

    lines = list(csv.reader((tmp_path / "report" / "rates.csv").open()))
    assert lines[0] == ["model", *(f"layer_{i}" for i in range(len(bests[1]["rates"])))] and len(lines) == 1 + 3 + 2
    seed1 = next(line for line in lines if line[0] == "search (ga) @ 0.5, seed 1")
    assert [float(x) for x in seed1[1:]] == pytest.approx(bests[1]["rates"], abs=1e-6)
