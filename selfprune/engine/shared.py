"""The process-wide dense model and workbenches: a worker loads each model once, however many tasks it runs.

Tasks may run in threads, so loading and building are each under a lock.
"""

from __future__ import annotations

import threading
from functools import lru_cache

from ..model.checkpoint import LoadedModel
from .models import load_model
from .settings import Calibration
from .workbench import Workbench

_LOADING = threading.Lock()
_BUILDING = threading.Lock()


@lru_cache(maxsize=2)
def _shared_model(model: str, device: str, dtype: str) -> LoadedModel:
    return load_model(model, device, dtype)


def shared_model(model: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """The process-wide dense model: loaded once per worker process, reused by every task."""
    with _LOADING:
        return _shared_model(model, device, dtype)


@lru_cache(maxsize=4)
def _shared_workbench(model: str, calibration: Calibration, device: str, dtype: str, method: str) -> Workbench:
    return Workbench(shared_model(model, device, dtype), calibration, method=method)


def shared_workbench(model: str, calibration: Calibration, device: str = "auto", dtype: str = "auto",
                     method: str = "wanda-sp") -> Workbench:
    """The process-wide workbench of a model, calibration and method, on the one shared dense model."""
    with _BUILDING:
        return _shared_workbench(model, calibration, device, dtype, method)
