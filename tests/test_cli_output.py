"""What the command line shows a person: help that reads at 80 columns, JSON output that is JSON
only, no third-party progress bars, tables that keep their cells, and plots titled by what they show."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from helpers import run_cli

if TYPE_CHECKING:
    from selfprune.evaluate.report import ReportMeta, Row

WIDTH = 80
MIN_DESCRIPTION = 40  # characters of an option's description per line: about six words
MAX_ENTRY_LINES = 3  # lines an option (description and default) takes at 80 columns


@pytest.fixture
def narrow(monkeypatch):
    """A plain 80-column terminal, so that rich renders the help the same on every machine."""
    for key, value in {"COLUMNS": str(WIDTH), "LINES": "50", "TERM": "dumb", "NO_COLOR": "1"}.items():
        monkeypatch.setenv(key, value)


def help_text(capsys, monkeypatch, *command: str) -> str:
    code, out, err = run_cli(capsys, monkeypatch, *command, "--help")
    assert code == 0, err
    return out


def panel_entries(text: str) -> list[list[str]]:
    """The entries of the help's panels (an option, an argument or a command with its lines),
    each line without its panel border."""
    entries: list[list[str]] = []
    for line in text.splitlines():
        if not line.startswith("│ "):
            continue
        body = line[2:].rstrip().removesuffix("│").rstrip()
        if len(body) - len(body.lstrip()) < 4:  # a name (after a required option's "*" column, if any)
            entries.append([body.lstrip()])
        elif entries:
            entries[-1].append(body)
    return entries


def description_width(entries: list[list[str]]) -> int:
    """Characters per line of the description column: a continuation line starts at that column."""
    starts = [len(line) - len(line.lstrip()) for entry in entries for line in entry[1:]]
    return WIDTH - 4 - min(starts) if starts else WIDTH


def commands() -> list[str]:
    from selfprune.app.cli import app

    return [c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands]


def test_the_app_help_is_for_users(narrow, capsys, monkeypatch):
    from selfprune.app import cli

    text = help_text(capsys, monkeypatch)
    first = " ".join(text.split("╭")[0].split())
    assert cli.__doc__.split(":")[0] not in first  # not the module's developer docstring
    assert all(f"selfprune {c}" in first for c in ("prune", "search", "report"))
    assert all(len(entry) <= 2 for entry in panel_entries(text)), text  # a command's summary: a line or two


@pytest.mark.parametrize("command", commands())
def test_a_command_help_reads_at_80_columns(command, narrow, capsys, monkeypatch):
    text = help_text(capsys, monkeypatch, command)
    entries = panel_entries(text)
    assert description_width(entries) >= MIN_DESCRIPTION, text
    long = [entry for entry in entries if len(entry) > MAX_ENTRY_LINES]
    assert not long, "\n".join("\n".join(e) for e in long)


def test_the_search_help_starts_with_the_essential_options(narrow, capsys, monkeypatch):
    names = [entry[0].split()[0] for entry in panel_entries(help_text(capsys, monkeypatch, "search"))]
    assert names[:6] == ["--model", "--data", "--ratio", "--oracle", "--out", "--base-url"], names


PROTOCOL = {"model": "m", "model_fingerprint": "f" * 12, "data": "d", "data_fingerprint": "e" * 16, "split": "test",
            "seqlen": 64, "windows": 4, "calibration": "d, 4 x 64 tokens", "device": "cpu", "dtype": "float32",
            "seed": None, "selfprune_version": "1", "torch_version": "2", "transformers_version": "3",
            "lm_eval_version": "4", "zero_shot": "lm-eval 4, tasks boolq, piqa, selfprune_cloze"}


def _row(**values) -> Row:
    """A measured report row: uniform at 0.5 unless ``values`` say otherwise."""
    from selfprune.evaluate.report import Row

    return Row(**dict(label="uniform", method="uniform", ratio=0.5, rates=[0.5, 0.5], structure=None, oracle=None,
                      seed=None, candidates=None, realized_ratio=0.5, kept_params=10, ppl=12.5, tokens=252, seqlen=64,
                      windows=4, acc={}, mean_acc=None, zero_shot=None, protocol=PROTOCOL, llamacpp=None) | values)


def _meta(**values) -> ReportMeta:
    from selfprune.evaluate.report import ReportMeta

    return ReportMeta(**dict(model="m", model_fingerprint="f" * 12, data="d", method="wanda-sp", seqlen=64,
                             test_windows=4, test_tokens=252, tasks=[], limit=None, max_length=2048,
                             lm_eval_version="4", convention="c", include_path=None, samples=128, calib_seqlen=512,
                             stats_key="s" * 12, ratios=[0.5], allocations=["uniform"], searches=[], computed=1,
                             cached=0, wall_s=1.0) | values)


def test_the_report_tables_keep_every_cell_at_80_columns():
    from rich.console import Console

    from selfprune.app.cli import report_tables
    from selfprune.evaluate.report import Report, SeedRow

    tasks = ["boolq", "piqa", "selfprune_cloze"]
    base = dict(kept_params=123_456_789, acc={t: 0.61234 for t in tasks}, mean_acc=0.6123)
    seeds = dict(ppl_spread={"mean": 12.5, "std": 0.25, "values": {"0": 12.25, "1": 12.75}},
                 mean_acc_spread={"mean": 0.6, "std": 0.01, "values": {"0": 0.59, "1": 0.61}}, candidates=50,
                 seeds=[SeedRow(s, 12.5, 0.6, [0.5, 0.5], 50, None) for s in (0, 1)])
    rows = [_row(label="dense", method="dense", ratio=None, realized_ratio=0.0, **base), _row(**base),
            _row(label="search (openai:gpt-4o)", method="search", **base | seeds)]
    console = Console(width=WIDTH, record=True, file=open(os.devnull, "w"))
    tables = report_tables(Report(_meta(tasks=tasks), rows))
    for table in tables:
        console.print(table)
    text = console.export_text()
    assert "…" not in text, text

    def squeeze(s: str) -> str:  # what a cell's characters are, wherever its lines fold
        return re.sub(r"[\s\u2500-\u257f]", "", s)

    shown = [str(t) for table in tables for column in table.columns for t in (column.header, *column.cells)]
    shown += [str(t) for table in tables for t in (table.title, table.caption)]
    assert len(squeeze(text)) == sum(len(squeeze(s)) for s in shown), text  # every character of every cell


# ---------------------------------------------------------------------------------------------
# the real command in a fresh process: what it writes to stdout and stderr

BARS = re.compile(r"\d+%\||it/s|s/it")


def selfprune(*args: str, home: Path) -> subprocess.CompletedProcess:
    """``selfprune ARGS`` as a user runs it, output captured (not a terminal), with no setting that
    would hide a progress bar for us."""
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")}
    env |= {"SELFPRUNE_HOME": str(home), "COLUMNS": str(WIDTH)}
    return subprocess.run([sys.executable, "-c", "from selfprune.app.cli import main; main()", *args],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def gguf_export(tiny_workspace, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The tiny Llama as a GGUF, pruned and exported by the real CLI: GGUF conversion, weight
    loading and shard writing in one run."""
    from test_trust_files import write_gguf

    root = tmp_path_factory.mktemp("gguf")
    run = selfprune("prune", "--model", str(write_gguf(root / "tiny.gguf")), "--data", str(tiny_workspace / "corpus.txt"),
                    "--samples", "4", "--calib-seqlen", "64", "--device", "cpu", "--out", str(root / "export"),
                    home=root / "home")
    assert run.returncode == 0, run.stderr[-3000:]
    return root, run


