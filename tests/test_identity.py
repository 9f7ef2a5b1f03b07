"""Cache identity (selfprune/engine/identity.py): existing keys stay valid, and the library's and the flow's agree.

The pinned keys below were computed with the code before the identity module; a change here
invalidates every user's cache (a deliberate change is one stated version bump, and new literals).
"""

from __future__ import annotations

import importlib.metadata
import inspect

import pytest

from selfprune.model import devices

# Fixed inputs. The data spec is relative ("corpus.txt", read in the tiny workspace) because the
# calibration and scoring settings name it as given: an absolute temporary path would change every key.
MODEL_FP = "0123456789abcdef01234567"
STATS_KEY = "89abcdef0123456789abcdef"
CALIBRATION = {"data": "corpus.txt", "samples": 4, "seqlen": 64, "batch_size": 4}
SCORING = {"data": "corpus.txt", "split": "test", "seqlen": 64, "windows": 4, "batch_size": 4}
STRUCTURE = [[1, 64], [2, 48], [1, 96], [2, 32]]
SPARSE_ATP = {"metric": "X_rms * abs(W)", "pattern": "unstructured", "allocation": "atp", "sparsity": 0.5}
REQUEST = {"backend": "openai", "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "rates?"}],
           "temperature": 0.7, "seed": 1, "attempt": 0, "json_mode": True, "max_tokens": None, "schema": None}


def work() -> dict[str, tuple]:
    """Each pinned key's task and parameters, as the flows submit them (typed values since the
    tasks took them; the keys were pinned when they took JSON fields)."""
    from selfprune.engine.candidate import from_json
    from selfprune.engine.settings import Calibration, ModelSpec, Scoring
    from selfprune.tasks.evaluation import allocation_rates, evaluate_zero_shot
    from selfprune.tasks.oracle import oracle_call
    from selfprune.tasks.pruning import capture_statistics, score_candidate

    where = {"spec": ModelSpec("model", MODEL_FP, "cpu", "float32", "wanda-sp"), "calibration": Calibration(**CALIBRATION)}
    scored = where | {"stats_key": STATS_KEY}
    structure, sparse_atp, scoring = from_json(STRUCTURE), from_json(SPARSE_ATP), Scoring(**SCORING)
    return {
        "capture_statistics": (capture_statistics, where),
        "score_candidate/structure": (score_candidate, scored | {"candidate": structure, "scoring": scoring}),
        "score_candidate/sparse_atp": (score_candidate, scored | {"candidate": sparse_atp, "scoring": scoring}),
        "allocation_rates/atp": (allocation_rates, scored | {"allocation": "atp", "ratio": 0.5}),
        "evaluate_zero_shot": (evaluate_zero_shot, scored | {"candidate": structure, "tasks": ["arc_easy"], "limit": 10}),
        "evaluate_zero_shot/dense": (evaluate_zero_shot, scored | {"candidate": from_json(None), "tasks": ["arc_easy"], "limit": 10}),
        "oracle_call": (oracle_call, {"request": REQUEST, "base_url": "http://127.0.0.1:8000/v1"}),
    }


# Computed with the code before the identity module; a change here invalidates every user's cache.
PINNED = {
    "capture_statistics": "capture_statistics-210228cfe0d56c8cf666f91b98235204",
    "score_candidate/structure": "score_candidate-b3ccb3ead7ea009c31ab553bca120e0b",
    "score_candidate/sparse_atp": "score_candidate-51680eadbbb548711ef5095ea202020b",
    "allocation_rates/atp": "allocation_rates-34977e21ab24ceb2f9c4216b8be1ab6a",
    "evaluate_zero_shot": "evaluate_zero_shot-07524ade135098735d7caa6661b12b80",
    "evaluate_zero_shot/dense": "evaluate_zero_shot-dbcee665fef6e7064145473f771d9e1f",
    "oracle_call": "oracle_call-3a33ed44bd8307c03c16bf40baff4e5b",
    "tiny model": "c2ffdd19a8ee570771334656",  # the tiny workspace model's weights (not a key)
    "stats_key": "3e3b135fb778a56cb70faea7",  # the workbench's statistics key of that model
}


def task_key(task, **params) -> str:
    """The key a run of ``task`` with ``params`` is cached under (tasks/caching.py, as Prefect calls it)."""
    bound = inspect.signature(task.fn).bind(**params)
    bound.apply_defaults()
    policy = task.cache_policy
    return policy.key_for(policy.namespace, dict(bound.arguments))


@pytest.fixture
def fixed_builds(monkeypatch, tiny_workspace):
    """The tiny workspace as the working directory, and fixed library versions (a torch, transformers
    or lm-eval upgrade changes a figure's key on purpose, not this test)."""
    monkeypatch.chdir(tiny_workspace)
    monkeypatch.setattr(devices, "library_builds", lambda: {"torch": "2.13.0+cpu", "transformers": "5.24.0"})
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.4.13" if name == "lm_eval" else real(name))


@pytest.mark.parametrize("name", list(work()))
def test_existing_cache_keys_stay_valid(fixed_builds, name):
    task, params = work()[name]
    assert task_key(task, **params) == PINNED[name]


def test_the_workbench_statistics_key_stays_valid(monkeypatch, tiny_workspace):
    """The statistics' store key of the tiny model (its weights pinned first: a transformers or torch
    change to the tiny model's initialisation is not a key change)."""
    from selfprune.engine.models import load_model
    from selfprune.engine.settings import Calibration
    from selfprune.engine.workbench import Workbench

    monkeypatch.chdir(tiny_workspace)
    bench = Workbench(load_model("model", "cpu", "float32"), Calibration(**CALIBRATION))
    assert bench.lm.fingerprint == PINNED["tiny model"]
    assert bench.stats_key == PINNED["stats_key"]


