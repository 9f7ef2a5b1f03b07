"""Pruning metrics as a small safe expression language: a score per weight from W and activation
statistics, checked against an allow-list (never executed), canonicalised to a key, and evaluated
with numeric guards. No Prefect here: the search and flows build on it."""

# Bump when what a metric text computes changes (a guard, a function's meaning): it is part of
# every cache key of a metric's candidates.
LANGUAGE_VERSION = "metrics-1"

from .builtin import METRICS, resolve_metric  # noqa: E402
from .language import INPUTS, MetricError  # noqa: E402
from .metric import Metric, parse_metric  # noqa: E402

__all__ = ["INPUTS", "LANGUAGE_VERSION", "METRICS", "Metric", "MetricError", "parse_metric", "resolve_metric"]
