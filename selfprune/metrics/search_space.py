"""What a metric-search oracle works with: the problem (:class:`MetricContext`) and the lineage of
every metric proposed (:class:`Lineage`), which the GCoT prompt draws as a graph and ``best.json``
records. A candidate is a metric text; its identity is its canonical text, so two spellings of one
metric are one candidate and are never evaluated twice.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from functools import lru_cache

from .metric import parse_metric

ScoredMetric = tuple[str, float]  # (metric text, fitness: perplexity, lower is better)


@lru_cache(maxsize=4096)
def canonical_text(text: str) -> str:
    """The canonical text of a metric (raises MetricError for a text that is not one)."""
    return parse_metric(text).text


@dataclass(frozen=True)
class MetricContext:
    """The metric search's problem: which model (named in prompts), the sparsity and pattern a
    metric is judged at, whether the gradient statistic G may be used, and the seed."""

    model_name: str
    sparsity: float
    pattern: str = "unstructured"
    allocation: str = "uniform"
    seed: int = 0
    gradient: bool = True
    dataset: str = "the calibration corpus"

    def canonical(self, text: str) -> Hashable:
        return canonical_text(text)


@dataclass(frozen=True)
class Origin:
    """Where a metric came from: its parents (canonical texts; none for a seed), the edit that made
    it (:func:`selfprune.metrics.edits.describe_edit`), the generation and the source."""

    text: str
    parents: tuple[str, ...]
    edit: str
    generation: int
    source: str  # "built-in" | "random" | "gp" | "llm"


@dataclass
class Lineage:
    """Every metric proposed so far, by canonical text; the first origin recorded wins."""

    nodes: dict[str, Origin] = field(default_factory=dict)

    def add(self, text: str, parents: tuple[str, ...], edit: str, generation: int, source: str) -> None:
        key = canonical_text(text)
        if key not in self.nodes:
            self.nodes[key] = Origin(key, tuple(canonical_text(p) for p in parents), edit, generation, source)

    def chain(self, text: str) -> list[Origin]:
        """``text``'s ancestry, oldest first, following first parents (the path to a seed)."""
        out, key = [], canonical_text(text)
        while key in self.nodes and self.nodes[key] not in out:
            out.append(self.nodes[key])
            key = self.nodes[key].parents[0] if self.nodes[key].parents else ""
        return out[::-1]