def search_config(ws, **values):
    from selfprune.config import SearchConfig

    return SearchConfig(model=str(ws / "model"), data=str(ws / "corpus.txt"), samples=4, calib_seqlen=64, seqlen=64,
                        **values)


@pytest.mark.parametrize("device, dtype", [("cpu", "float32"), ("auto", "auto")])
def test_the_library_and_the_flow_name_the_same_statistics(tiny_workspace, device, dtype):
    """The statistics the library's workbench keys by the model it loaded are the ones the flow's
    ``capture_statistics`` returns, and the ones its cache key names before any model loads (the
    requested precision, resolved): no drift where the workbench loads the model itself."""
    from selfprune.engine import identity
    from selfprune.engine.models import load_model, model_fingerprint
    from selfprune.engine.workbench import Workbench
    from selfprune.evolve import pipeline
    from selfprune.model.devices import precision
    from selfprune.tasks.pruning import capture_statistics

    config = search_config(tiny_workspace, device=device, dtype=dtype)
    library = Workbench(load_model(config.model, device, dtype), pipeline.calibration(config))  # selfprune.search's
    calibration, spec = pipeline.calibration(config), pipeline.model_spec(config, model_fingerprint(config.model))  # prepare's
    flow = capture_statistics.fn(spec, calibration)["stats_key"]
    requested = precision(device, dtype)
    assert library.stats_key == flow == identity.statistics(spec.fingerprint, calibration, requested)
    assert identity.calibration_task(spec, calibration)["precision"] == library.calibrated.precision == requested


@pytest.mark.parametrize("sparse", [False, True])
def test_the_library_and_the_flow_name_the_same_candidates(tiny_workspace, sparse):
    """Two rate vectors are one candidate to the library's search (``canonical``: the effective
    structure, or a metric's sparsities at 5 decimals) exactly where ``score_candidate``'s key makes
    them one; and the library report's row of an allocation is the search's candidate of its rates
    (so the report's perplexity of a baseline is the search's, from the cache)."""
    from selfprune.engine import identity
    from selfprune.engine.candidate import from_json
    from selfprune.engine.models import load_arch
    from selfprune.engine.shared import shared_workbench
    from selfprune.evaluate import report
    from selfprune.evolve import pipeline, runner

    config = search_config(tiny_workspace, device="cpu", dtype="float32",
                           **({"metric": "wanda", "pattern": "unstructured"} if sparse else {}))
    arch = load_arch(config.model)
    ctx, _, _ = runner.search_objects(config, arch)
    space = runner.RateSpace(config, arch)

    def task_key(candidate) -> dict:  # as flows/evolution.batch_scorer submits it
        return identity.candidate_task(pipeline.model_spec(config, MODEL_FP), STATS_KEY, candidate,
                                       pipeline.scoring(config, "test", 4), pipeline.calibration(config))

    same, near, other = [0.5] * 4, [0.5 + 1e-7, 0.5 - 1e-7, 0.5, 0.5], [0.3, 0.7, 0.5, 0.5]
    assert ctx.canonical(same) == ctx.canonical(near) and ctx.canonical(same) != ctx.canonical(other)
    for a, b in [(same, near), (same, other), (near, other)]:
        assert (ctx.canonical(a) == ctx.canonical(b)) == (task_key(space.candidate(a)) == task_key(space.candidate(b)))
    if not sparse:
        bench = shared_workbench(config.model, pipeline.calibration(config), config.device, config.dtype, config.method)
        row = report.allocation_entry(bench, "uniform", config.ratio)
        assert task_key(from_json(row["candidate"])) == task_key(space.candidate(row["rates"]))


def test_a_structured_candidates_reconstruction_decides_its_zero_shot_key(fixed_builds):
    """The zero-shot task scores the candidate it is given, so a structure refitted by ``lsq`` and the
    same structure without a refit are two keys; without one the key is the pinned one."""
    from dataclasses import replace

    from selfprune.tasks.evaluation import evaluate_zero_shot

    task, params = work()["evaluate_zero_shot"]
    refitted = params | {"candidate": replace(params["candidate"], reconstruct="lsq")}
    assert task_key(task, **params) == PINNED["evaluate_zero_shot"] != task_key(evaluate_zero_shot, **refitted)


def test_the_dense_model_has_one_form_in_every_key(fixed_builds):
    """``Dense()`` is the dense model everywhere: ``"dense"`` in its keys, which name no statistics
    (its numbers use none), so the library's report and the flow's score it under one key, and no
    sliced candidate (the structure that keeps every unit included) shares it."""
    from selfprune.engine import identity
    from selfprune.engine.candidate import Dense, Structured
    from selfprune.engine.settings import Calibration, ModelSpec, Scoring
    from selfprune.methods.structure import structure_from_json

    spec, cal, scoring = ModelSpec("model", MODEL_FP, "cpu", "float32", "wanda-sp"), Calibration(**CALIBRATION), Scoring(**SCORING)
    dense = identity.candidate_task(spec, STATS_KEY, Dense(), scoring, cal)
    assert dense["structure"] == identity.DENSE and dense["stats"] is None and dense["method"] is None
    assert dense == identity.candidate_task(spec, "another-statistics-key", Dense(), scoring, cal)
    full = Structured(structure_from_json([[2, 128]] * 4))
    assert identity.candidate_task(spec, STATS_KEY, full, scoring, cal)["structure"] == [[2, 128]] * 4
