"""A typo fails in seconds, before Prefect starts, with one line and no retry advice.

Each test runs the real ``selfprune`` CLI as a subprocess with a fresh SELFPRUNE_HOME, no
PREFECT_API_URL and the hub offline (HF_HUB_OFFLINE=1: no test waits on the network): a run that
reached Prefect would start a temporary server first (tens of seconds) and end with
"retry it with: prefect flow-run retry ...", which would fail the same way.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

SECONDS = 10.0  # generous: a run that starts Prefect first takes 25 s and more on an idle machine


def run_selfprune(cwd: Path, home: Path, *args: str, **env: str | None) -> tuple[int, str, float, float]:
    """Exit code, stdout+stderr, wall time and CPU time (user+sys) of ``selfprune ARGS`` in a fresh
    environment."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "OPENAI_", "HF_HUB_OFFLINE"))}
    environ |= {"SELFPRUNE_HOME": str(home), "HF_HUB_OFFLINE": "1", "COLUMNS": "400"}
    for name, value in env.items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "selfprune.app.cli", *args], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=300)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return done.returncode, done.stdout + done.stderr, wall, cpu


@pytest.fixture(scope="module")
def limit_s() -> float:
    """The wall-time limit: :data:`SECONDS`, or three times what importing the CLI and its checks'
    modules (torch) takes now, if more. A loaded machine slows every start, a Prefect start (a
    server, a flow run) by far more; the CPU time is held to :data:`SECONDS` regardless."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import selfprune.app.cli, selfprune.app.inputs, selfprune.evolve.runner"], check=True)
    return max(SECONDS, 3 * (time.perf_counter() - start))


def assert_early_user_error(result: tuple[int, str, float, float], limit_s: float, *named: str) -> None:
    """Exit 2, a single line naming the problem, no retry advice, no Prefect server, in seconds."""
    code, output, wall, cpu = result
    lines = output.strip().splitlines()
    assert code == 2, output
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert all(word in lines[0] for word in named), output
    assert "flow-run retry" not in output and "retry it with" not in output
    assert "temporary server" not in output.lower() and "uvicorn" not in output.lower()
    assert cpu < SECONDS and wall < limit_s, f"took {wall:.1f} s ({cpu:.1f} s CPU; limit {limit_s:.1f} s): {output}"


@pytest.fixture
def ws(tiny_workspace, tmp_path) -> dict:
    """The tiny model and corpus, and a search's usual small sizes, run from ``tmp_path``."""
    model, corpus = str(tiny_workspace / "model"), str(tiny_workspace / "corpus.txt")
    return {"cwd": tmp_path, "home": tmp_path / "home", "model": model, "corpus": corpus,
            "search": ["search", "--model", model, "--data", corpus, "--device", "cpu", "--generations", "1",
                       "--samples", "4", "--calib-seqlen", "64", "--seqlen", "64", "--fitness-windows", "2",
                       "--test-windows", "2", "--out", str(tmp_path / "run")]}


def search(ws: dict, *args: str, **env: str | None) -> tuple[int, str, float, float]:
    return run_selfprune(ws["cwd"], ws["home"], *ws["search"], *args, **env)


def test_a_wrong_model_path_fails_before_prefect(ws, limit_s):
    missing = str(ws["cwd"] / "models" / "nope")
    assert_early_user_error(search(ws, "--model", missing), limit_s, "model path", missing)


@pytest.mark.slow
def test_an_offline_hub_typo_fails_at_once_and_names_the_close_local_name(ws, limit_s):
    assert_early_user_error(search(ws, "--model", "demoo"), limit_s, "demoo", "offline", "did you mean demo?")


@pytest.mark.slow
def test_an_offline_hub_id_near_a_local_directory_suggests_it(ws, limit_s):
    (ws["cwd"] / "my-model").mkdir()
    assert_early_user_error(search(ws, "--model", "my-modle"), limit_s, "my-modle", "did you mean my-model?")


