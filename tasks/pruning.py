"""Prefect tasks around the pruning engine: statistics capture and candidate scoring.

Both run against the process-wide :func:`selfprune.engine.shared.shared_workbench`, so a worker loads
the model once however many candidates it scores. Their inputs are small typed values (the
:class:`~selfprune.engine.settings.ModelSpec`, the statistics key, the settings, the candidate),
from which :mod:`selfprune.engine.identity` builds their keys; tensors stay in the statistics store
and never reach Prefect's key hashing or result serializer.
"""

from __future__ import annotations

import json
import os

from selfprune.engine import identity
from selfprune.engine.candidate import Candidate
from selfprune.engine.settings import Calibration, ModelSpec, Scoring
from selfprune.engine.shared import shared_workbench
from selfprune.engine.workbench import Workbench
from selfprune.storage.fileio import append_line
from selfprune.tasks.caching import cached_task


@cached_task(key_fn=identity.calibration_task, version="2", task_run_name="capture-statistics")
def capture_statistics(spec: ModelSpec, calibration: Calibration) -> dict:
    """One calibration pass (or the stored statistics): returns the statistics key and shapes."""
    bench = shared_workbench(spec.model, calibration, spec.device, spec.dtype)
    return {"stats_key": bench.stats_key, "arch": bench.arch.to_dict()}


def workbench(spec: ModelSpec, stats_key: str, calibration: Calibration) -> Workbench:
    """The process's shared workbench, checked against the statistics the flow started with."""
    bench = shared_workbench(spec.model, calibration, spec.device, spec.dtype, spec.method)
    if bench.stats_key != stats_key:
        raise RuntimeError(f"statistics {bench.stats_key} differ from the flow's {stats_key}; the model or data changed mid-run")
    return bench


@cached_task(key_fn=identity.candidate_task, version="3", task_run_name="score-candidate")
def score_candidate(spec: ModelSpec, stats_key: str, candidate: Candidate, scoring: Scoring, calibration: Calibration,
                    ledger: str | None = None, tolerate_invalid: bool = False) -> dict:
    """Build the candidate (:meth:`selfprune.engine.pruner.Pruner.model`: slice the loaded dense
    model, or zero a metric's lowest-scoring weights; refitted by its reconstruction) and measure
    its perplexity. ``tolerate_invalid`` (a metric search): a metric not finite on this model gives
    a record with NaN perplexity and ``invalid`` (the reason) instead of failing.

    Every real (uncached) evaluation is appended to ``ledger`` (JSON lines), the run's audit of
    what was computed, where (process, visible GPUs), and of what a resumed run did not compute again.
    """
    result = workbench(spec, stats_key, calibration).score(candidate, scoring, tolerate_invalid).to_dict()
    if ledger:
        append_line(ledger, json.dumps({"structure": candidate.to_json(), "split": scoring.split, **result, "pid": os.getpid(),
                                        "visible_gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}))
    return result
