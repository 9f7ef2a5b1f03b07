"""Pruning methods by name: how units are ranked from the dense model and its statistics.

A method is a small object with a ``name``, a ``version`` and ``rank(model, arch, stats)``. The
version stands for the scoring itself: change what a method's ranking returns and bump its
version, since it identifies the rankings (and everything built from them) in records and keys.
Adding a method is one definition and one ``METHODS.register`` line; ``Workbench(method=NAME)``,
``selfprune.prune(method=NAME)`` and ``selfprune prune`` then use it.

Any pruning metric is a method too: ``metric:EXPR`` (``metric:ria``, ``metric:abs(W) * X_rms``)
ranks each KV group and MLP channel by the sum of the metric's scores over the weights it owns
(a group: its query heads' q rows, its k and v rows, its heads' o columns; a channel: its gate and
up rows and its down column), so a found metric can drive the structured search.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial

import torch

from ..core.registry import Registry
from ..metrics import LANGUAGE_VERSION, Metric, resolve_metric
from ..model.arch import Arch
from . import wanda_sp
from .sparsity import layer_scores
from .wanda_sp import Rankings

RankFn = Callable[[torch.nn.Module, Arch, dict[str, torch.Tensor]], Rankings]


@dataclass(frozen=True)
class Method:
    """A structured pruning method: ranks KV groups and MLP channels, least important first. One
    that ``needs_gradient`` is also given ``gradients=`` (the statistic G) when it ranks."""

    name: str
    version: str
    rank: RankFn
    needs_gradient: bool = False


METHODS: Registry[Method] = Registry("pruning method")
METRIC_PREFIX = "metric:"


def get_method(spec: str) -> Method:
    """A registered method by name, or ``metric:EXPR``: units ranked by a metric's summed scores."""
    if spec.startswith(METRIC_PREFIX):
        return _metric_method(resolve_metric(spec[len(METRIC_PREFIX):]).text)
    return METHODS.get(spec)


@lru_cache(maxsize=32)
def _metric_method(text: str) -> Method:
    metric = resolve_metric(text)
    return Method(METRIC_PREFIX + metric.text, LANGUAGE_VERSION, partial(rank_by_metric, metric), metric.needs_gradient)


def unit_scores(arch: Arch, scores: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(per KV group, per MLP channel) sums of one layer's per-weight scores over what each unit owns."""
    per_group = arch.group_size * arch.head_dim  # query rows (and o columns) of one KV group
    groups = (scores["self_attn.q_proj"].sum(1).view(arch.n_kv_heads, per_group).sum(1)
              + scores["self_attn.k_proj"].sum(1).view(arch.n_kv_heads, arch.head_dim).sum(1)
              + scores["self_attn.v_proj"].sum(1).view(arch.n_kv_heads, arch.head_dim).sum(1)
              + scores["self_attn.o_proj"].sum(0).view(arch.n_kv_heads, per_group).sum(1))
    channels = scores["mlp.gate_proj"].sum(1) + scores["mlp.up_proj"].sum(1) + scores["mlp.down_proj"].sum(0)
    return groups.double().cpu(), channels.double().cpu()


def rank_by_metric(metric: Metric, model: torch.nn.Module, arch: Arch, stats: dict[str, torch.Tensor],
                   gradients: dict[str, torch.Tensor] | None = None) -> Rankings:
    scores = layer_scores(model, stats, metric, gradients)
    ranked = [unit_scores(arch, scores(i)) for i in range(arch.n_layers)]
    return Rankings([torch.argsort(g, stable=True) for g, _ in ranked], [torch.argsort(c, stable=True) for _, c in ranked])


def method_identity(name: str) -> dict[str, str]:
    """What of a method changes the numbers (its name and version): part of every candidate's key."""
    method = get_method(name)
    return {"name": method.name, "version": method.version}


def register_method(method: Method) -> Method:
    """Make ``method`` usable by its name everywhere a method name is taken."""
    return METHODS.register(method.name, method)


register_method(Method("wanda-sp", "1", wanda_sp.rank))