@pytest.mark.slow
def test_an_offline_hub_id_with_no_close_name_says_how_to_fix_it(ws, limit_s):
    assert_early_user_error(search(ws, "--model", "org/unheard-of"), limit_s, "org/unheard-of", "HF_HUB_OFFLINE")


@pytest.mark.slow
def test_an_unreachable_hub_fails_at_once(ws, limit_s):
    """Online mode, but nothing answers at the hub's address (a local port no one listens on)."""
    from helpers import free_port

    hub = f"http://127.0.0.1:{free_port()}"
    result = search(ws, "--model", "demoo", HF_HUB_OFFLINE=None, HF_ENDPOINT=hub)
    assert_early_user_error(result, limit_s, "demoo", f"{hub} did not answer", "did you mean demo?")


@pytest.mark.slow
def test_a_wrong_data_file_fails_before_prefect(ws, limit_s):
    typo = str(ws["cwd"] / "corpus.txtt")
    assert_early_user_error(search(ws, "--data", typo), limit_s, "data file not found", typo)


def test_an_unknown_oracle_fails_before_prefect(ws, limit_s):
    assert_early_user_error(search(ws, "--oracle", "gaa"), limit_s, "unknown oracle", "'gaa'")


@pytest.mark.slow
def test_an_unknown_metric_oracle_fails_before_prefect(ws, limit_s):
    args = ["autoprune", "--model", ws["model"], "--data", ws["corpus"], "--device", "cpu", "--oracle", "gpp",
            "--out", str(ws["cwd"] / "auto")]
    assert_early_user_error(run_selfprune(ws["cwd"], ws["home"], *args), limit_s, "unknown metric oracle", "'gpp'")


@pytest.mark.slow
def test_an_openai_oracle_without_its_key_fails_before_prefect(ws, limit_s):
    assert_early_user_error(search(ws, "--oracle", "openai:gpt-4o", OPENAI_API_KEY=None), limit_s, "OPENAI_API_KEY")


@pytest.mark.slow
def test_an_oracle_key_variable_that_is_unset_fails_before_prefect(ws, limit_s):
    args = ["--oracle", "openai:qwen", "--base-url", "http://127.0.0.1:9/v1", "--api-key-env", "VLLM_API_KEY"]
    assert_early_user_error(search(ws, *args, OPENAI_API_KEY="sk-unused", VLLM_API_KEY=None), limit_s, "VLLM_API_KEY")


def test_a_local_server_needs_no_key(tiny_workspace, monkeypatch):
    """A base URL that is not the OpenAI API gets the placeholder key: no variable is needed."""
    from selfprune.app.inputs import check_inputs
    from selfprune.config import SearchConfig
    from selfprune.core.errors import UserError

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    config = SearchConfig(model=str(tiny_workspace / "model"), data=str(tiny_workspace / "corpus.txt"),
                          oracle="openai:qwen", base_url="http://127.0.0.1:9/v1")
    check_inputs(config)  # no error
    with pytest.raises(UserError, match="OPENAI_API_KEY"):
        check_inputs(config.model_copy(update={"base_url": None}))


@pytest.mark.slow
def test_a_malformed_rate_file_fails_before_prefect(ws, limit_s):
    bad = ws["cwd"] / "best.json"
    bad.write_text('{"rates": [0.5, 0.5')
    args = ["report", "--model", ws["model"], "--data", ws["corpus"], "--device", "cpu", "--search", str(bad),
            "--out", str(ws["cwd"] / "report")]
    assert_early_user_error(run_selfprune(ws["cwd"], ws["home"], *args), limit_s, str(bad), "not valid JSON")


@pytest.mark.slow
def test_prune_with_an_offline_hub_typo_fails_at_once(ws, limit_s):
    args = ["prune", "--model", "demoo", "--data", ws["corpus"], "--device", "cpu", "--out", str(ws["cwd"] / "p")]
    assert_early_user_error(run_selfprune(ws["cwd"], ws["home"], *args), limit_s, "demoo", "did you mean demo?")
