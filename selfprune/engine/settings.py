"""What a run works on: the model (its spec), the calibration pass (the statistics) and a perplexity measurement.

Plain settings, kept apart from the workbench that uses them so that :mod:`selfprune.engine.identity`
can name them in cache keys without importing the engine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class ModelSpec:
    """Which dense model a task works on and how it is loaded and ranked: what every task and its
    cache key names it by (``fingerprint``: its weights' hash, computed once by the flow)."""

    model: str
    fingerprint: str
    device: str = "auto"
    dtype: str = "auto"
    method: str = "wanda-sp"


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


ALLOCATION_WINDOWS = 8  # fitness windows an allocation tunes on (ATP: one pass per grid point)


def allocation_scoring(calibration: Calibration) -> Scoring:
    """Where an allocation that tunes itself measures its candidates: the fitness split of the
    calibration data (never the test split), :data:`ALLOCATION_WINDOWS` windows of the calibration
    length. Decided by the calibration settings, so a cache key need only add the windows' text
    (:func:`selfprune.engine.identity.tuning`)."""
    return Scoring(calibration.data, "fitness", calibration.seqlen, ALLOCATION_WINDOWS, calibration.batch_size)

