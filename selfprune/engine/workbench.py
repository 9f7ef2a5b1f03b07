"""One loaded dense model with its calibration statistics and Wanda-sp rankings.

Everything a candidate needs is here, computed once per process: building a candidate is then
a slicing operation and scoring it one perplexity pass. The CLI, the Prefect tasks and the
benchmarks all go through this object, so "where does a candidate get pruned?" has one answer:
:meth:`Workbench.build`.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ..core.errors import CorruptFile, UserError
from ..core.progress import Sink, silent, step
from ..storage.store import ArtifactStore
from . import allocation, allocators, data, gradients, identity, reconstruct, slicing, sparsity, stats
from .allocation import Structure
from .candidate import Candidate, Dense, Sparse, Structured
from .checkpoint import LoadedModel
from .devices import model_precision
from .methods import get_method
from .metrics import Metric, resolve_metric
from .metrics.metric import NonFiniteScores
from .models import load_model
from .ppl import Perplexity, perplexity
from .settings import Calibration, Scoring, allocation_scoring
from .sparsity import parse_pattern

Progress = Sink  # (label, total) -> advance(n)


@dataclass(frozen=True)
class Invalid(Perplexity):
    """A metric's candidate that cannot be built on this model (its scores are not all finite): no
    perplexity (NaN, ranked last) and why, so a metric search counts it and goes on."""

    invalid: str = ""


class Workbench:
    def __init__(
        self, lm: LoadedModel, calibration: Calibration, progress: Progress | None = None, method: str = "wanda-sp"
    ):
        if getattr(lm.model.config, "selfprune_layers", None) is not None:
            raise UserError(f"{lm.source} is already a pruned export; prune its base model instead")
        self.method = get_method(method)
        self.lm = lm
        self.arch = lm.arch
        self.calibration = calibration
        # A caller's ``progress`` sees every pass. Without one, the passes over the calibration
        # windows (statistics, gradients, a reconstruction) go to the process's sink
        # (:mod:`selfprune.core.progress`), and a candidate's perplexity pass is one unit of its
        # caller's step (a generation's candidates, a report's rows): no line per candidate.
        self.progress = progress or silent
        self.calibration_progress = progress or step
        self.calibration_fingerprint = data.data_fingerprint(calibration.data, "calibration")
        self.precision = model_precision(lm.model)
        self.stats_key = identity.statistics(lm.fingerprint, calibration, self.precision)
        self._gradients: dict[str, torch.Tensor] | None = None
        self.stats = self._stats()
        with_g = {"gradients": self.gradients()} if self.method.needs_gradient else {}
        self.rankings = self.method.rank(lm.model, self.arch, self.stats, **with_g)
        self._windows: dict[tuple, torch.Tensor] = {}
        self._sparse_rates: dict[tuple, list[float]] = {}  # a pure function of its key on this model and calibration

    def calibration_windows(self) -> torch.Tensor:
        """The calibration token windows: what the statistics and reconstruction are taken on."""
        c = self.calibration
        return data.split_windows(self.lm.tokenizer, c.data, "calibration", c.seqlen, c.samples)

    @property
    def stats_path(self) -> Path:
        return ArtifactStore().tensor_path(self.stats_key)

    def _stats(self) -> dict[str, torch.Tensor]:
        """Load the stored statistics, or run the one calibration pass and store them."""
        c = self.calibration

        def compute() -> dict[str, torch.Tensor]:
            windows = self.calibration_windows()
            advance = self.calibration_progress("calibration", len(windows))
            return stats.capture(self.lm.model, windows, c.batch_size, advance)

        return self._stored(self.stats_key, stats.STATS_VERSION, compute,
                            lambda found, path: stats.check(found, self.arch.n_layers, path))

    def gradients(self) -> dict[str, torch.Tensor]:
        """G for every prunable linear (:mod:`selfprune.engine.gradients`): computed when a metric first
        reads it, then stored like the statistics."""
        if self._gradients is None:
            key = identity.gradients(self.lm.fingerprint, self.calibration, self.precision)

            def compute() -> dict[str, torch.Tensor]:
                windows = self.calibration_windows()[: gradients.WINDOWS]
                return gradients.capture(self.lm.model, windows, self.calibration_progress("gradients", len(windows)))

            def check(found: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
                if set(found) != {f"{i}.{p}" for i in range(self.arch.n_layers) for p in stats.LINEAR_INPUT}:
                    raise CorruptFile(path, "gradient statistics of another model or version")
                return found

            self._gradients = self._stored(key, gradients.GRADIENTS_VERSION, compute, check)
        return self._gradients

    def _stored(self, key: str, version: str, compute: Callable[[], dict[str, torch.Tensor]],
                check: Callable[[dict[str, torch.Tensor], Path], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The tensors stored under ``key``, or ``compute()`` them and store them.

        They are a pure function of their key, so a stored file that is corrupt or does not fit
        the model is not an error: it is set aside (renamed, kept for inspection) with a warning,
        and recomputed.
        """
        store = ArtifactStore()
        if store.has(key):
            try:
                return check(store.get_tensors(key), store.tensor_path(key))
            except CorruptFile as bad:
                aside = store.set_aside(key)
                kept = f"kept as {aside}" if aside else "already set aside by another process"
                warnings.warn(f"statistics file {bad.path} is corrupt ({bad.why}); {kept}; recomputing it", stacklevel=3)
        found = compute()
        meta = {"model": self.lm.fingerprint, "data": self.calibration_fingerprint, "version": version, **self.precision}
        store.put_tensors(key, found, meta | {k: str(v) for k, v in self.calibration.key_fields().items()})
        return found

    def structure(self, rates: list[float]) -> Structure:
        return allocation.rates_to_structure(self.arch, rates)

    def build(self, structure: Structure, reconstruct_: str = reconstruct.NONE) -> torch.nn.Module:
        """The pruned candidate, its consumers of removed units refitted with ``reconstruct_``
        ``lsq``; the dense model is never modified."""
        if reconstruct_ == reconstruct.NONE:
            return slicing.materialize(self.lm.model, self.arch, self.rankings, structure)
        reconstruct.check_reconstruction(reconstruct_, "structured")
        return reconstruct.structured_model(self.lm.model, self.arch, self.rankings, structure,
                                            self.calibration_windows(), self.calibration.batch_size,
                                            self.calibration_progress("reconstruction (layers)", self.arch.n_layers))

    def windows(self, scoring: Scoring) -> torch.Tensor:
        key = (scoring.data, scoring.split, scoring.seqlen, scoring.windows)
        if key not in self._windows:
            self._windows[key] = data.split_windows(
                self.lm.tokenizer, scoring.data, scoring.split, scoring.seqlen, scoring.windows
            )
        return self._windows[key]

    def model(self, candidate: Candidate) -> torch.nn.Module:
        """The model a candidate stands for: the dense model itself; a structure sliced from it
        (:meth:`build`); a metric's lowest-scoring single weights zeroed and the rest updated
        (:meth:`sparsify`). The dense model is never modified."""
        match candidate:
            case Dense():
                return self.lm.model
            case Structured(structure, how):
                return self.build(structure, how)
            case Sparse(metric, pattern, ratio, allocation_, rates, how):
                rates_ = list(rates) if rates is not None else allocation_
                return self.sparsify(resolve_metric(metric), rates_, ratio, parse_pattern(pattern), how)[1].model
        raise TypeError(f"not a candidate: {candidate!r}")

    def score(self, candidate: Candidate, scoring: Scoring, tolerate_invalid: bool = False) -> Perplexity:
        """Perplexity of the candidate (:meth:`model`) under ``scoring``. With ``tolerate_invalid``
        (a metric search), a metric whose scores are not finite on this model gives an
        :class:`Invalid` record instead of raising NonFiniteScores."""
        try:
            model = self.model(candidate)
        except NonFiniteScores as e:
            if not tolerate_invalid:
                raise
            return Invalid(math.nan, math.nan, 0, scoring.seqlen, len(self.windows(scoring)), str(e))
        return self._perplexity(model, scoring)

    def _perplexity(self, model: torch.nn.Module, scoring: Scoring) -> Perplexity:
        windows = self.windows(scoring)
        return perplexity(model, windows, scoring.batch_size, self.progress(f"perplexity ({scoring.split})", len(windows)))

    def fitness(self, build: Callable[[list[float]], torch.nn.Module]) -> allocators.Fitness:
        """Rates -> perplexity of the candidate ``build`` makes of them, on :func:`allocation_scoring`:
        what an allocation that tunes itself (ATP) compares its rate vectors by."""
        scoring = allocation_scoring(self.calibration)
        return lambda rates: self._perplexity(build(rates), scoring).ppl

    def allocate(self, allocation_spec: str | list[float], ratio: float,
                 layer_scores: allocators.LayerScores | None = None,
                 fitness: allocators.Fitness | None = None) -> list[float]:
        """Per-layer rates from a registered allocation (``uniform``, ``owl``, ``sdsa``, ``atp``,
        ``dlp``, ``alphapruning``, ...), a RATES.json path, or an explicit list; validated whatever
        their source. ``layer_scores``: the per-weight scores OWL, SDSA and DLP read outliers from
        (Wanda's when not given); ``fitness``: what ATP tunes on (the structured candidate's
        perplexity when not given). Each allocator gets those of them it takes."""
        if isinstance(allocation_spec, list):
            rates = allocation_spec
        else:
            allocate = allocators.allocator(allocation_spec)
            structured = self.fitness(lambda rates: self.build(self.structure(rates)))
            offered = {"layer_scores": layer_scores, "fitness": fitness or structured}
            rates = allocate(self.lm.model, self.arch, self.stats, ratio, **allocators.optional_inputs(allocate, offered))
        return allocation.check_rates(rates, self.arch.n_layers, ratio)

    def metric_scores(self, metric: Metric) -> Callable[[int], dict[str, torch.Tensor]]:
        """Layer index -> the metric's scores of each of its linears' weights."""
        grads = self.gradients() if metric.needs_gradient else None
        return sparsity.layer_scores(self.lm.model, self.stats, metric, grads)

    def sparse_rates(self, metric: Metric, allocation_spec: str | list[float], ratio: float,
                     pattern: sparsity.Pattern) -> list[float]:
        """Per-layer sparsities of a metric's candidate: outliers read from the metric's own scores,
        and ATP tuned on the perplexity of the metric's sparse candidates in ``pattern``."""
        if isinstance(allocation_spec, list):  # a search's sparsities: checked, nothing to read or tune
            return self.allocate(allocation_spec, ratio)
        key = (metric.key, allocation_spec, ratio, pattern.text)
        if key not in self._sparse_rates:  # ATP's tuning costs a perplexity pass per grid point: once per process
            scores = self.metric_scores(metric)  # per layer, recomputed when read again: one layer's scores in memory at a time
            sparse = self.fitness(lambda rates: sparsity.sparsify(self.lm.model, self.arch, scores, rates, pattern).model)
            self._sparse_rates[key] = self.allocate(allocation_spec, ratio, lambda i: list(scores(i).values()), sparse)
        return list(self._sparse_rates[key])

    def sparsify(self, metric: Metric, allocation_spec: str | list[float], ratio: float, pattern: sparsity.Pattern,
                 reconstruct_: str = reconstruct.NONE) -> tuple[list[float], sparsity.Sparsified]:
        """Allocate per-layer sparsities (:meth:`sparse_rates`) and zero the lowest-scoring weights:
        the unstructured or N:M candidate; with ``reconstruct_`` the kept weights are updated
        (``sparsegpt``), or SparseGPT also chooses the mask (``sparsegpt-adaptive``). An allocation
        reads outliers from, and ATP tunes on, the metric's masks without reconstruction. The
        dense model is never modified."""
        rates = self.sparse_rates(metric, allocation_spec, ratio, pattern)
        scores = self.metric_scores(metric)
        if reconstruct_ == reconstruct.NONE:
            return rates, sparsity.sparsify(self.lm.model, self.arch, scores, rates, pattern)
        reconstruct.check_reconstruction(reconstruct_, "sparse")
        return rates, reconstruct.sparse_model(
            self.lm.model, self.arch, self.calibration_windows(), None if reconstruct_ == reconstruct.ADAPTIVE else scores,
            rates, pattern, self.calibration.batch_size,
            self.calibration_progress("reconstruction (layers)", self.arch.n_layers))

    def provenance(self) -> dict:
        """What every export record holds of its origin: the base model, calibration, statistics, precision."""
        return {
            "base_model": {"source": self.lm.source, "fingerprint": self.lm.fingerprint, "arch": self.arch.to_dict()},
            "calibration": self.calibration.key_fields() | {"fingerprint": self.calibration_fingerprint},
            "stats_key": self.stats_key,
            "precision": self.precision,
        }

    def metric_record(self, metric: Metric, pattern: sparsity.Pattern, rates: list[float],
                      result: sparsity.Sparsified, allocation_spec: str | list[float],
                      reconstruct_: str = reconstruct.NONE) -> dict:
        """Provenance of an unstructured or N:M model for ``selfprune.json``."""
        return {
            "method": f"metric/{allocators.label(allocation_spec)}",
            "metric": {"text": metric.text, "key": metric.key},
            **reconstruct.identity(reconstruct_),
            "pattern": pattern.text,
            "rates": rates,
            "layer_sparsity": result.layer_sparsity,
            "realized_sparsity": result.realized,
            **self.provenance(),
        }

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
            **self.provenance(),
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
