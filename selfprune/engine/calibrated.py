"""One loaded dense model with the statistics of its calibration pass.

The statistics (and the gradient statistic G, when a metric reads it) are a pure function of the
model's weights, the calibration text and settings and the loaded precision: they are stored once
under that content hash (:func:`selfprune.engine.identity.statistics`), digest-checked when read,
and computed only when missing. Everything a candidate is built from starts here.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ..core.errors import CorruptFile, UserError
from ..core.progress import Sink, step
from ..data import corpora as data
from ..model import stats
from ..model.checkpoint import LoadedModel
from ..model.devices import model_precision
from ..reconstruct import LayerPass
from ..storage.store import ArtifactStore
from . import gradients, identity
from .settings import Calibration


class Calibrated:
    """The dense model ``lm`` and its statistics on ``calibration``; ``progress`` sees each pass
    over the calibration windows (statistics, gradients, a reconstruction), else the process's sink
    (:mod:`selfprune.core.progress`) does."""

    def __init__(self, lm: LoadedModel, calibration: Calibration, progress: Sink | None = None):
        if getattr(lm.model.config, "selfprune_layers", None) is not None:
            raise UserError(f"{lm.source} is already a pruned export; prune its base model instead")
        self.lm = lm
        self.arch = lm.arch
        self.calibration = calibration
        self.progress = progress or step
        self.fingerprint = data.data_fingerprint(calibration.data, "calibration")
        self.precision = model_precision(lm.model)
        self.stats_key = identity.statistics(lm.fingerprint, calibration, self.precision)
        self._gradients: dict[str, torch.Tensor] | None = None
        self.stats = self._stats()

    def windows(self) -> torch.Tensor:
        """The calibration token windows: what the statistics and reconstruction are taken on."""
        c = self.calibration
        return data.split_windows(self.lm.tokenizer, c.data, "calibration", c.seqlen, c.samples)

    def layer_pass(self) -> LayerPass:
        """What a reconstruction runs on: these windows, read only if it runs."""
        return LayerPass(self.windows, self.calibration.batch_size, self.progress)

    @property
    def stats_path(self) -> Path:
        return ArtifactStore().tensor_path(self.stats_key)

    def _stats(self) -> dict[str, torch.Tensor]:
        """Load the stored statistics, or run the one calibration pass and store them."""

        def compute() -> dict[str, torch.Tensor]:
            windows = self.windows()
            return stats.capture(self.lm.model, windows, self.calibration.batch_size, self.progress("calibration", len(windows)))

        return self._stored(self.stats_key, stats.STATS_VERSION, compute,
                            lambda found, path: stats.check(found, self.arch.n_layers, path))

    def gradients(self) -> dict[str, torch.Tensor]:
        """G for every prunable linear (:mod:`selfprune.engine.gradients`): computed when a metric first
        reads it, then stored like the statistics."""
        if self._gradients is None:
            key = identity.gradients(self.lm.fingerprint, self.calibration, self.precision)

            def compute() -> dict[str, torch.Tensor]:
                windows = self.windows()[: gradients.WINDOWS]
                return gradients.capture(self.lm.model, windows, self.progress("gradients", len(windows)))

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
        meta = {"model": self.lm.fingerprint, "data": self.fingerprint, "version": version, **self.precision}
        store.put_tensors(key, found, meta | {k: str(v) for k, v in self.calibration.key_fields().items()})
        return found
