"""Allocations by name: how a target ratio becomes per-layer rates.

An allocator maps (model, arch, statistics, ratio) to one rate per layer, the same inputs a
pruning method ranks from (OWL needs the model and statistics). ``uniform`` and ``owl`` are
registered here; any other allocation spec is a rate file. The rate arithmetic itself lives in :mod:`.allocation`, and
:meth:`Workbench.allocate` validates whatever an allocator returns.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import allocation, wanda_sp
from .arch import Arch
from .errors import UserError
from .registry import Registry
from .userfiles import read_json

Allocator = Callable[[torch.nn.Module, Arch, dict[str, torch.Tensor], float], list[float]]

ALLOCATIONS: Registry[Allocator] = Registry("allocation")


@ALLOCATIONS.register("uniform")
def uniform(model: torch.nn.Module, arch: Arch, stats: dict[str, torch.Tensor], ratio: float) -> list[float]:
    return allocation.uniform(arch.n_layers, ratio)


@ALLOCATIONS.register("owl")
def owl(model: torch.nn.Module, arch: Arch, stats: dict[str, torch.Tensor], ratio: float) -> list[float]:
    return allocation.owl(wanda_sp.outlier_ratios(model, stats), ratio)


def rate_file(path: str) -> Allocator:
    """A rates file: a JSON list, or an object with ``rates`` (a search's best.json, an export record).

    Read now, not when allocating, so a wrong path fails before any model is loaded.
    """
    expected = f"{', '.join(ALLOCATIONS.names())}, or a RATES.json holding a list of rates"
    obj = read_json(path, "allocation file", expected)
    rates = obj.get("rates") if isinstance(obj, dict) else obj
    if not isinstance(rates, list):
        raise UserError(f"{path} holds no rate list; write [p_1, ..., p_n] or {{\"rates\": [...]}}")
    return lambda model, arch, stats, ratio: rates


def allocator(spec: str) -> Allocator:
    """The registered allocation named ``spec``; any other spec is read as a RATES.json path."""
    return ALLOCATIONS.get(spec) if spec in ALLOCATIONS else rate_file(spec)


def label(spec: str | list[float]) -> str:
    """How a record names the allocation: its name, ``file:PATH``, or ``explicit`` for a list."""
    if isinstance(spec, list):
        return "explicit"
    return spec if spec in ALLOCATIONS else f"file:{spec}"
