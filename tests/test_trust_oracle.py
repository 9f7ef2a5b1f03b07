"""The oracle server is untrusted: what it is given (which key, which URL) and what it can do back.

A search runs for days and may talk to a server someone else runs. Through the real ``openai``
client against a real local HTTP server (``fake_openai_server``):

* the OpenAI key goes only to the OpenAI API; credentials written into ``--base-url`` reach the
  server but no file the run writes (best.json, cached results, the Prefect database, logs);
* no reply crashes a search: deeply nested JSON, an HTML body, invalid UTF-8, a null ``choices``,
  ``retry-after: nan``, a huge or a trickled reply each count as an invalid (or late) reply and the
  GA/GP fallback fills in, within the request's deadline and byte bound; a reply that could not be
  read is asked again on a rerun instead of being replayed from the cache;
* what goes back to the model in the metric oracle's conversation is bounded.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_openai_server import FakeOpenAI, raw, reply, status, trickle

from selfprune.config import AutopruneConfig, SearchConfig
from selfprune.evolve.gp import GPOracle
from selfprune.evolve.llm_oracle import LLMOracle
from selfprune.evolve.metric_oracle import make_metric_oracle
from selfprune.evolve.replies import parse_candidates
from selfprune.evolve.search_context import SearchContext
from selfprune.llm.chat import OracleUnavailable
from selfprune.llm.transport import openai_transport
from selfprune.metrics.search_space import Lineage, MetricContext

REAL_KEY = "sk-real-DO-NOT-SEND"
CTX = SearchContext(model_name="tiny-llama", n_layers=4, beta=0.3, p_max=0.9, seed=1)
K = 3
GOOD = json.dumps({"rates": [[0.1, 0.3, 0.4, 0.4], [0.2, 0.2, 0.4, 0.4], [0.3, 0.3, 0.3, 0.3]]})
METRIC_CTX = MetricContext(model_name="tiny-llama", sparsity=0.5, seed=1)
GOOD_METRIC = json.dumps({"reasoning": "r", "metrics": [{"parent": "m1", "other_parent": None, "edit": "e",
                                                         "metric": "abs(W) * X_mean"}]})
DEEP = "[" * 200_000 + "]" * 200_000


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", REAL_KEY)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy", "OPENAI_BASE_URL"):
        monkeypatch.delenv(var, raising=False)


def completion(content, **fields) -> bytes:
    """A chat-completion body holding ``content``, with ``fields`` replacing its top-level fields."""
    body = {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    return json.dumps(body | fields).encode()


# Each hostile reply, then a good one (which a re-ask may get). Whatever it is, the step ends in a
# valid population, and the hostile reply is counted as invalid.
HOSTILE = {
    "nested-content": reply(DEEP),
    "nested-body": raw(b'{"choices": ' + DEEP.encode() + b"}"),
    "html-200": raw(b"<!doctype html><html><body>502 Bad Gateway</body></html>", "text/html"),
    "invalid-utf8": raw(completion("\udcff").replace(b"\\udcff", b"\xff\xfe")),
    "choices-null": raw(completion(None, choices=None)),
    "choices-of-null": raw(completion(None, choices=[None])),
    "choices-a-string": raw(completion(None, choices="abc")),
    "huge-integer": reply(json.dumps({"rates": [[10**400, 0.3, 0.3, 0.3]]})),
    "huge-reply": reply(GOOD + " " * (5 << 20)),  # past the 4 MiB read per reply
}


def rate_oracle(server: FakeOpenAI, timeout: float = 2.0, max_reasks: int = 1, **options) -> LLMOracle:
    return LLMOracle("fake-model", openai_transport(server.base_url, timeout=timeout, max_retries=1, **options),
                     max_reasks=max_reasks)


def metric_oracle(server: FakeOpenAI, timeout: float = 2.0, max_reasks: int = 1):
    lineage = Lineage()
    GPOracle(lineage=lineage).initialize(METRIC_CTX, 3)
    transport = openai_transport(server.base_url, timeout=timeout, max_retries=1)
    oracle = make_metric_oracle("openai:fake-model", server.base_url, transport, lineage=lineage, max_reasks=max_reasks)
    return oracle, [(text, 10.0 + i) for i, text in enumerate(lineage.nodes)]


def assert_feasible(population: list[list[float]], n: int = K) -> None:
    assert len(population) == n and len({CTX.canonical(p) for p in population}) == n
    for p in population:
        assert len(p) == CTX.n_layers and all(0.0 <= r <= CTX.p_max for r in p)
        assert abs(sum(p) / CTX.n_layers - CTX.beta) < 1e-6


@pytest.mark.parametrize("behaviour", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_reply_is_an_invalid_one_in_the_rate_search(behaviour):
    with FakeOpenAI([behaviour, reply("no vectors here")]) as server:
        oracle = rate_oracle(server)
        population = oracle.initialize(CTX, K)
    assert_feasible(population)
    assert oracle.replies["invalid"] >= 1 and oracle.replies["valid"] == 0 and oracle.fallbacks == K


@pytest.mark.parametrize("behaviour", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_reply_is_an_invalid_one_in_the_metric_search(behaviour):
    with FakeOpenAI([behaviour, reply("no metrics here")]) as server:
        oracle, population = metric_oracle(server)
        out = oracle.evolve(METRIC_CTX, population, n_crossover=0, n_mutation=2, generation=1)
    assert len(out) == 2 and oracle.fallbacks == 2 and oracle.replies["invalid"] >= 1


def test_retry_after_nan_is_a_plain_backoff():
    with FakeOpenAI([status(429, retry_after="nan"), reply(GOOD)]) as server:
        oracle = rate_oracle(server)
        population = oracle.initialize(CTX, K)
    assert_feasible(population)
    assert len(server.requests) == 2 and oracle.replies["valid"] == 1 and oracle.fallbacks == 0


def test_a_usage_that_is_not_counts_is_zero_tokens():
    with FakeOpenAI([raw(completion(GOOD, usage={"prompt_tokens": "many", "completion_tokens": [1]}))]) as server:
        oracle = rate_oracle(server)
        assert_feasible(oracle.initialize(CTX, K))
    assert oracle.replies["valid"] == 1 and oracle.prompt_tokens == oracle.completion_tokens == 0


@pytest.mark.parametrize("search", ["rates", "metrics"])
def test_a_trickled_reply_is_cut_at_the_request_deadline(search):
    """--oracle-timeout bounds the whole request, not the time between two bytes."""
    content = GOOD if search == "rates" else GOOD_METRIC
    start = time.monotonic()
    with FakeOpenAI([trickle(0.02, content)]) as server:  # the response alone takes ~10 s
        if search == "rates":
            oracle = rate_oracle(server, timeout=0.5)
            assert_feasible(oracle.initialize(CTX, K))
        else:
            oracle, population = metric_oracle(server, timeout=0.5)
            assert len(oracle.evolve(METRIC_CTX, population, 0, 1, generation=1)) == 1
        assert len(server.requests) == 1  # a late request is never sent again
    assert time.monotonic() - start < 2.5
    assert oracle.replies["late"] == 1 and oracle.fallbacks >= 1


def test_parsing_stops_once_enough_vectors_are_found():
    many = json.dumps({"rates": [[0.3] * 4] * 100_000})
    start = time.monotonic()
    assert len(parse_candidates(many, 4, limit=6)) == 6
    assert len(parse_candidates(" ".join(["[0.3, 0.3, 0.3, 0.3]"] * 100_000), 4, limit=6)) == 6
    assert time.monotonic() - start < 5
    assert parse_candidates(DEEP, 4) == [] and parse_candidates("[" * 900 + "[0.3, 0.3, 0.3, 0.3]" + "]" * 900, 4) == [[0.3] * 4]


def test_what_goes_back_to_the_model_is_bounded():
    """A long reply without metrics, then one with many refused ones: each re-ask's conversation
    stays small, whatever the model wrote."""
    rambling = "Let me think. " * 50_000  # 700 kB of prose
    refused = json.dumps({"metrics": [{"metric": f"lambda: {i} " * 50, "parent": [[["m1"]]]} for i in range(5000)]
                                     + [{"metric": [[[[0]]]] * 1000}]})
    with FakeOpenAI([reply(rambling), reply(refused), reply(GOOD_METRIC)]) as server:
        oracle, population = metric_oracle(server, max_reasks=2)
        out = oracle.evolve(METRIC_CTX, population, 0, 1, generation=1)
    assert len(out) == 1
    sizes = [len(json.dumps(r.body["messages"])) for r in server.requests]
    assert len(sizes) == 3 and max(sizes) < sizes[0] + 40_000, sizes


# --- Item 3: the key and the URL's credentials -------------------------------------------------------


def test_the_openai_key_goes_only_to_the_openai_api(monkeypatch):
    from selfprune.llm.endpoint import api_key

    for url in (None, "https://api.openai.com/v1", "https://API.OpenAI.com:443/v1"):
        assert api_key(url, None) == REAL_KEY
    for url in ("http://127.0.0.1:8000/v1", "https://api.openai.com.evil.example/v1", "https://evil.example/api.openai.com"):
        assert api_key(url, None) == "EMPTY"
    monkeypatch.setenv("MY_KEY", "sk-mine")
    assert api_key("http://127.0.0.1:8000/v1", "MY_KEY") == api_key(None, "MY_KEY") == "sk-mine"


def test_another_server_never_gets_the_openai_key():
    with FakeOpenAI([reply(GOOD)]) as server:
        rate_oracle(server).initialize(CTX, K)
    assert server.requests[0].headers["authorization"] == "Bearer EMPTY"


def test_a_key_named_for_the_server_is_sent_to_it(monkeypatch):
    monkeypatch.setenv("MY_SERVER_KEY", "sk-for-that-server")
    with FakeOpenAI([reply(GOOD)]) as server:
        rate_oracle(server, api_key_env="MY_SERVER_KEY").initialize(CTX, K)
    assert server.requests[0].headers["authorization"] == "Bearer sk-for-that-server"


def test_a_named_key_that_is_not_set_fails_naming_the_variable(monkeypatch):
    monkeypatch.delenv("MY_SERVER_KEY", raising=False)
    with FakeOpenAI([reply(GOOD)]) as server:
        with pytest.raises(OracleUnavailable, match=r"\$MY_SERVER_KEY") as err:
            rate_oracle(server, api_key_env="MY_SERVER_KEY").initialize(CTX, K)
    assert not server.requests and REAL_KEY not in str(err.value)


@pytest.mark.parametrize("cls", [SearchConfig, AutopruneConfig])
def test_credentials_in_the_base_url_are_kept_out_of_the_config(cls):
    config = cls(base_url="http://u:secret@127.0.0.1:9/v1?api_key=secret2&key=secret3#secret4", api_key_env="MY_KEY")
    assert config.base_url == "http://127.0.0.1:9/v1" and config.api_key_env == "MY_KEY"
    assert "secret" not in json.dumps(config.model_dump()) and "secret" not in repr(config)
    assert cls(**config.model_dump()) == config  # a flow's parameter validates back to the same config


def test_a_base_url_that_is_not_http_is_refused():
    from selfprune.config import build_config
    from selfprune.core.errors import UserError

    with pytest.raises(UserError, match="--base-url"):
        build_config(SearchConfig, base_url="file:///etc/passwd")


def _tree_bytes(*roots: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for root in roots for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_a_search_with_credentials_in_the_base_url_records_none(tiny_workspace, tmp_path):
    """The real CLI, with its own temporary Prefect server and database in a fresh home: the server
    gets the URL's credentials (not $OPENAI_API_KEY), and no byte of any file the run wrote holds
    them: best.json, cached results, the store, the Prefect database, the CLI's output. (The secrets
    are distinctive strings: Prefect's database holds the word "secret" in its own block schemas.)"""
    password, token = "pw-7f3a9c0d", "tok-8b2e41f5"
    home, out = tmp_path / "home", tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and not k.lower().endswith("_proxy")}
    env |= {"SELFPRUNE_HOME": str(home), "OPENAI_API_KEY": REAL_KEY}
    vectors = [[0.5, 0.5, 0.5, 0.5], [0.4, 0.6, 0.5, 0.5], [0.6, 0.4, 0.5, 0.5], [0.5, 0.5, 0.4, 0.6]]
    with FakeOpenAI([reply(json.dumps({"rates": vectors}))]) as server:
        url = server.base_url.replace("http://", f"http://u:{password}@") + f"?api_key={token}"
        cmd = [sys.executable, "-m", "selfprune.app.cli", "search", "--model", str(tiny_workspace / "model"),
               "--data", str(tiny_workspace / "corpus.txt"), "--ratio", "0.5", "--out", str(out),
               "--oracle", "openai:fake-gpt", "--base-url", url, "--population", "4", "--generations", "0",
               "--samples", "4", "--calib-seqlen", "64", "--seqlen", "64", "--fitness-windows", "4",
               "--test-windows", "4", "--device", "cpu", "--baselines", "none"]
        done = subprocess.run(cmd, env=env, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    sent = server.requests[0]
    basic = base64.b64encode(f"u:{password}".encode())
    assert sent.headers["authorization"] == f"Basic {basic.decode()}"  # not the OpenAI key
    assert sent.query == f"api_key={token}"  # the URL's credentials still reach the server
    best = json.loads((out / "best.json").read_text())
    assert best["config"]["base_url"] == server.base_url and best["oracle"]["replies"]["valid"] == 1
    files = _tree_bytes(home, out)
    assert any("prefect" in str(p) and p.suffix == ".db" for p in files)  # the database was searched too
    for path, data in [*files.items(), (Path("stdout"), done.stdout), (Path("stderr"), done.stderr)]:
        for secret in (password.encode(), token.encode(), REAL_KEY.encode(), basic):
            assert secret not in data, f"{secret!r} in {path}"


# --- A reply that cannot be read is not a cached success ----------------------------------------------


def test_a_rerun_after_an_unreadable_reply_asks_again(prefect_api, tiny_workspace, tmp_path):
    """The first run meets an HTML page where the reply should be: it falls back and finishes. The
    rerun does not replay that page from the cache: it asks again, and takes the good reply."""
    from test_search_flow import run_search

    vectors = [[0.5, 0.5, 0.5, 0.5], [0.4, 0.6, 0.5, 0.5], [0.6, 0.4, 0.5, 0.5], [0.5, 0.5, 0.4, 0.6]]
    small = dict(oracle="openai:fake-gpt", population=4, generations=0, oracle_timeout=5.0, seed=25)
    with FakeOpenAI([HOSTILE["html-200"], reply(json.dumps({"rates": vectors}))]) as server:
        first = run_search(tiny_workspace, tmp_path / "first", base_url=server.base_url, **small)
        assert first["oracle"]["replies"]["invalid"] == 1 and first["oracle_fallbacks"] == 4
        again = run_search(tiny_workspace, tmp_path / "again", base_url=server.base_url, **small)
    assert len(server.requests) == 2 and again["oracle_replays"] == 0 and again["oracle_calls"] == 1
    assert again["oracle"]["replies"]["valid"] == 1 and again["oracle_fallbacks"] == 0


def test_a_rerun_after_a_deeply_nested_reply_resumes(prefect_api, tiny_workspace, tmp_path):
    """A chat completion whose text is JSON nested 200,000 deep is the model's (invalid) answer: the
    search re-asks and goes on; the rerun replays both replies from the cache and finds the same."""
    from test_search_flow import run_search

    vectors = [[0.5, 0.5, 0.5, 0.5], [0.4, 0.6, 0.5, 0.5], [0.6, 0.4, 0.5, 0.5], [0.5, 0.5, 0.4, 0.6]]
    small = dict(oracle="openai:fake-gpt", population=4, generations=0, oracle_timeout=5.0, seed=27)
    with FakeOpenAI([HOSTILE["nested-content"], reply(json.dumps({"rates": vectors}))]) as server:
        first = run_search(tiny_workspace, tmp_path / "first", base_url=server.base_url, **small)
        again = run_search(tiny_workspace, tmp_path / "again", base_url=server.base_url, **small)
    assert first["oracle"]["replies"] == {"valid": 1, "repaired": 0, "invalid": 1, "cut": 0, "late": 0}
    assert len(server.requests) == 2 and again["oracle_replays"] == 2 and again["oracle_calls"] == 0
    assert (again["rates"], again["fitness"]) == (first["rates"], first["fitness"])


def test_a_server_that_stays_down_is_one_line_and_exit_3(prefect_api, tiny_workspace, tmp_path, capsys, monkeypatch):
    from helpers import run_cli

    with FakeOpenAI([status(503, retry_after="0")]) as server:
        code, _, err = run_cli(capsys, monkeypatch, "search", "--model", str(tiny_workspace / "model"),
                               "--data", str(tiny_workspace / "corpus.txt"), "--ratio", "0.5",
                               "--out", str(tmp_path / "down"), "--oracle", "openai:fake-gpt",
                               "--base-url", server.base_url, "--population", "4", "--generations", "0",
                               "--samples", "4", "--calib-seqlen", "64", "--seqlen", "64", "--fitness-windows", "4",
                               "--test-windows", "4", "--device", "cpu", "--baselines", "none", "--seed", "26")
    assert code == 3, err[-3000:]
    assert "HTTP 503" in err and server.base_url in err and "Traceback" not in err
