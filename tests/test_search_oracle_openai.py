"""The LLM oracle through the real ``openai`` client against a real (fake) HTTP server.

Every behaviour must end in a valid population or a clear OracleUnavailable: never a crash or a
hang. Timeouts and retries are kept small so the whole file runs in seconds.
"""

from __future__ import annotations

import json
import socket
import time

import pytest
from fake_openai_server import FakeOpenAI, cut, like_llama_cpp_python, no_json_mode, reply, slow, status

from selfprune.evolve.llm_oracle import LLMOracle
from selfprune.evolve.search_context import SearchContext
from selfprune.llm.chat import OracleUnavailable
from selfprune.llm.transport import openai_transport

KEY = "sk-test-DO-NOT-LEAK-1234"
CTX = SearchContext(model_name="tiny-llama", n_layers=4, beta=0.3, p_max=0.9, seed=1)
K = 3
GOOD = [[0.1, 0.3, 0.4, 0.4], [0.2, 0.2, 0.4, 0.4], [0.3, 0.3, 0.3, 0.3]]


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy", "OPENAI_BASE_URL"):
        monkeypatch.delenv(var, raising=False)


def oracle_for(server: FakeOpenAI, timeout: float = 2.0, max_retries: int = 1, max_reasks: int = 1) -> LLMOracle:
    """The oracle at ``server``, given $OPENAI_API_KEY by name (the only way another server gets it)."""
    transport = openai_transport(server.base_url, "OPENAI_API_KEY", timeout=timeout, max_retries=max_retries)
    return LLMOracle("fake-model", transport, max_reasks=max_reasks)


def assert_valid(population, n=K):
    assert len(population) == n
    keys = {CTX.canonical(p) for p in population}
    assert len(keys) == n
    for p in population:
        assert len(p) == CTX.n_layers and all(0.0 <= r <= CTX.p_max for r in p)
        assert abs(sum(p) / CTX.n_layers - CTX.beta) < 1e-6


def as_json(rates) -> str:
    return json.dumps({"rates": rates})


@pytest.mark.parametrize(
    "content, fallbacks",
    [
        (as_json(GOOD), 0),
        ("Step by step: early layers matter.\n" + "\n".join(str(r) for r in GOOD) + "\nThese sum right.", 0),
        (as_json([[0.3] * 3, [0.3] * 5, [0.3] * 40]), K),  # wrong lengths
        (as_json([[1.7, -0.2, 0.3, 0.4], [0.9, 0.9, 0.0, -3], [0.25, 0.35, 2.0, 0.3]]), 0),  # out of range
        (as_json([[0.5, 0.5, 0.5, 0.5], [0.0, 0.1, 0.2, 0.1], [0.4, 0.6, 0.8, 0.2]]), 0),  # mean drift
        (as_json([GOOD[0]] * 3), K - 1),  # duplicates (and the re-ask repeats them)
        ("", K),
        (None, K),
        ("I'm sorry, I can't help with pruning.", K),
    ],
    ids=["json", "prose", "wrong-lengths", "out-of-range", "mean-drift", "duplicates", "empty", "null", "refusal"],
)
def test_reply_behaviours_end_in_a_valid_population(content, fallbacks):
    with FakeOpenAI([reply(content)]) as server:
        oracle = oracle_for(server)
        population = oracle.initialize(CTX, K)
    assert_valid(population)
    assert oracle.fallbacks == fallbacks
    assert len(server.requests) == oracle.calls == (1 if fallbacks == 0 else 2)
    first = server.requests[0]
    assert first.path == "/v1/chat/completions"
    assert first.body["model"] == "fake-model" and first.body["response_format"]["type"] == "json_schema"
    schema = first.body["response_format"]["json_schema"]["schema"]["properties"]["rates"]
    assert schema["minItems"] == schema["maxItems"] == K and schema["items"]["maxItems"] == CTX.n_layers
    assert schema["items"]["items"] == {"type": "number", "minimum": 0, "maximum": CTX.p_max}
    assert first.body["max_tokens"] == 256 + 8 * K * CTX.n_layers  # bounded by what it asks for
    assert "seed" in first.body and "temperature" in first.body
    assert first.headers.get("authorization") == f"Bearer {KEY}"


def test_evolve_through_the_server():
    population = [(r, 10.0 + i) for i, r in enumerate(GOOD)]
    kids = [[0.2, 0.3, 0.35, 0.35], [0.15, 0.25, 0.45, 0.35]]
    with FakeOpenAI([reply(as_json(kids[:1])), reply(as_json(kids[1:]))]) as server:
        oracle = oracle_for(server, max_reasks=0)
        out = oracle.evolve(CTX, population, n_crossover=1, n_mutation=1, generation=1)
    assert_valid(out + GOOD, n=5)
    assert oracle.fallbacks == 0 and oracle.calls == 2
    assert "Fitness3: 12.0000" in server.requests[0].body["messages"][0]["content"]


