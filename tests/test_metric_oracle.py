"""The metric search's LLM oracle (GCoT prompts) through the real ``openai`` client against a real
(fake) HTTP server: valid replies, hostile ones (nothing runs; refusals go back with their reasons;
the GP fills after the re-asks), duplicates, late and cut replies, and deterministic requests."""

from __future__ import annotations

import json
import time

import pytest
from fake_openai_server import FakeOpenAI, cut, reply, slow

from selfprune.core.errors import UserError
from selfprune.evolve import metric_prompts
from selfprune.evolve.gp import GPOracle
from selfprune.evolve.metric_oracle import LLMMetricOracle, make_metric_oracle, parse_proposals
from selfprune.llm.chat import ChatRequest, OracleUnavailable, Reply
from selfprune.llm.transport import openai_transport
from selfprune.metrics import METRICS, MetricError, parse_metric
from selfprune.metrics.edits import describe_edit
from selfprune.metrics.search_space import Lineage, MetricContext

CTX = MetricContext(model_name="tiny-llama", sparsity=0.5, seed=1)
MAGNITUDE, WANDA, RIA = (METRICS.get(n).text for n in ("magnitude", "wanda", "ria"))
XVAR = parse_metric("abs(W) * X_var").text


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy", "OPENAI_BASE_URL"):
        monkeypatch.delenv(var, raising=False)


def scored() -> tuple[Lineage, list[tuple[str, float]]]:
    """Built-ins seeded through the GP oracle, one GP child of magnitude, all scored."""
    lineage = Lineage()
    GPOracle(lineage=lineage).initialize(CTX, 3)  # magnitude, wanda, ria
    lineage.add(XVAR, (MAGNITUDE,), describe_edit(MAGNITUDE, XVAR), 1, "gp")
    # ids by fitness: m1 ria, m2 wanda, m3 X_var child, m4 magnitude
    return lineage, [(MAGNITUDE, 20.0), (WANDA, 15.0), (RIA, 14.0), (XVAR, 16.0)]


def oracle_for(server: FakeOpenAI, lineage: Lineage, timeout: float = 2.0, **options) -> LLMMetricOracle:
    transport = openai_transport(server.base_url, timeout=timeout, max_retries=1)
    return make_metric_oracle("openai:fake-model", server.base_url, transport, lineage=lineage, **options)


def as_reply(*entries) -> str:
    metrics = [e if isinstance(e, dict) else {"parent": e[0], "other_parent": e[1], "edit": "trust me", "metric": e[2]}
               for e in entries]
    return json.dumps({"reasoning": "X_var helped; try roots", "metrics": metrics})


def messages(server: FakeOpenAI, i: int) -> list[dict]:
    return server.requests[i].body["messages"]


def test_a_valid_reply_gives_canonical_metrics_with_resolved_parents_and_computed_edits():
    lineage, population = scored()
    mutants = as_reply(("m2", None, "X_rms ** 0.5*abs(W)"), ("m3", None, "sqrt(abs(W)) * X_var"))
    crossover = as_reply(("m2", "m3", "abs(W) * (X_var + X_rms)"))
    with FakeOpenAI([reply(mutants), reply(crossover)]) as server:
        oracle = oracle_for(server, lineage)
        out = oracle.evolve(CTX, population, n_crossover=1, n_mutation=2, generation=2)
    expected = [parse_metric(t).text for t in ("X_rms ** 0.5*abs(W)", "sqrt(abs(W)) * X_var", "abs(W) * (X_var + X_rms)")]
    assert out == expected
    parents = [(WANDA,), (XVAR,), (WANDA, XVAR)]
    for child, want in zip(out, parents):
        origin = lineage.nodes[child]
        assert origin.parents == want and origin.source == "llm" and origin.generation == 2
        assert origin.edit == describe_edit(want[0], child) != "trust me"  # computed, not the model's word
    assert oracle.accounting() | {"seconds": None} == {
        "calls": 2, "replies": {"valid": 2, "partial": 0, "invalid": 0, "cut": 0, "late": 0}, "reasks": 0,
        "fallbacks": 0, "refused": 0, "duplicates": 0, "prompt_tokens": 2, "completion_tokens": 2, "seconds": None}
    assert oracle.fallback.lineage is lineage
    schema = server.requests[0].body["response_format"]["json_schema"]["schema"]
    assert schema == metric_prompts.metrics_schema(2)
    assert server.requests[1].body["response_format"]["json_schema"]["schema"]["properties"]["metrics"]["maxItems"] == 1


