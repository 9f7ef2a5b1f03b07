"""``oracle_timeout`` reaches the oracle's transport the same way from every entry point: the
library, the flow and the CLI for the rate search, the library and the flow for the metric search.
A real server sends its reply a byte at a time (about 10 s); under a 1 s bound the reply is late
and the GA/GP fallback fills in, where the transport's default (120 s) would have waited for it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
from fake_openai_server import FakeOpenAI, trickle
from helpers import run_cli

import selfprune
from selfprune.config import AutopruneConfig, SearchConfig

RATES = json.dumps({"rates": [[0.5, 0.5, 0.5, 0.5], [0.4, 0.6, 0.5, 0.5], [0.6, 0.4, 0.5, 0.5]]})
METRICS = json.dumps({"reasoning": "r", "metrics": [{"parent": "m1", "other_parent": None, "edit": "e",
                                                     "metric": "abs(W) * X_mean"}]})
TINY = dict(samples=4, calib_seqlen=64, seqlen=64, fitness_windows=2, test_windows=2, device="cpu")


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy", "OPENAI_BASE_URL"):
        monkeypatch.delenv(var, raising=False)


def search_config(ws, out, base_url: str, seed: int) -> SearchConfig:
    return SearchConfig(model=str(ws / "model"), data=str(ws / "corpus.txt"), ratio=0.5, oracle="openai:slow",
                        base_url=base_url, oracle_timeout=1.0, population=4, generations=0, baselines="none",
                        seed=seed, out=str(out), **TINY)


def bounded(content: str, run: Callable[[str], dict]) -> None:
    """``run(base_url)`` against a server that trickles ``content`` (about 10 s): its summary counts
    one late reply, the request is not sent again, and the run does not wait the reply out."""
    with FakeOpenAI([trickle(0.1, content)]) as server:
        began = time.monotonic()
        summary = run(server.base_url)
    assert summary["oracle"]["replies"]["late"] == 1 and summary["oracle_fallbacks"] >= 1, summary["oracle"]
    assert len(server.requests) == 1
    assert time.monotonic() - began < 60


def test_the_library_search_bounds_each_request(tiny_workspace, tmp_path):
    bounded(RATES, lambda url: selfprune.search(search_config(tiny_workspace, tmp_path / "run", url, seed=41)).to_json())


def test_the_flow_search_bounds_each_request(prefect_api, tiny_workspace, tmp_path):
    from selfprune.flows.search import search

    bounded(RATES, lambda url: search(search_config(tiny_workspace, tmp_path / "run", url, seed=42)))


def test_the_cli_search_bounds_each_request(prefect_api, tiny_workspace, tmp_path, capsys, monkeypatch):
    def cli(url: str) -> dict:
        code, _, err = run_cli(capsys, monkeypatch, "search", "--model", str(tiny_workspace / "model"),
                               "--data", str(tiny_workspace / "corpus.txt"),
                               "--ratio", "0.5", "--oracle", "openai:slow", "--base-url", url,
                               "--oracle-timeout", "1", "--population", "4", "--generations", "0", "--baselines", "none",
                               "--seed", "43", "--samples", "4", "--calib-seqlen", "64", "--seqlen", "64",
                               "--fitness-windows", "2", "--test-windows", "2", "--device", "cpu", "--out", str(tmp_path / "run"))
        assert code == 0, err[-3000:]
        return json.loads((tmp_path / "run" / "best.json").read_text())

    bounded(RATES, cli)


def autoprune_config(ws, out, base_url: str, seed: int) -> AutopruneConfig:
    return AutopruneConfig(model=str(ws / "model"), data=str(ws / "corpus.txt"), sparsities=[0.5],
                           oracle="openai:slow", base_url=base_url, oracle_timeout=1.0, population=4, mutations=1,
                           crossovers=0, generations=1, seed=seed, out=str(out), **TINY)


def test_the_library_metric_search_bounds_each_request(tiny_workspace, tmp_path):
    bounded(METRICS, lambda url: selfprune.autoprune(autoprune_config(tiny_workspace, tmp_path / "run", url, seed=44)).to_json())


def test_the_flow_metric_search_bounds_each_request(prefect_api, tiny_workspace, tmp_path):
    from selfprune.flows.autoprune import autoprune

    bounded(METRICS, lambda url: autoprune(autoprune_config(tiny_workspace, tmp_path / "run", url, seed=45)))