@pytest.mark.slow
def test_loading_converting_and_exporting_show_no_third_party_bars(gguf_export):
    _, run = gguf_export
    assert not BARS.search(run.stderr), run.stderr[:2000]


@pytest.mark.slow
def test_ppl_json_is_one_json_document_and_nothing_else(gguf_export, tiny_workspace):
    root, _ = gguf_export
    run = selfprune("ppl", "--model", str(root / "tiny.gguf"), "--data", str(tiny_workspace / "corpus.txt"),
                    "--seqlen", "64", "--windows", "2", "--device", "cpu", "--json", home=root / "home")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout == json.dumps(json.loads(run.stdout)) + "\n"
    assert not BARS.search(run.stderr) and "\n\n" not in "\n" + run.stderr, repr(run.stderr[:2000])


@pytest.mark.slow
def test_bench_model_json_is_one_json_document_and_nothing_else(gguf_export):
    root, _ = gguf_export
    run = selfprune("bench-model", "--model", str(root / "export"), "--prompt-tokens", "4", "--new-tokens", "2",
                    "--repeats", "1", "--device", "cpu", "--json", home=root / "home")
    assert run.returncode == 0, run.stderr[-3000:]
    [record] = json.loads(run.stdout)
    assert run.stdout == json.dumps([record]) + "\n" and record["model"] == str(root / "export")
    assert "\n\n" not in "\n" + run.stderr, repr(run.stderr[:2000])