def test_the_prompt_holds_the_graph_with_edits_and_deltas_and_the_reasoning_steps():
    lineage, population = scored()
    with FakeOpenAI([reply(as_reply(("m1", None, "abs(W) * X_mean")))]) as server:
        oracle_for(server, lineage).evolve(CTX, population, n_crossover=0, n_mutation=1, generation=2)
    prompt = messages(server, 0)[0]["content"]
    assert f"m1: {RIA} | ppl 14.00 | gen 0 | built-in" in prompt
    assert f"m3: {XVAR} | ppl 16.00 | gen 1 | gp" in prompt
    assert f"m4 -> m3 [{describe_edit(MAGNITUDE, XVAR)}] Δppl -4.00" in prompt
    for i, step in enumerate(("Edits:", "Shared traits:", "Gaps:", "Proposals: propose 1 new metric"), 1):
        assert f"{i}. {step}" in prompt
    for name in ("W", "X_rms", "X_mean", "X_var", "G", "rowminmax", "colnorm", "LOWEST", "0.5", "unstructured"):
        assert name in prompt
    assert '"other_parent"' in prompt and "mutation" in prompt


def test_the_graph_is_bounded_and_keeps_parents():
    lineage = Lineage()
    fitness = {}
    for i in range(30):
        text = parse_metric(f"abs(W) * X_rms ** {0.1 * (i + 1):.1f}").text
        lineage.add(text, (MAGNITUDE,), describe_edit(MAGNITUDE, text), 1, "gp")
        fitness[text] = 10.0 + i
    text, ids = metric_prompts.render_graph(lineage, fitness, limit=5)
    assert len(ids) == 6 and ids["m6"] == MAGNITUDE  # 5 best + their parent (not scored: last)
    assert f"m6: {MAGNITUDE} | ppl ? | gen ? | given" in text and "m6 -> m1 [" in text and "Δppl ?" in text
    assert metric_prompts.render_graph(lineage, fitness, limit=5) == (text, ids)


def test_gradient_free_search_hides_g_and_refuses_it():
    ctx = MetricContext(model_name="tiny-llama", sparsity=0.5, seed=1, gradient=False)
    assert "- G:" not in metric_prompts.task_text(ctx) and "- G:" in metric_prompts.task_text(CTX)
    lineage, population = scored()
    with FakeOpenAI([reply(as_reply(("m1", None, "abs(W) * G"))), reply(as_reply(("m1", None, "abs(W) * X_mean")))]) as server:
        oracle = oracle_for(server, lineage)
        out = oracle.evolve(ctx, population, 0, 1, generation=2)
    assert out == [parse_metric("abs(W) * X_mean").text] and oracle.refused == 1
    assert "it reads G" in messages(server, 1)[-1]["content"]


HOSTILE = ["__import__('os').system('touch SENTINEL')", "open('SENTINEL', 'w').write('x')", "[x for x in W]",
           "lambda: W"]


