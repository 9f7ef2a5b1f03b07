"""Progress of the long steps (issue 26, item 2): a notebook's ``selfprune.search`` shows calibration,
each generation's candidates and the final test scoring without configuring logging; the CLI shows
them too, and its closing line's wall time is the whole run's; the logged progress is rate-limited."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time

import pytest
from helpers import run_cli

SMALL = dict(population=4, mutations=2, crossovers=2, generations=1, samples=4, calib_seqlen=64, seqlen=64,
             fitness_windows=2, test_windows=2, device="cpu", baselines="none", oracle="ga")


@pytest.mark.slow
def test_a_notebook_search_shows_its_long_steps_without_any_logging_setup(tiny_workspace, tmp_path):
    """What a notebook user runs, in a fresh interpreter that configured no logging: the progress
    lines reach stderr (Python's last-resort handler alone would show warnings only)."""
    code = ("import json, sys, selfprune\n"
            "selfprune.search(model=sys.argv[1], data=sys.argv[2], out=sys.argv[3], ratio=0.5, **json.loads(sys.argv[4]))\n")
    env = os.environ | {"SELFPRUNE_HOME": str(tmp_path / "home")}  # nothing cached: the calibration pass runs
    done = subprocess.run([sys.executable, "-c", code, str(tiny_workspace / "model"), str(tiny_workspace / "corpus.txt"),
                           str(tmp_path / "nb"), json.dumps(SMALL)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    for step in ("calibration", "generation 0/1", "generation 1/1", "final test scoring"):
        shown = [line for line in lines if line.startswith(step)]
        assert shown and re.search(r": 0/\d+$", shown[0]) and re.search(r": (\d+)/\1 done in ", shown[-1]), (step, lines)


def test_the_cli_shows_the_steps_and_its_closing_wall_time_is_the_whole_run(prefect_api, tiny_workspace, tmp_path,
                                                                            capsys, monkeypatch):
    monkeypatch.setenv("SELFPRUNE_HOME", str(tmp_path / "home"))
    # calibration windows no other test uses: this process may hold another test's statistics in memory
    args = [f"--{k.replace('_', '-')}={v}" for k, v in (SMALL | {"calib_seqlen": 60}).items()]
    begun = time.perf_counter()
    code, _, err = run_cli(capsys, monkeypatch, "search", "--model", str(tiny_workspace / "model"), "--data",
                           str(tiny_workspace / "corpus.txt"), "--ratio", "0.5", "--out", str(tmp_path / "run"), *args)
    elapsed = time.perf_counter() - begun
    assert code == 0, err
    closing = re.search(r"(\d+) s (?:in all )?-> ", err)
    assert closing, err[-2000:]
    inside = json.loads((tmp_path / "run" / "best.json").read_text())["wall_s"]  # the loop and final scores only
    shown_s = int(closing.group(1))
    assert elapsed - 1 <= shown_s <= elapsed + 1 and shown_s >= round(inside), (shown_s, elapsed, inside)
    # not a terminal here, so no bars: each step's log lines on stderr, its start and its end
    for step in ("calibration", "generation 0/1", "generation 1/1", "final test scoring"):
        shown = [line for line in err.splitlines() if f"selfprune.core.progress - {step}" in line]
        assert len(shown) == 2 and re.search(r": (\d+)/\1 done in ", shown[-1]), (step, err)


def test_logged_progress_is_rate_limited(caplog):
    from selfprune.core.progress import step

    with caplog.at_level(logging.INFO, logger="selfprune.core.progress"):
        advance = step("a quick loop", 10_000)
        for _ in range(10_000):
            advance(1)
    lines = [r.getMessage() for r in caplog.records if r.name == "selfprune.core.progress"]
    assert 2 <= len(lines) <= 3, lines
    assert lines[0] == "a quick loop: 0/10000" and lines[-1].startswith("a quick loop: 10000/10000 done in ")


def test_a_library_export_shows_progress(tiny_workspace, tmp_path, caplog):
    import selfprune

    ws = tiny_workspace
    with caplog.at_level(logging.INFO, logger="selfprune.core.progress"):
        selfprune.prune(str(ws / "model"), 0.5, data=str(ws / "corpus.txt"), samples=4, calib_seqlen=64, device="cpu",
                        out=tmp_path / "pruned")
    shown = [r.getMessage() for r in caplog.records if r.name == "selfprune.core.progress"]
    assert any(m.startswith(f"export -> {tmp_path / 'pruned'}: 1/1 done in ") for m in shown), shown
