"""One loaded dense model with its calibration statistics and Wanda-sp rankings.

Everything a candidate needs is here, computed once per process: building a candidate is then
a slicing operation and scoring it one perplexity pass. The CLI, the Prefect tasks and the
benchmarks all go through this object, so "where does a candidate get pruned?" has one answer:
:meth:`Workbench.build`.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from . import allocation, allocators, data, slicing, stats
from .allocation import Structure
from .checkpoint import LoadedModel
from .devices import model_precision
from .errors import CorruptFile, UserError
from .hashing import content_hash
from .methods import METHODS
from .models import load_model
from .ppl import Perplexity, perplexity
from .store import ArtifactStore

Progress = Callable[[str, int], Callable[[int], None]]  # (label, total) -> advance(n)


@dataclass(frozen=True)
class Calibration:
    """What decides the statistics. The batch size does not (fp32 sums, order-independent up to
    rounding), so it is left out of equality too: a second batch size reuses the loaded workbench."""

    data: str = "demo"
    samples: int = 128
    seqlen: int = 512
    batch_size: int = field(default=4, compare=False)

    def key_fields(self) -> dict:
        return {"data": self.data, "samples": self.samples, "seqlen": self.seqlen}


@dataclass(frozen=True)
class Scoring:
    """A perplexity measurement: which split, how many windows of how many tokens."""

    data: str = "demo"
    split: str = "fitness"
    seqlen: int = 512
    windows: int | None = 16
    batch_size: int = 4

    def key_fields(self) -> dict:
        return {"data": self.data, "split": self.split, "seqlen": self.seqlen, "windows": self.windows}

    def to_dict(self) -> dict:
        return asdict(self)


def _no_progress(label: str, total: int) -> Callable[[int], None]:
    return lambda n: None


class Workbench:
    def __init__(
        self, lm: LoadedModel, calibration: Calibration, progress: Progress = _no_progress, method: str = "wanda-sp"
    ):
        if getattr(lm.model.config, "selfprune_layers", None) is not None:
            raise UserError(f"{lm.source} is already a pruned export; prune its base model instead")
        self.method = METHODS.get(method)
        self.lm = lm
        self.arch = lm.arch
        self.calibration = calibration
        self.progress = progress
        self.calibration_fingerprint = data.data_fingerprint(calibration.data, "calibration")
        self.precision = model_precision(lm.model)
        self.stats_key = content_hash(
            "stats", stats.STATS_VERSION, lm.fingerprint, self.calibration_fingerprint, calibration.key_fields(),
            self.precision,
        )
        self.stats = self._stats()
        self.rankings = self.method.rank(lm.model, self.arch, self.stats)
        self._windows: dict[tuple, torch.Tensor] = {}

    @property
    def stats_path(self) -> Path:
        return ArtifactStore().tensor_path(self.stats_key)

    def _stats(self) -> dict[str, torch.Tensor]:
        """Load the stored statistics, or run the one calibration pass and store them.

        The statistics are a pure function of their key, so a stored file that is corrupt or does
        not fit the model is not an error: it is set aside (renamed, kept for inspection) with a
        warning, and recomputed.
        """
        store = ArtifactStore()
        if store.has(self.stats_key):
            try:
                return stats.check(store.get_tensors(self.stats_key), self.arch.n_layers, self.stats_path)
            except CorruptFile as bad:
                aside = store.set_aside(self.stats_key)
                kept = f"kept as {aside}" if aside else "already set aside by another process"
                warnings.warn(f"statistics file {bad.path} is corrupt ({bad.why}); {kept}; recomputing it", stacklevel=2)
        c = self.calibration
        windows = data.split_windows(self.lm.tokenizer, c.data, "calibration", c.seqlen, c.samples)
        captured = stats.capture(self.lm.model, windows, c.batch_size, self.progress("calibration", len(windows)))
        meta = {"model": self.lm.fingerprint, "data": self.calibration_fingerprint, "version": stats.STATS_VERSION,
                **self.precision}
        store.put_tensors(self.stats_key, captured, meta | {k: str(v) for k, v in c.key_fields().items()})
        return captured

    def structure(self, rates: list[float]) -> Structure:
        return allocation.rates_to_structure(self.arch, rates)

    def build(self, structure: Structure) -> torch.nn.Module:
        """The pruned candidate; the dense model is never modified."""
        return slicing.materialize(self.lm.model, self.arch, self.rankings, structure)

    def windows(self, scoring: Scoring) -> torch.Tensor:
        key = (scoring.data, scoring.split, scoring.seqlen, scoring.windows)
        if key not in self._windows:
            self._windows[key] = data.split_windows(
                self.lm.tokenizer, scoring.data, scoring.split, scoring.seqlen, scoring.windows
            )
        return self._windows[key]

    def score(self, structure: Structure | None, scoring: Scoring) -> Perplexity:
        """Perplexity of the candidate (``None``: the dense model) under ``scoring``."""
        model = self.lm.model if structure is None else self.build(structure)
        windows = self.windows(scoring)
        return perplexity(model, windows, scoring.batch_size, self.progress(f"perplexity ({scoring.split})", len(windows)))

    def allocate(self, allocation_spec: str | list[float], ratio: float) -> list[float]:
        """Per-layer rates from a registered allocation (``uniform``, ``owl``, ...), a RATES.json
        path, or an explicit list; validated whatever their source."""
        if isinstance(allocation_spec, list):
            rates = allocation_spec
        else:
            rates = allocators.allocator(allocation_spec)(self.lm.model, self.arch, self.stats, ratio)
        return allocation.check_rates(rates, self.arch.n_layers, ratio)

    def record(self, rates: list[float], structure: Structure, allocation_spec: str | list[float]) -> dict:
        """Provenance for ``selfprune.json``: enough to rebuild the model from its base.

        ``method`` reads ``METHOD/ALLOCATION`` (e.g. ``wanda-sp/owl``); ``method_version`` says
        which scoring of that method ranked the units.
        """
        units = slicing.kept_units(self.rankings, structure)
        return {
            "method": f"{self.method.name}/{allocators.label(allocation_spec)}",
            "method_version": self.method.version,
            "rates": rates,
            "structure": allocation.structure_to_json(structure),
            "kept_groups": [g.tolist() for g, _ in units],
            "kept_channels": [c.tolist() for _, c in units],
            "attention_unit": "kv_group",
            "realized_ratio": allocation.realized_ratio(self.arch, structure),
            "kept_params": allocation.kept_params(self.arch, structure),
            "base_model": {"source": self.lm.source, "fingerprint": self.lm.fingerprint, "arch": self.arch.to_dict()},
            "calibration": self.calibration.key_fields() | {"fingerprint": self.calibration_fingerprint},
            "stats_key": self.stats_key,
            "precision": self.precision,
        }


# Tasks may run in threads: each model is loaded, and each workbench built, once per process.
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
