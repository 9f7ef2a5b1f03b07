"""Prefect tasks around the pruning engine: statistics capture and candidate scoring.

Both run against the process-wide :func:`selfprune.engine.shared.shared_workbench`, so a worker loads
the model once however many candidates it scores. Their inputs are small JSON values (model spec,
fingerprints, settings, the candidate's structure); tensors stay in the statistics store and
never reach Prefect's key hashing or result serializer.
"""

from __future__ import annotations

import json
import os

from selfprune.engine import identity
from selfprune.engine.candidate import from_params
from selfprune.engine.reconstruct import NONE
from selfprune.engine.settings import Calibration, Scoring
from selfprune.engine.shared import shared_workbench
from selfprune.storage.fileio import append_line
from selfprune.tasks.caching import cached_task


@cached_task(key_fn=identity.calibration_task, version="2", task_run_name="capture-statistics")
def capture_statistics(model: str, model_fp: str, calibration: dict, device: str = "auto", dtype: str = "auto") -> dict:
    """One calibration pass (or the stored statistics): returns the statistics key and shapes."""
    bench = shared_workbench(model, Calibration(**calibration), device, dtype)
    return {"stats_key": bench.stats_key, "arch": bench.arch.to_dict()}


def workbench(model: str, stats_key: str, calibration: dict, device: str, dtype: str, method: str = "wanda-sp"):
    """The process's shared workbench, checked against the statistics the flow started with."""
    bench = shared_workbench(model, Calibration(**calibration), device, dtype, method)
    if bench.stats_key != stats_key:
        raise RuntimeError(f"statistics {bench.stats_key} differ from the flow's {stats_key}; the model or data changed mid-run")
    return bench


@cached_task(key_fn=identity.candidate_task, version="3", task_run_name="score-candidate")
def score_candidate(
    model: str, model_fp: str, stats_key: str, structure: list | dict, scoring: dict, calibration: dict,
    device: str = "auto", dtype: str = "auto", ledger: str | None = None, method: str = "wanda-sp",
    reconstruct: str = NONE, tolerate_invalid: bool = False,
) -> dict:
    """Build the candidate (:meth:`Workbench.model` of :func:`selfprune.engine.candidate.from_params`:
    slice the loaded dense model, or zero a metric's lowest-scoring weights; a structure refitted by
    ``reconstruct``) and measure its perplexity.
    ``tolerate_invalid`` (a metric search): a metric not finite on this model gives a record with NaN
    perplexity and ``invalid`` (the reason) instead of failing.

    Every real (uncached) evaluation is appended to ``ledger`` (JSON lines), the run's audit of
    what was computed, where (process, visible GPUs), and of what a resumed run did not compute again.
    """
    bench = workbench(model, stats_key, calibration, device, dtype, method)
    result = bench.score(from_params(structure, reconstruct), Scoring(**scoring), tolerate_invalid).to_dict()
    if ledger:
        append_line(ledger, json.dumps({"structure": structure, "split": scoring["split"], **result, "pid": os.getpid(),
                                        "visible_gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}))
    return result
