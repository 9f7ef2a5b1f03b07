"""What a search or a report scores candidates with: a calibrated dense model, its pruner and a scorer.

Each part has one job: :class:`~selfprune.engine.calibrated.Calibrated` holds the model and its
stored statistics, :class:`~selfprune.engine.pruner.Pruner` builds a candidate (where a candidate
is pruned: ``Pruner.model``), :class:`~selfprune.engine.scorer.Scorer` measures perplexity. The
process-wide instances that tasks share live in :mod:`selfprune.engine.shared`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..core.progress import Sink
from ..metrics.metric import NonFiniteScores
from ..model.checkpoint import LoadedModel
from ..model.ppl import Perplexity
from .calibrated import Calibrated
from .candidate import Candidate
from .pruner import Pruner
from .scorer import Scorer
from .settings import Calibration, Scoring

Progress = Sink  # (label, total) -> advance(n)


@dataclass(frozen=True)
class Invalid(Perplexity):
    """A metric's candidate that cannot be built on this model (its scores are not all finite): no
    perplexity (NaN, ranked last) and why, so a metric search counts it and goes on."""

    invalid: str = ""


class Workbench:
    """``lm`` calibrated on ``calibration``, its units ranked by ``method``. A caller's ``progress``
    sees every pass; without one the calibration passes go to the process's sink and a candidate's
    perplexity pass is one unit of its caller's step."""

    def __init__(self, lm: LoadedModel, calibration: Calibration, progress: Progress | None = None, method: str = "wanda-sp"):
        self.calibrated = Calibrated(lm, calibration, progress)
        self.scorer = Scorer(lm.tokenizer, progress)
        self.pruner = Pruner(self.calibrated, method, self.scorer)
        self.lm, self.arch, self.stats_key = lm, lm.arch, self.calibrated.stats_key

    def score(self, candidate: Candidate, scoring: Scoring, tolerate_invalid: bool = False) -> Perplexity:
        """Perplexity of the candidate (:meth:`Pruner.model`) under ``scoring``. With ``tolerate_invalid``
        (a metric search), a metric whose scores are not finite on this model gives an
        :class:`Invalid` record instead of raising NonFiniteScores."""
        try:
            model = self.pruner.model(candidate)
        except NonFiniteScores as e:
            if not tolerate_invalid:
                raise
            return Invalid(math.nan, math.nan, 0, scoring.seqlen, len(self.scorer.windows(scoring)), str(e))
        return self.scorer.perplexity(model, scoring)
