"""The LLM oracle against a real OpenAI-compatible server: llama-cpp-python serving the demo's own
GGUF (SmolLM2-135M), a short search on the tiny model. It must finish, account for every reply,
and never wait on a request longer than the oracle timeout. Needs ``.[llm-server]``."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfprune.config import SearchConfig

pytestmark = [pytest.mark.demo, pytest.mark.llm_server, pytest.mark.slow]
TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def llm_server(tmp_path_factory):
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed: pip install -e '.[llm-server]'")
    from helpers import REAL_HOME, environ, free_port, wait_until_up

    from selfprune.data.demo import demo_gguf_path

    with environ(SELFPRUNE_HOME=str(REAL_HOME)):
        gguf = demo_gguf_path()
    port = free_port()
    log = open(tmp_path_factory.mktemp("llm") / "server.log", "w")
    # llama_cpp.server, run without llama.cpp's extra CPU buffer types: they crash quantized models on
    # some virtual machines with AMX-capable CPUs (selfprune/export/llamacpp.py)
    serve = ("import runpy, sys; from selfprune.export.llamacpp import without_extra_buffer_types; "
             "sys.argv = ['llama_cpp.server', *sys.argv[1:]]\n"
             "with without_extra_buffer_types(): runpy.run_module('llama_cpp.server', run_name='__main__')")
    server = subprocess.Popen([sys.executable, "-c", serve, "--model", str(gguf), "--host", "127.0.0.1",
                               "--port", str(port), "--n_ctx", "8192", "--model_alias", "smollm2"],
                              stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until_up(f"{url}/models", server, Path(log.name), timeout=120)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_a_search_with_a_real_llm_oracle_finishes_and_accounts_for_every_reply(prefect_api, llm_server, tiny_workspace,
                                                                                tmp_path, monkeypatch):
    from selfprune.flows.search import search

    monkeypatch.setenv("OPENAI_API_KEY", "sk-local")
    config = SearchConfig(model=str(tiny_workspace / "model"), data=str(tiny_workspace / "corpus.txt"), ratio=0.3,
                          oracle="openai:smollm2", base_url=llm_server, population=4, mutations=2, crossovers=2,
                          generations=2, samples=4, calib_seqlen=64, seqlen=64, fitness_windows=4, test_windows=4,
                          oracle_timeout=TIMEOUT_S, device="cpu", baselines=[], out=str(tmp_path / "run"))
    start = time.monotonic()
    summary = search(config)
    wall = time.monotonic() - start
    oracle = summary["oracle"]
    assert summary["evaluations"] + summary["cache_hits"] == 4 + 2 * (2 + 2)
    assert sum(oracle["replies"].values()) == oracle["calls"] == summary["oracle_calls"] >= 3
    assert oracle["completion_tokens"] > 0 and oracle["prompt_tokens"] > oracle["completion_tokens"]
    # bounded: no request can have waited past the timeout, and none was re-sent after one
    assert wall < oracle["calls"] * TIMEOUT_S + 120
    assert json.loads((tmp_path / "run" / "best.json").read_text())["oracle"] == oracle
    assert oracle["seconds"] <= oracle["calls"] * TIMEOUT_S
