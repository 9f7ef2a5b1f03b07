"""Pruning methods by name: how units are ranked from the dense model and its statistics.

A method is a small object with a ``name``, a ``version`` and ``rank(model, arch, stats)``. The
version stands for the scoring itself: change what a method's ranking returns and bump its
version, since it identifies the rankings (and everything built from them) in records and keys.
Adding a method is one definition and one ``METHODS.register`` line; ``Workbench(method=NAME)``,
``selfprune.prune(method=NAME)`` and ``selfprune prune`` then use it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import wanda_sp
from .arch import Arch
from .registry import Registry
from .wanda_sp import Rankings

RankFn = Callable[[torch.nn.Module, Arch, dict[str, torch.Tensor]], Rankings]


@dataclass(frozen=True)
class Method:
    """A structured pruning method: ranks KV groups and MLP channels, least important first."""

    name: str
    version: str
    rank: RankFn


METHODS: Registry[Method] = Registry("pruning method")


def method_identity(name: str) -> dict[str, str]:
    """What of a method changes the numbers (its name and version): part of every candidate's key."""
    method = METHODS.get(name)
    return {"name": method.name, "version": method.version}


def register_method(method: Method) -> Method:
    """Make ``method`` usable by its name everywhere a method name is taken."""
    return METHODS.register(method.name, method)


register_method(Method("wanda-sp", "1", wanda_sp.rank))
