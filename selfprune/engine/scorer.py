"""Perplexity of a model on a scoring split, its token windows cut once per process."""

from __future__ import annotations

import torch

from ..core.progress import Sink, silent
from ..data.corpora import split_windows
from ..model.ppl import Perplexity, perplexity
from .settings import Scoring


class Scorer:
    """Scores models on ``tokenizer``'s windows; each pass is one unit of ``progress`` (a
    generation's candidates, a report's rows: no line per candidate without one)."""

    def __init__(self, tokenizer, progress: Sink | None = None):
        self.tokenizer = tokenizer
        self.progress = progress or silent
        self._windows: dict[tuple, torch.Tensor] = {}

    def windows(self, scoring: Scoring) -> torch.Tensor:
        key = (scoring.data, scoring.split, scoring.seqlen, scoring.windows)
        if key not in self._windows:
            self._windows[key] = split_windows(self.tokenizer, scoring.data, scoring.split, scoring.seqlen, scoring.windows)
        return self._windows[key]

    def perplexity(self, model: torch.nn.Module, scoring: Scoring) -> Perplexity:
        windows = self.windows(scoring)
        return perplexity(model, windows, scoring.batch_size, self.progress(f"perplexity ({scoring.split})", len(windows)))