def test_hostile_metrics_are_refused_with_their_reasons_then_gp_fills(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lineage, population = scored()
    content = as_reply(*[("m1", None, m) for m in HOSTILE], {"metric": {"__class__": "x"}, "parent": ["m1"]})
    with FakeOpenAI([reply(content)]) as server:
        oracle = oracle_for(server, lineage)
        out = oracle.evolve(CTX, population, 0, 2, generation=2)
    assert not (tmp_path / "SENTINEL").exists()
    assert len(out) == 2 and oracle.fallbacks == 2 and oracle.calls == 3 and oracle.reasks == 2
    assert oracle.refused == 3 * 5 and oracle.replies["invalid"] == 3
    assert all(lineage.nodes[t].source == "gp" for t in out)  # the GP's, on the shared lineage
    assert all(parse_metric(t).text == t for t in out) and not {t for t, _ in population} & set(out)
    second = messages(server, 1)
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[1]["content"] == content  # the conversation goes back as it was
    for metric in HOSTILE:
        with pytest.raises(MetricError) as err:
            parse_metric(metric)
        assert str(err.value) in second[2]["content"]
    assert 'the "metric" field must be a string' in second[2]["content"]
    assert [m["role"] for m in messages(server, 2)] == ["user", "assistant", "user", "assistant", "user"]


@pytest.mark.parametrize("content", [
    "Sure! Here is a metric: __import__('os').system('touch SENTINEL')",
    '{"reasoning": "x", "metrics": [{"metric": "abs(W)"',  # invalid JSON
    "```python\nimport os; os.system('touch SENTINEL')\n```",
    '{"metrics": []}',
], ids=["prose", "invalid-json", "code-fence", "empty"])
def test_replies_without_metrics_are_reasked_then_gp_fills(content, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lineage, population = scored()
    with FakeOpenAI([reply(content)]) as server:
        oracle = oracle_for(server, lineage)
        out = oracle.evolve(CTX, population, 1, 1, generation=2)
    assert not (tmp_path / "SENTINEL").exists()
    assert len(out) == 2 and oracle.fallbacks == 2 and oracle.calls == 6 and oracle.replies["invalid"] == 6
    assert "reply with only the JSON object" in messages(server, 1)[-1]["content"]


def test_duplicates_in_another_spelling_are_dropped_and_counted():
    lineage, population = scored()
    earlier = parse_metric("abs(W) * X_mean").text
    lineage.add(earlier, (WANDA,), describe_edit(WANDA, earlier), 1, "gp")  # proposed before, not in the population
    content = as_reply(("m2", None, "abs(W) * X_rms"), ("m2", None, "(X_rms*abs(W)) + 0"), ("m2", None, "X_mean * abs(W)"),
                       ("m3", None, "sqrt(abs(W)) * X_var"), ("m3", None, "X_var*sqrt(abs(W))"))
    with FakeOpenAI([reply(content)]) as server:
        oracle = oracle_for(server, lineage, max_reasks=0)
        out = oracle.evolve(CTX, population, 0, 3, generation=2)
    assert out[0] == parse_metric("sqrt(abs(W)) * X_var").text and len(out) == 3 and len(set(out)) == 3
    assert oracle.duplicates == 4 and oracle.fallbacks == 2 and oracle.replies["partial"] == 1
    assert len(server.requests) == 1


def test_a_late_reply_is_not_reasked_and_falls_back():
    lineage, population = scored()
    start = time.monotonic()
    with FakeOpenAI([slow(2.0, as_reply(("m1", None, "abs(W) * X_mean")))]) as server:
        oracle = oracle_for(server, lineage, timeout=0.3)
        out = oracle.evolve(CTX, population, 0, 2, generation=2)
        assert len(server.requests) == 1
    assert len(out) == 2 and oracle.replies["late"] == 1 and oracle.fallbacks == 2 and oracle.reasks == 0
    assert time.monotonic() - start < 2


def test_strict_fails_instead_of_falling_back():
    lineage, population = scored()
    with FakeOpenAI([slow(2.0, "{}")]) as server:
        oracle = oracle_for(server, lineage, timeout=0.3, strict=True)
        with pytest.raises(OracleUnavailable, match="strict"):
            oracle.evolve(CTX, population, 0, 1, generation=2)


def test_a_cut_reply_is_reasked_in_the_conversation():
    lineage, population = scored()
    good = as_reply(("m1", None, "abs(W) * X_mean"))
    with FakeOpenAI([cut(good[:40]), reply(good)]) as server:
        oracle = oracle_for(server, lineage)
        out = oracle.evolve(CTX, population, 0, 1, generation=2)
    assert out == [parse_metric("abs(W) * X_mean").text] and oracle.fallbacks == 0
    assert oracle.replies["cut"] == 1 and oracle.replies["valid"] == 1
    assert "cut at the length limit" in messages(server, 1)[-1]["content"]


def test_initialize_shows_the_built_ins_and_asks_for_the_rest():
    lineage = Lineage()
    with FakeOpenAI([reply(as_reply(("m2", None, "abs(W) * X_var"), (None, None, "abs(W) / rownorm(W)")))]) as server:
        oracle = oracle_for(server, lineage)
        out = oracle.initialize(CTX, 6)
    builtins = [METRICS.get(n).text for n in METRICS.names()]
    assert out[:4] == builtins and out[4:] == [XVAR, parse_metric("abs(W) / rownorm(W)").text]
    assert [lineage.nodes[t].source for t in out] == ["built-in"] * 4 + ["llm"] * 2
    assert lineage.nodes[out[5]].parents == () and lineage.nodes[out[5]].edit == "new"
    prompt = messages(server, 0)[0]["content"]
    assert "Seed metrics" in prompt and all(f": {t} | ppl ? | gen 0 | built-in" in prompt for t in builtins)
    assert "propose 2 new metric" in prompt


def test_same_inputs_same_requests():
    def run() -> list[ChatRequest]:
        sent: list[ChatRequest] = []

        def transport(request: ChatRequest) -> Reply:
            sent.append(request)
            return Reply(as_reply(("m1", None, "abs(W) * X_mean"), ("m2", None, "lambda: W")))

        lineage, population = scored()
        LLMMetricOracle("m", transport, lineage=lineage).evolve(CTX, population, 1, 2, generation=3)
        return sent

    first, second = run(), run()
    assert first == second and len(first) == 6  # each step: one metric short after every reply
    assert len({r.seed for r in first}) == len(first)
    assert [r.attempt for r in first] == [0, 1, 2, 0, 1, 2]
    assert [len(r.messages) for r in first] == [1, 3, 5, 1, 3, 5]


def test_parse_proposals_is_tolerant_and_never_evaluates():
    fenced = "Here:\n```json\n" + as_reply(("m1", None, "abs(W)")) + "\n```\nDone."
    assert [p.metric for p in parse_proposals(fenced)] == ["abs(W)"]
    assert [p.metric for p in parse_proposals('["abs(W)", "W ** 2"]')] == ["abs(W)", "W ** 2"]
    assert parse_proposals('{"metric": "abs(W)", "parent": "m1"}')[0].parent == "m1"
    assert parse_proposals("no json here") is None and parse_proposals("") is None


def test_make_metric_oracle_shares_the_lineage():
    lineage = Lineage()
    gp = make_metric_oracle("gp", lineage=lineage, strict=True)
    llm = make_metric_oracle("openai:some-model", "http://127.0.0.1:1/v1", lineage=lineage)
    assert isinstance(gp, GPOracle) and gp.lineage is lineage
    assert isinstance(llm, LLMMetricOracle) and llm.lineage is lineage and llm.fallback.lineage is lineage
    assert llm.backend == "openai@http://127.0.0.1:1/v1"
    for bad in ("openai", "openai:", "gp:x", "ga", "nope:x"):
        with pytest.raises(UserError, match="gp, openai:MODEL"):
            make_metric_oracle(bad, lineage=lineage)
    with pytest.raises(ValueError, match="share one Lineage"):
        LLMMetricOracle("m", lambda r: Reply(None), lineage=Lineage(), fallback=GPOracle(lineage=lineage))
