"""Prefect tasks for the comparison report: allocations, perplexity and zero-shot accuracy.

Like ``tasks/pruning.py`` they run against the process-wide
:func:`selfprune.engine.shared.shared_workbench` (one dense model per process; a candidate is
``bench.pruner.model(candidate)``), take small typed values and return plain JSON, so a report over
many models and ratios recomputes nothing it already has.

* Perplexity is :func:`selfprune.tasks.pruning.score_candidate` itself (re-exported here as
  :data:`evaluate_ppl`): the report shares its cache with the search, so the search's final
  test-split scores are hits. The dense model is ``Dense()`` here as everywhere (``"dense"`` in
  its keys, which name no statistics).
* :func:`evaluate_zero_shot` runs lm-eval on the in-memory candidate; its key holds the task names,
  a path-independent fingerprint of the local task files, lm-eval's version, limit, max length and
  batch size.
* :func:`allocation_rates` gives the rates of a named allocation at a ratio (OWL needs the statistics;
  ATP the perplexity of candidates on the fitness split, which its key then names).

The work itself is the library's (:mod:`selfprune.evaluate.report`); these add the caching.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from selfprune.engine import identity
from selfprune.engine.candidate import Candidate
from selfprune.engine.settings import Calibration, ModelSpec
from selfprune.evaluate import report
from selfprune.tasks.caching import cached_task
from selfprune.tasks.pruning import score_candidate, workbench

evaluate_ppl = score_candidate  # one perplexity task for the search and the report (shared cache)


@cached_task(key_fn=identity.allocation_task, version="5", task_run_name="allocate-{allocation}-{ratio}")
def allocation_rates(spec: ModelSpec, stats_key: str, allocation: str, ratio: float, calibration: Calibration,
                     metric: str | None = None, pattern: str | None = None) -> dict:
    """Per-layer rates of ``allocation`` (``uniform``, ``owl``, ``sdsa``, ``atp``, ``dlp``,
    ``alphapruning``, ...) at ``ratio`` and the candidate they give: a structure (the statistics
    decide it; the pruning method only for ATP, which measures ``method``'s candidates), or with
    ``metric`` a sparse candidate whose OWL/SDSA/DLP rates the metric's scores decide (and ATP's its
    sparse candidates' perplexity)."""
    return report.allocation_entry(workbench(spec, stats_key, calibration), allocation, ratio, metric, pattern)


@task(task_run_name="llamacpp-speed", cache_policy=NO_CACHE)
def llamacpp_speed(spec: ModelSpec, stats_key: str, candidate: Candidate, calibration: Calibration, quant: str) -> dict:
    """The candidate's decode speed in llama.cpp as GGUF at ``quant`` (:func:`report.llamacpp_speed`):
    a measurement of this machine, never cached."""
    return report.llamacpp_speed(workbench(spec, stats_key, calibration), candidate, quant)


@cached_task(key_fn=identity.zero_shot_task, version="3", task_run_name="zero-shot")
def evaluate_zero_shot(spec: ModelSpec, stats_key: str, candidate: Candidate, tasks: list[str], calibration: Calibration,
                       include_path: str | None = None, limit: int | None = None, max_length: int = 2048,
                       batch_size: int = 8) -> dict:
    """lm-eval accuracy of ``candidate`` (a structure, a metric's sparse model, or the dense model) on
    ``tasks`` (see :func:`selfprune.evaluate.zeroshot.evaluate_zero_shot` for the returned record)."""
    bench = workbench(spec, stats_key, calibration)
    return report.zero_shot(bench, candidate, tasks, include_path, limit, max_length, batch_size)
