"""The built-in metrics, written in the metric language like any proposed one."""

from __future__ import annotations

from ..core.registry import Registry
from ..storage.userfiles import read_json
from .language import MetricError
from .metric import Metric, parse_metric

METRICS: Registry[Metric] = Registry("metric")
for _name, _text in {
    "magnitude": "abs(W)",
    "wanda": "abs(W) * X_rms",  # Wanda: |W| times the input's L2 norm (RMS is that norm / sqrt(n): same ranking)
    "ria": "(abs(W) / rowsum(abs(W)) + abs(W) / colsum(abs(W))) * X_rms ** 0.5",  # RIA with a = 0.5
    "pruner-zero": "W ** 2 * minmax(G)",  # Pruner-Zero's published best; needs a gradient statistic
}.items():
    METRICS.register(_name, parse_metric(_text))


def resolve_metric(name_or_text: str) -> Metric:
    """A registered metric by name, a ``*.json`` file holding ``{"metric": TEXT}`` (an AutoPrune
    search's best.json), else the metric that ``name_or_text`` spells."""
    if name_or_text in METRICS:
        return METRICS.get(name_or_text)
    if name_or_text.endswith(".json"):
        found = read_json(name_or_text, "metric file", "an AutoPrune search's best.json (selfprune autoprune --out DIR)")
        if not isinstance(found, dict) or not isinstance(found.get("metric"), str):
            raise MetricError(f"{name_or_text} holds no \"metric\" text; give an AutoPrune search's best.json")
        return parse_metric(found["metric"])
    try:
        return parse_metric(name_or_text)
    except MetricError as e:
        shown = name_or_text if len(name_or_text) <= 80 else name_or_text[:77] + "..."
        raise MetricError(f"metric {shown!r} is neither a registered metric ({', '.join(METRICS.names())}) "
                          f"nor a valid expression: {e}") from None
