"""Algorithm 1 step functions, the GA/random oracles, the LLM oracle's bookkeeping, make_oracle."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from selfprune.core.errors import UserError
from selfprune.evolve.classical import GAOracle, RandomOracle
from selfprune.evolve.evolution import SearchParams, initial_population, offspring, run_search, survivors
from selfprune.evolve.llm_oracle import LLMOracle
from selfprune.evolve.oracle_registry import make_oracle
from selfprune.evolve.search_context import SearchContext
from selfprune.llm.chat import ChatRequest, Reply
from selfprune.storage.hashing import content_hash

CTX = SearchContext(model_name="tiny", n_layers=6, beta=0.3, p_max=0.9, seed=7)
TARGET = [0.1, 0.5, 0.2, 0.4, 0.3, 0.3]


def toy_fitness(rates: list[float]) -> float:
    return 1.0 + sum((p - t) ** 2 for p, t in zip(rates, TARGET))


def assert_valid(population, ctx=CTX, exclude=()):
    keys = [ctx.canonical(p) for p in population]
    assert len(set(keys)) == len(keys), "duplicates"
    assert not set(keys) & {ctx.canonical(p) for p in exclude}, "repeats the population"
    for p in population:
        assert len(p) == ctx.n_layers
        assert all(0.0 <= r <= ctx.p_max for r in p)
        assert abs(sum(p) / ctx.n_layers - ctx.beta) < 1e-6


def scored(pop):
    return [(p, toy_fitness(p)) for p in pop]


@pytest.mark.parametrize("oracle", [GAOracle(), RandomOracle()], ids=["ga", "random"])
def test_classical_oracles_are_valid_and_deterministic(oracle):
    init = oracle.initialize(CTX, 8)
    assert len(init) == 8 and init == oracle.initialize(CTX, 8)
    assert_valid(init)
    pop = scored(init)
    kids = oracle.evolve(CTX, pop, 3, 4, generation=1)
    assert len(kids) == 7 and kids == oracle.evolve(CTX, pop, 3, 4, generation=1)
    assert_valid(kids, exclude=init)
    assert kids != oracle.evolve(CTX, pop, 3, 4, generation=2)
    other_seed = SearchContext(model_name="tiny", n_layers=6, beta=0.3, seed=8)
    assert oracle.initialize(other_seed, 8) != init


def test_ga_respects_a_coarse_canonical_key():
    # Rates rounded to 0.1: the space is small, duplicates must still never come back.
    coarse = SearchContext("tiny", 3, 0.3, 0.9, canonical=lambda r: tuple(round(x, 1) for x in r))
    ga = GAOracle()
    init = ga.initialize(coarse, 5)
    kids = ga.evolve(coarse, scored(init), 5, 5, generation=1)
    assert_valid(init, coarse)
    assert_valid(kids, coarse, exclude=init)


def test_survivors_top_k_with_stable_ties():
    pop = [([0], 3.0), ([1], 1.0), ([2], float("nan")), ([3], 1.0), ([4], float("inf")), ([5], 2.0)]
    assert [p[0][0] for p in survivors(pop, 4)] == [1, 3, 5, 0]
    assert [p[0][0] for p in survivors(pop, 6)] == [1, 3, 5, 0, 4, 2]


@pytest.mark.parametrize("bad", [dict(population=1), dict(mutations=-1), dict(generations=-2)])
def test_params_validation(bad):
    with pytest.raises(UserError):
        SearchParams(**bad)


def test_context_validation():
    with pytest.raises(UserError):
        SearchContext("tiny", 4, beta=0.95, p_max=0.9)
    with pytest.raises(UserError):
        SearchContext("tiny", 0, beta=0.3)


class CountingFitness:
    def __init__(self, ctx=CTX):
        self.ctx = ctx
        self.seen: Counter = Counter()
        self.batches: list[int] = []

    def __call__(self, batch):
        """A batch evaluator, as the search calls it: one list of candidates per generation."""
        self.batches.append(len(batch))
        for rates in batch:
            self.seen[self.ctx.canonical(rates)] += 1
        return [toy_fitness(rates) for rates in batch]


def test_run_search_improves_and_never_evaluates_twice():
    params = SearchParams(population=8, mutations=4, crossovers=4, generations=15, seed=0)
    fitness = CountingFitness()
    result = run_search(GAOracle(), CTX, params, fitness)
    bests = [h.best for h in result.history]
    assert len(result.history) == params.generations + 1
    assert all(b2 <= b1 for b1, b2 in zip(bests, bests[1:]))
    assert bests[-1] < bests[0]
    assert max(fitness.seen.values()) == 1
    assert result.evaluations == sum(fitness.seen.values()) <= 8 + 15 * 8
    assert result.best_fitness == bests[-1] == toy_fitness(result.best)
    assert_valid([p for p, _ in result.population])


def test_run_search_memo_with_a_coarse_key():
    coarse = SearchContext("tiny", 3, 0.3, 0.9, canonical=lambda r: tuple(round(x, 1) for x in r))
    fitness = CountingFitness(coarse)
    seen = []
    result = run_search(RandomOracle(), coarse, SearchParams(population=4, mutations=3, crossovers=3, generations=10),
                        fitness, on_generation=seen.append)
    assert max(fitness.seen.values()) == 1
    # The hook sees every generation once, after selection; no structure is in a population twice.
    assert [g.index for g in seen] == list(range(11)) and [g.stats for g in seen] == result.history
    for g in seen:
        keys = [coarse.canonical(r) for r, _ in g.population]
        assert len(keys) == len(set(keys)) and g.evaluated <= len(g.candidates)
    assert fitness.batches == [g.evaluated for g in seen if g.evaluated]


class DuplicatingOracle(GAOracle):
    """Returns every child twice plus a copy of the best population member: the loop must drop them."""

    def evolve(self, ctx, population, n_crossover, n_mutation, generation):
        kids = super().evolve(ctx, population, n_crossover, n_mutation, generation)
        return kids + kids + [list(population[0][0])]


def test_duplicates_never_enter_the_population_twice():
    fitness = CountingFitness()
    seen = []
    run_search(DuplicatingOracle(), CTX, SearchParams(population=6, mutations=2, crossovers=2, generations=4), fitness,
               on_generation=seen.append)
    assert max(fitness.seen.values()) == 1
    for g in seen:
        keys = [CTX.canonical(r) for r, _ in g.population]
        assert len(keys) == len(set(keys))
        assert g.index == 0 or len(g.candidates) == 4  # the repeats and the copy were dropped


class Spy:
    """An oracle that records what it was asked for (delegating to the GA)."""

    def __init__(self):
        self.ga = GAOracle()
        self.asks = []

    def initialize(self, ctx, k):
        self.asks.append(("init", k))
        return self.ga.initialize(ctx, k)

    def evolve(self, ctx, population, n_crossover, n_mutation, generation):
        self.asks.append(("evolve", n_crossover, n_mutation, generation))
        return self.ga.evolve(ctx, population, n_crossover, n_mutation, generation)


def test_ablation_switches():
    spy = Spy()
    params = SearchParams(population=4, mutations=3, crossovers=2, generations=2, random_init=True, no_mutation=True)
    assert initial_population(spy, CTX, params) == RandomOracle().initialize(CTX, 4)
    assert spy.asks == []
    pop = scored(GAOracle().initialize(CTX, 4))
    assert len(offspring(spy, CTX, params, pop, 1)) == 2
    assert spy.asks == [("evolve", 2, 0, 1)]
    both_off = SearchParams(population=4, generations=3, no_mutation=True, no_crossover=True)
    result = run_search(spy, CTX, both_off, lambda batch: [toy_fitness(r) for r in batch])
    assert result.evaluations == 4 and spy.asks[-1] == ("init", 4)


def test_paper_budget_is_430_evaluations():
    params = SearchParams()
    fitness = CountingFitness()
    result = run_search(GAOracle(), CTX, params, fitness)
    assert result.evaluations == params.population + params.generations * (params.mutations + params.crossovers) == 430


# --- LLMOracle with a scripted in-process transport -------------------------------------------


def scripted(*replies):
    requests: list[ChatRequest] = []

    def transport(request: ChatRequest) -> Reply:
        requests.append(request)
        return Reply(replies[min(len(requests), len(replies)) - 1])

    return transport, requests


def test_llm_oracle_reasks_then_falls_back():
    good = [[0.3] * 6, [0.2, 0.4, 0.3, 0.3, 0.3, 0.3]]
    transport, requests = scripted(json.dumps({"rates": good + [good[0]]}), "no idea", "[0.1, 0.2]")
    oracle = LLMOracle("m", transport, max_reasks=2)
    pop = oracle.initialize(CTX, 4)
    assert_valid(pop)
    assert len(pop) == 4
    assert [CTX.canonical(p) for p in pop[:2]] == [CTX.canonical(g) for g in good]
    assert oracle.calls == 3 and oracle.fallbacks == 2 and oracle.duplicates == 1 and oracle.rejected == 1
    assert [r.attempt for r in requests] == [0, 1, 2]
    assert len({content_hash(r) for r in requests}) == 3
    assert "generate 4 valid" in requests[0].messages[0][1] and "generate 2 valid" in requests[1].messages[0][1]
    # the first reply was usable as sent, "no idea" held nothing, the short vector was rejected
    assert oracle.replies == {"valid": 1, "repaired": 0, "invalid": 2, "cut": 0, "late": 0} and oracle.reasks == 2
    assert [r.max_tokens for r in requests] == [256 + 8 * 4 * 6, 256 + 8 * 2 * 6, 256 + 8 * 2 * 6]


def test_llm_oracle_evolve_drops_population_duplicates():
    init = GAOracle().initialize(CTX, 4)
    reply = json.dumps({"rates": [init[0], init[1]]})
    transport, requests = scripted(reply)
    oracle = LLMOracle("m", transport, max_reasks=0)
    kids = oracle.evolve(CTX, scored(init), 2, 1, generation=3)
    assert len(kids) == 3 and oracle.fallbacks == 3 and oracle.duplicates == 2 * 2
    assert_valid(kids, exclude=init)
    assert [r.messages[0][1].split("perform the ")[1].split(" ")[0] for r in requests] == ["mutation", "crossover"]


def test_make_oracle():
    assert isinstance(make_oracle("ga", None), GAOracle)
    assert isinstance(make_oracle("random", None), RandomOracle)
    llm = make_oracle("openai:gpt-4o", "http://localhost:8000/v1", transport=lambda r: "")
    assert isinstance(llm, LLMOracle) and llm.model == "gpt-4o" and "localhost:8000" in llm.backend
    for bad in ("gpt", "openai:", "anthropic:x", ""):
        with pytest.raises(UserError, match="ga, random, openai:MODEL"):
            make_oracle(bad, None)


# --- starting from the best known answers ------------------------------------------------------


def test_known_candidates_join_generation_zero_and_the_best_of_them_survives():
    known = [TARGET, [0.3] * 6]  # TARGET is the optimum of toy_fitness
    seen: list[list[float]] = []

    def evaluate(batch):
        seen.extend(batch)
        return [toy_fitness(r) for r in batch]

    params = SearchParams(population=4, mutations=2, crossovers=2, generations=2)
    result = run_search(GAOracle(), CTX, params, evaluate, known=known)
    assert seen[:2] == known and result.best == TARGET and result.best_fitness == toy_fitness(TARGET)
    assert initial_population(GAOracle(), CTX, params, known)[:2] == known
    plain = run_search(GAOracle(), CTX, params, lambda b: [toy_fitness(r) for r in b])
    assert plain.best_fitness > result.best_fitness  # without them the GA had not found it


def test_the_llm_sees_the_baselines_labelled_and_the_papers_prompt_is_unchanged_without_them():
    from selfprune.evolve.prompts import INITIALIZATION_TEMPLATE, evolution_prompt, initialization_prompt

    owl = ("owl", (0.2, 0.4, 0.3, 0.3, 0.3, 0.3))
    ctx = SearchContext(model_name="tiny", n_layers=6, beta=0.3, p_max=0.9, seed=7, baselines=(owl, ("uniform", (0.3,) * 6)))
    transport, requests = scripted(json.dumps({"rates": [[0.3] * 6]}))
    oracle = LLMOracle("m", transport, max_reasks=0)
    oracle.initialize(ctx, 2)
    prompt = requests[0].messages[0][1]
    assert "### Known allocations ###" in prompt and "owl: [0.20000, 0.40000, 0.30000" in prompt
    assert "uniform: [0.30000" in prompt
    population = [(list(owl[1]), 2.5), ([0.1, 0.5, 0.2, 0.4, 0.3, 0.3], 3.0)]
    oracle.evolve(ctx, population, 0, 1, generation=1)
    assert "Configuration1 (owl): [0.20000" in requests[-1].messages[0][1]
    assert "Configuration2: [0.10000" in requests[-1].messages[0][1]
    paper = INITIALIZATION_TEMPLATE.format(model="m", dataset="d", n_layers=6, count=2, beta=0.3, p_max=0.9)
    assert initialization_prompt("m", 6, 2, 0.3, 0.9, "d") == paper
    assert evolution_prompt("mutation", "m", 6, population, 1, 0.3, 0.9) == evolution_prompt(
        "mutation", "m", 6, population, 1, 0.3, 0.9, labels=[None, None])


def test_the_default_baselines_are_every_registered_allocation_and_a_typo_is_refused():
    import pkgutil

    from selfprune import allocators
    from selfprune.allocators import ALLOCATIONS
    from selfprune.config import SearchConfig
    from selfprune.evolve.runner import check

    # the package's own allocations, in their registered order (one registered without an order, as
    # tests/test_registry.py's, is usable by name but no default baseline)
    own = ["uniform", "owl", "sdsa", "atp", "dlp", "alphapruning"]
    assert ALLOCATIONS.names()[:len(own)] == own == ALLOCATIONS.ranked() == SearchConfig().baselines
    # each file of the folder registered itself (but rates.py, the arithmetic they share): a new
    # allocation is one new file, no import line
    files = {m.name for m in pkgutil.iter_modules(allocators.__path__)} - {"rates"}
    registered = {ALLOCATIONS.get(name).__module__.rpartition(".")[2] for name in ALLOCATIONS.names()}
    assert files <= registered, files - registered
    assert SearchConfig(baselines="none").baselines == [] and SearchConfig(baselines="owl,atp").baselines == ["owl", "atp"]
    with pytest.raises(UserError, match="'owll' is not a registered allocation"):
        check(SearchConfig(baselines="uniform,owll"))
