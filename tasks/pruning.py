"""Prefect tasks around the pruning engine: statistics capture and candidate scoring.

Both run against the process-wide :func:`selfprune.workbench.shared_workbench`, so a worker loads
the model once however many candidates it scores. Their inputs are small JSON values (model spec,
fingerprints, settings, the candidate's structure); tensors stay in the statistics store and
never reach Prefect's key hashing or result serializer.
"""

from __future__ import annotations

import json
import os

from selfprune.allocation import structure_from_json
from selfprune.data import data_fingerprint
from selfprune.devices import precision
from selfprune.fileio import append_line
from selfprune.methods import method_identity
from selfprune.stats import STATS_VERSION
from selfprune.workbench import Calibration, Scoring, shared_workbench
from selfprune.tasks.caching import cached_task


def _calibration_key(model_fp: str, calibration: dict, device: str, dtype: str, **_) -> dict:
    return {"model": model_fp, "data": data_fingerprint(calibration["data"], "calibration"),
            "settings": Calibration(**calibration).key_fields(), "stats": STATS_VERSION,
            "precision": precision(device, dtype)}


@cached_task(key_fn=_calibration_key, version="2", task_run_name="capture-statistics")
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


def _candidate_key(model_fp: str, stats_key: str, structure: list, scoring: dict, device: str, dtype: str,
                   method: str, **_) -> dict:
    """A candidate is its effective structure: rate vectors that round alike share this key."""
    s = Scoring(**scoring)
    return {"model": model_fp, "stats": stats_key, "method": method_identity(method), "structure": structure,
            "precision": precision(device, dtype), "scoring": s.key_fields() | {"data": data_fingerprint(s.data, s.split)}}


@cached_task(key_fn=_candidate_key, version="3", task_run_name="score-candidate")
def score_candidate(
    model: str, model_fp: str, stats_key: str, structure: list, scoring: dict, calibration: dict,
    device: str = "auto", dtype: str = "auto", ledger: str | None = None, method: str = "wanda-sp",
) -> dict:
    """Build the candidate by slicing the loaded dense model and measure its perplexity.

    Every real (uncached) evaluation is appended to ``ledger`` (JSON lines), the run's audit of
    what was computed, and of what a resumed run did not compute again.
    """
    bench = workbench(model, stats_key, calibration, device, dtype, method)
    result = bench.score(structure_from_json(structure), Scoring(**scoring)).to_dict()
    if ledger:
        append_line(ledger, json.dumps({"structure": structure, "split": scoring["split"], **result, "pid": os.getpid()}))
    return result