def test_429_then_success():
    with FakeOpenAI([status(429, retry_after_ms=10), reply(as_json(GOOD))]) as server:
        oracle = oracle_for(server, max_retries=2)
        population = oracle.initialize(CTX, K)
    assert_valid(population)
    assert len(server.requests) == 2 and oracle.calls == 1 and oracle.fallbacks == 0


def test_500_past_retries_is_unavailable():
    with FakeOpenAI([status(500, retry_after_ms=10)]) as server:
        oracle = oracle_for(server, max_retries=2)
        with pytest.raises(OracleUnavailable, match="HTTP 500") as err:
            oracle.initialize(CTX, K)
    assert len(server.requests) == 3
    assert server.base_url in str(err.value) and KEY not in str(err.value)


def test_401_names_the_env_var_not_the_key():
    with FakeOpenAI([status(401)]) as server:
        with pytest.raises(OracleUnavailable, match=r"\$OPENAI_API_KEY") as err:
            oracle_for(server).initialize(CTX, K)
    assert KEY not in str(err.value) and len(server.requests) == 1


def test_a_late_reply_is_never_resent_and_the_step_falls_back():
    """A server still generating would only queue a copy: one request, then the GA fills the step."""
    start = time.monotonic()
    with FakeOpenAI([slow(2.0, as_json(GOOD)), reply(as_json(GOOD))]) as server:
        oracle = oracle_for(server, timeout=0.3, max_retries=3, max_reasks=2)
        population = oracle.initialize(CTX, K)
        assert len(server.requests) == 1
    assert_valid(population)
    assert oracle.replies["late"] == 1 and oracle.fallbacks == K and time.monotonic() - start < 2


def test_strict_oracle_fails_instead_of_falling_back():
    with FakeOpenAI([slow(2.0, as_json(GOOD))]) as server:
        oracle = LLMOracle("fake-model", openai_transport(server.base_url, timeout=0.3, max_retries=0), strict=True)
        with pytest.raises(OracleUnavailable, match="--oracle-strict") as err:
            oracle.initialize(CTX, K)
    assert KEY not in str(err.value)


def test_a_reply_cut_at_max_tokens_is_invalid_and_reasked():
    with FakeOpenAI([cut(as_json(GOOD)), reply(as_json(GOOD))]) as server:
        oracle = oracle_for(server, max_reasks=1)
        population = oracle.initialize(CTX, K)
    assert_valid(population)
    assert [CTX.canonical(p) for p in population] == [CTX.canonical(g) for g in GOOD]  # the second reply
    assert oracle.calls == 2 and oracle.fallbacks == 0  # the cut one counted for nothing
    assert oracle.accounting() | {"replies": None, "seconds": None} == {
        "calls": 2, "replies": None, "reasks": 1, "fallbacks": 0, "rejected_vectors": 0, "duplicates": 0,
        "prompt_tokens": 2, "completion_tokens": 2, "seconds": None}  # the fake server's usage: 1 + 1 per reply
    assert oracle.replies == {"valid": 1, "repaired": 0, "invalid": 0, "cut": 1, "late": 0}


def test_schema_form_is_found_once_per_server():
    """llama-cpp-python rejects json_schema with a 500 but takes json_object with a schema: the
    transport learns that once, and sends the form that works from then on."""
    with FakeOpenAI([like_llama_cpp_python(as_json(GOOD))]) as server:
        oracle = oracle_for(server, max_reasks=0)
        assert_valid(oracle.initialize(CTX, K))
        assert_valid(oracle.evolve(CTX, [(r, 1.0) for r in GOOD], 0, 1, generation=1) + GOOD, n=4)
    sent = [r.body["response_format"] for r in server.requests]
    assert [f["type"] for f in sent] == ["json_schema", "json_object", "json_object"]
    assert all("schema" in f for f in sent[1:])


def test_server_without_json_mode():
    with FakeOpenAI([no_json_mode(as_json(GOOD))]) as server:
        oracle = oracle_for(server, max_reasks=0)
        assert_valid(oracle.initialize(CTX, K))
        assert_valid(oracle.evolve(CTX, [(r, 1.0) for r in GOOD], 0, 1, generation=1) + GOOD, n=4)
    sent_format = [(r.body.get("response_format") or {}).get("type") for r in server.requests]
    # every form rejected once (schema, schema as llama-cpp-python takes it, JSON mode), then never sent again
    assert sent_format == ["json_schema", "json_object", "json_object", None, None]


def test_unreachable_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    transport = openai_transport(f"http://127.0.0.1:{port}/v1", timeout=0.5, max_retries=1)
    with pytest.raises(OracleUnavailable, match="could not be reached"):
        LLMOracle("m", transport).initialize(CTX, K)


def test_no_key_and_no_base_url(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    transport = openai_transport(None)
    with pytest.raises(OracleUnavailable, match=r"set \$OPENAI_API_KEY"):
        LLMOracle("gpt-4o", transport).initialize(CTX, K)


def test_local_server_needs_no_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    with FakeOpenAI([reply(as_json(GOOD))]) as server:
        assert_valid(LLMOracle("fake-model", openai_transport(server.base_url)).initialize(CTX, K))
    assert server.requests[0].headers.get("authorization") == "Bearer EMPTY"
