"""Prefect tasks for the comparison report: allocations, perplexity and zero-shot accuracy.

Like ``tasks/pruning.py`` they run against the process-wide
:func:`selfprune.workbench.shared_workbench` (one dense model per process; a candidate is
``bench.build(structure)``), take small JSON inputs and return plain JSON, so a report over many
models and ratios recomputes nothing it already has.

* Perplexity is :func:`selfprune.tasks.pruning.score_candidate` itself (re-exported here as
  :data:`evaluate_ppl`): the report shares its cache with the search, so the search's final
  test-split scores are hits. The dense model is the structure that keeps every unit
  (:func:`selfprune.allocation.dense_structure`): slicing leaves every layer of it untouched, so it
  *is* the dense model.
* :func:`evaluate_zero_shot` runs lm-eval on the in-memory candidate; its key holds the task names,
  a path-independent fingerprint of the local task files, lm-eval's version, limit, max length and
  batch size.
* :func:`allocation_rates` gives the rates of a named allocation at a ratio (OWL needs the statistics;
  ATP the perplexity of candidates on the fitness split, which its key then names).

The work itself is the library's (:mod:`selfprune.evaluate.report`); these add the caching.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from selfprune.devices import numerics
from selfprune.evaluate import report
from selfprune.gradients import GRADIENTS_VERSION
from selfprune.methods import method_identity
from selfprune.metrics import LANGUAGE_VERSION
from selfprune.tasks.caching import cached_task
from selfprune.tasks.pruning import candidate_identity, score_candidate, workbench
from selfprune.workbench import tuning_identity

evaluate_ppl = score_candidate  # one perplexity task for the search and the report (shared cache)

DENSE = "dense"


def _allocation_key(model_fp: str, stats_key: str, allocation: str, ratio: float, calibration: dict,
                    metric: str | None, pattern: str | None, device: str, dtype: str, method: str, **_) -> dict:
    by_metric = {"metric": metric, "pattern": pattern, "metric_language": LANGUAGE_VERSION,
                 "gradients": GRADIENTS_VERSION, "precision": numerics(device, dtype)} if metric else {}
    tuning = tuning_identity(allocation, calibration)  # ATP: its fitness windows, and what builds its candidates
    if tuning and not metric:
        tuning |= {"method": method_identity(method), "precision": numerics(device, dtype)}
    return {"model": model_fp, "stats": stats_key, "allocation": allocation, "ratio": ratio, **by_metric, **tuning}


@cached_task(key_fn=_allocation_key, version="5", task_run_name="allocate-{allocation}-{ratio}")
def allocation_rates(model: str, model_fp: str, stats_key: str, allocation: str, ratio: float, calibration: dict,
                     device: str = "auto", dtype: str = "auto", metric: str | None = None,
                     pattern: str | None = None, method: str = "wanda-sp") -> dict:
    """Per-layer rates of ``allocation`` (``uniform``, ``owl``, ``sdsa``, ``atp``, ``dlp``,
    ``alphapruning``, ...) at ``ratio`` and the candidate they give: a structure (the statistics
    decide it; the pruning method only for ATP, which measures ``method``'s candidates), or with
    ``metric`` a sparse candidate whose OWL/SDSA/DLP rates the metric's scores decide (and ATP's its
    sparse candidates' perplexity)."""
    bench = workbench(model, stats_key, calibration, device, dtype, method)
    return report.allocation_entry(bench, allocation, ratio, metric, pattern)


def task_files_fingerprint(include_path: str | None) -> str | None:
    """sha256 of the task files (``*.yaml``, ``*.yml``, ``*.jsonl``, ``*.json``, ``*.txt``) under
    ``include_path``, with the directory's own path replaced by a placeholder, so the same tasks
    built into two directories share results. ``None`` when there is no include path."""
    if not include_path:
        return None
    root = Path(include_path).expanduser().resolve()
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and ".hf_cache" not in p.parts
                    and p.suffix in (".yaml", ".yml", ".jsonl", ".json", ".txt")):
        h.update(str(f.relative_to(root)).encode() + b"\0")
        h.update(f.read_bytes().replace(str(root).encode(), b"<include>") + b"\0")
    return h.hexdigest()


def _zero_shot_key(model_fp: str, stats_key: str, structure: list | None, tasks: list[str], include_path: str | None,
                   limit: int | None, max_length: int, batch_size: int, device: str, dtype: str, method: str, **_) -> dict:
    from importlib.metadata import version

    pruned = structure is not None
    return {"model": model_fp, "precision": numerics(device, dtype), "stats": stats_key if pruned else None,
            **candidate_identity(structure, method) | {"structure": structure if pruned else DENSE}, "tasks": list(tasks),
            "task_files": task_files_fingerprint(include_path), "lm_eval": version("lm_eval"),
            "limit": limit, "max_length": max_length, "batch_size": batch_size}


@cached_task(key_fn=_zero_shot_key, version="3", task_run_name="zero-shot")
def evaluate_zero_shot(
    model: str, model_fp: str, stats_key: str, structure: list | dict | None, tasks: list[str], calibration: dict,
    include_path: str | None = None, limit: int | None = None, max_length: int = 2048, batch_size: int = 8,
    device: str = "auto", dtype: str = "auto", method: str = "wanda-sp",
) -> dict:
    """lm-eval accuracy of the candidate ``structure`` (a structure, a metric's sparse model, or
    ``None``: the dense model) on ``tasks``
    (see :func:`selfprune.evaluate.zeroshot.evaluate_zero_shot` for the returned record)."""
    bench = workbench(model, stats_key, calibration, device, dtype, method)
    return report.zero_shot(bench, structure, tasks, include_path, limit, max_length, batch_size)
