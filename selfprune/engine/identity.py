"""What decides a cache key: the identity of every stored tensor and cached task result, built here only.

(Memos of derived inputs key themselves beside their code: token ids in ``data/corpora.py``, the offline
cloze task's files in ``evaluate/report.py``.) Two kinds, one rule each:

* The artifact store's keys (:func:`statistics`, :func:`gradients`) are content hashes the
  :class:`~selfprune.engine.calibrated.Calibrated` computes from the model it loaded, so they name the
  *loaded* model's precision.
* A Prefect task's key payload (the ``*_task`` functions and :func:`oracle_call`) is what
  ``tasks/caching.py`` hashes, with the task's namespace and its own ``version=``, into
  ``<namespace>-<hash>``. Each takes the task's parameters as keywords (``**_`` for those that do
  not decide it), so it is the task's ``key_fn`` itself. It is computed before any model loads, so
  it names the *requested* precision, resolved (:func:`selfprune.model.devices.precision`): the same as
  the loaded model's wherever the workbench loads the model itself (``tests/test_identity.py``).

Every output is byte-for-byte what the code before this module gave (tests/test_identity.py pins a
few keys): changing what one returns changes users' keys, so it goes with a version bump (the
statistics' or the gradients' version, or the task's ``version=``). No tensor or model ever
reaches a key (``selfprune.storage.hashing`` refuses them).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

from .. import allocators
from ..data.corpora import data_fingerprint
from ..methods.registry import method_identity
from ..metrics import LANGUAGE_VERSION
from ..model import devices
from ..model.stats import STATS_VERSION
from ..reconstruct import identity as reconstruction
from ..storage.hashing import content_hash
from .candidate import Candidate, Dense, Sparse, Structured
from .gradients import GRADIENTS_VERSION, WINDOWS
from .settings import Calibration, ModelSpec, Scoring, allocation_scoring

DENSE = "dense"  # a key's structure of the dense model (its JSON, None, is a record's)


def statistics(model_fp: str, calibration: Calibration, precision: dict[str, str]) -> str:
    """The statistics' store key: the weights, the calibration text and settings, the statistics'
    version and the precision of the model they are taken on."""
    return content_hash("stats", STATS_VERSION, model_fp, data_fingerprint(calibration.data, "calibration"),
                        calibration.key_fields(), precision)


def gradients(model_fp: str, calibration: Calibration, precision: dict[str, str]) -> str:
    """The gradient statistic's store key: as :func:`statistics`, with its own version and window count."""
    return content_hash("gradients", GRADIENTS_VERSION, model_fp, data_fingerprint(calibration.data, "calibration"),
                        calibration.key_fields(), WINDOWS, precision)


def calibration_task(spec: ModelSpec, calibration: Calibration, **_) -> dict:
    """``capture_statistics``: what decides :func:`statistics`, with the requested precision."""
    return {"model": spec.fingerprint, "data": data_fingerprint(calibration.data, "calibration"),
            "settings": calibration.key_fields(), "stats": STATS_VERSION, "precision": devices.precision(spec.device, spec.dtype)}


def candidate_identity(c: Candidate, method: str) -> dict:
    """What makes a candidate: its effective structure and the pruning method that ranked its units
    (rate vectors that round alike are one candidate), or a metric's sparse model (the metric's
    canonical text, pattern and rates) with the versions of the metric language and of the gradient
    statistic it may read; the dense model is ``"dense"`` in every key."""
    match c:
        case Sparse():
            return {"structure": c.to_json(), "metric_language": LANGUAGE_VERSION, "gradients": GRADIENTS_VERSION}
        case Structured():
            return {"structure": c.to_json(), "method": method_identity(method)}
    return {"structure": DENSE, "method": None}


def tuning(allocation_spec: str, calibration: Calibration) -> dict:
    """What else decides the rates of an allocation that tunes itself (:func:`allocators.tunes`):
    the fitness windows, with their text's fingerprint (the statistics' key names only the
    calibration split's). Empty for every other allocation, so their cache keys stay as they were."""
    if not allocators.tunes(allocation_spec):
        return {}
    scoring = allocation_scoring(calibration)
    return {"allocation_fitness": scoring.key_fields() | {"data": data_fingerprint(scoring.data, scoring.split)}}


def refit(c: Candidate) -> dict:
    """A structured candidate's reconstruction beside its structure (a sparse one's is in its JSON)."""
    return reconstruction(c.reconstruct) if isinstance(c, Structured) else {}


def candidate_task(spec: ModelSpec, stats_key: str, candidate: Candidate, scoring: Scoring, calibration: Calibration,
                   **_) -> dict:
    """``score_candidate``: the model, statistics, candidate (and an ATP candidate's tuning windows),
    reconstruction, numerics and the scoring split's text and settings."""
    c, s = candidate, scoring
    # a metric's candidate whose allocation tunes itself (ATP) also depends on the windows it tuned on
    tuned = tuning(c.allocation, calibration) if isinstance(c, Sparse) and c.allocation else {}
    stats = None if isinstance(c, Dense) else stats_key  # the dense model's numbers use no statistics
    return {"model": spec.fingerprint, "stats": stats, **candidate_identity(c, spec.method), **tuned, **refit(c),
            "precision": devices.numerics(spec.device, spec.dtype),
            "scoring": s.key_fields() | {"data": data_fingerprint(s.data, s.split)}}


def allocation_task(spec: ModelSpec, stats_key: str, allocation: str, ratio: float, calibration: Calibration,
                    metric: str | None = None, pattern: str | None = None, **_) -> dict:
    """``allocation_rates``: the statistics, allocation and ratio; a metric's, its text, pattern and
    numerics; ATP's, its tuning windows and what builds the candidates it measures."""
    numerics = devices.numerics(spec.device, spec.dtype)
    by_metric = {"metric": metric, "pattern": pattern, "metric_language": LANGUAGE_VERSION,
                 "gradients": GRADIENTS_VERSION, "precision": numerics} if metric else {}
    tuned = tuning(allocation, calibration)  # ATP: its fitness windows, and what builds its candidates
    if tuned and not metric:
        tuned |= {"method": method_identity(spec.method), "precision": numerics}
    return {"model": spec.fingerprint, "stats": stats_key, "allocation": allocation, "ratio": ratio, **by_metric, **tuned}


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


def zero_shot_task(spec: ModelSpec, stats_key: str, candidate: Candidate, tasks: list[str], include_path: str | None,
                   limit: int | None, max_length: int, batch_size: int, **_) -> dict:
    """``evaluate_zero_shot``: the model and numerics, the candidate (or the dense model) with its
    reconstruction, the tasks and their files, lm-eval's version and the evaluation's limits."""
    stats = None if isinstance(candidate, Dense) else stats_key
    return {"model": spec.fingerprint, "precision": devices.numerics(spec.device, spec.dtype), "stats": stats,
            **candidate_identity(candidate, spec.method), **refit(candidate), "tasks": list(tasks),
            "task_files": task_files_fingerprint(include_path), "lm_eval": importlib.metadata.version("lm_eval"),
            "limit": limit, "max_length": max_length, "batch_size": batch_size}


def oracle_call(request: dict, **_) -> dict:
    """``oracle_call``: the exact request (backend, public base URL, model, messages, temperature,
    seed, attempt; never the API key)."""
    return request