# ---------------------------------------------------------------------------------------------
# plots: each PNG says which model, target, data and split it shows, and what figure it is

def png_title(path: Path) -> str:
    """The title a PNG carries (its Title text field, the figure's heading)."""
    from PIL import Image

    with Image.open(path) as image:
        return image.text.get("Title", "")


def test_every_search_plot_names_its_run(tmp_path, tiny_workspace):
    from types import SimpleNamespace

    from selfprune.artifacts.report import plot_history, plot_metric_graph, plot_rates
    from selfprune.config import AutopruneConfig, SearchConfig
    from selfprune.evolve.pipeline import GenerationFitness

    record = SimpleNamespace(history=[GenerationFitness(0, 250.0, 300.0), GenerationFitness(1, 204.0, 260.0)])
    graph = [{"text": "W", "generation": 0, "fitness": 20.0, "source": "built-in", "parents": []}]
    summary = SimpleNamespace(record=record, rates=[0.4, 0.6], test_ppl=204.04)  # what the plots read of a summary
    search = SearchConfig(model=str(tiny_workspace / "model"), ratio=0.5, fitness_windows=4)
    plot_history(summary, search, tmp_path / "fitness.png")
    plot_rates(summary, search, tmp_path / "rates.png")
    assert png_title(tmp_path / "fitness.png") == ("model at ratio 0.5: best and mean fitness per generation\n"
                                                   "demo, fitness split (4 x 512 tokens); best's test ppl 204.0")
    assert png_title(tmp_path / "rates.png").startswith("model at ratio 0.5: the best's rate per layer\ndemo, fitness split")
    autoprune = AutopruneConfig(sparsities=[0.5, 0.6])
    metrics = SimpleNamespace(record=record, graph=graph, metric="W", test_ppl={"found": {0.5: 30.0, 0.6: 41.26}})
    plot_metric_graph(metrics, autoprune, tmp_path / "metrics.png")
    assert png_title(tmp_path / "metrics.png") == ("demo at sparsity 0.5, 0.6: each metric's fitness and parents\n"
                                                   "demo, fitness split (8 x 512 tokens); best's test ppl 30.0, 41.3")


def test_every_report_plot_names_its_run(tmp_path):
    from selfprune.artifacts.comparison import render
    from selfprune.evaluate.report import Report

    base = dict(acc={"piqa": 0.6}, mean_acc=0.6, protocol=PROTOCOL | {"zero_shot": "lm-eval 4, tasks piqa"})
    rows = [_row(label="dense", method="dense", ratio=None, realized_ratio=0.0, **base), _row(**base),
            _row(label="wanda", method="metric", **base)]
    files = render(Report(_meta(model="demo", data="wikitext2", computed=3, tasks=["piqa"]), rows), tmp_path)
    titles = {Path(f).name: png_title(Path(f)) for f in files.values() if f.endswith(".png")}
    data = "\nwikitext2, test split (252 predicted tokens in 64-token windows)"
    assert titles == {"ppl.png": "demo: test perplexity by method and ratio" + data,
                      "accuracy.png": "demo: mean zero-shot accuracy by method and ratio" + data + "; tasks piqa",
                      "ppl-metrics.png": "demo: test perplexity by metric, allocation and sparsity" + data}
