"""Allocations by name: how a target ratio becomes per-layer rates.

An allocator maps (model, arch, statistics, ratio) to one rate per layer, the same inputs a
pruning method ranks from (OWL needs the model and statistics). Two optional inputs are passed to
an allocator that names them (:func:`optional_inputs`): ``layer_scores``, the per-weight scores of
each layer under a pruning metric (Wanda's when not given), which OWL, SDSA and DLP read a layer's
outliers from; and ``fitness``, the perplexity of the candidate a rate vector gives, which ATP
tunes its slope on. ``uniform`` is registered here, every other allocation in a file of its own
(:mod:`.owl`, :mod:`.sdsa`, :mod:`.atp`, :mod:`.dlp`, :mod:`.alphapruning`), each registering itself
with its ``order``, its place among the search's baselines (an allocation registered without one
is usable by name but no default baseline); every module of this folder is imported, so a new
allocation is one new file. Any other allocation spec is a rate file. The rate arithmetic they share
lives in :mod:`.rates`, and :meth:`Pruner.allocate` validates whatever an
allocator returns.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable

import torch

from ..core.errors import UserError
from ..core.registry import Registry
from ..model.arch import Arch
from ..storage.userfiles import read_json
from . import rates

LayerScores = Callable[[int], list[torch.Tensor]]  # layer index -> the scores of its linears' weights
Fitness = Callable[[list[float]], float]  # rates -> perplexity of their candidate (lower is better)
# (model, arch, stats, ratio) -> rates; one that reads outliers also takes ``layer_scores=``, one that
# tunes itself ``fitness=``, so an allocator of the four arguments still registers as is
Allocator = Callable[..., list[float]]

ALLOCATIONS: Registry[Allocator] = Registry("allocation")


@ALLOCATIONS.register("uniform", order=0)
def uniform(model: torch.nn.Module, arch: Arch, stats: dict[str, torch.Tensor], ratio: float,
            layer_scores: LayerScores | None = None) -> list[float]:
    return rates.uniform(arch.n_layers, ratio)



def optional_inputs(allocate: Allocator, offered: dict[str, object]) -> dict[str, object]:
    """The optional inputs of ``offered`` that ``allocate`` takes (by name, or all through
    ``**kwargs``): an allocator registered with the four arguments gets none."""
    params = inspect.signature(allocate).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(offered)
    return {k: v for k, v in offered.items() if k in params}


def tunes(spec: str) -> bool:
    """Whether the registered allocation ``spec`` reads ``fitness``: its rates then depend on the
    fitness windows and on how a candidate is built, which its cache keys must name."""
    return spec in ALLOCATIONS and "fitness" in optional_inputs(ALLOCATIONS.get(spec), {"fitness": None})


def rate_file(path: str) -> Allocator:
    """A rates file: a JSON list, or an object with ``rates`` (a search's best.json, an export record);
    a search that picked after reconstruction gives the candidate it kept.

    Read now, not when allocating, so a wrong path fails before any model is loaded.
    """
    expected = f"{', '.join(ALLOCATIONS.names())}, or a RATES.json holding a list of rates"
    obj = read_json(path, "allocation file", expected)
    if isinstance(obj, dict) and isinstance(obj.get("reconstructed"), dict):
        obj = obj["reconstructed"]  # a search that picked after reconstruction (--reconstruct-top): what it kept
    rates = obj.get("rates") if isinstance(obj, dict) else obj
    if isinstance(obj, dict) and isinstance(obj.get("structure"), dict):
        rates = obj["structure"].get("rates")  # a sparsity search's best: the rates its candidate was built with
    if not isinstance(rates, list):
        raise UserError(f"{path} holds no rate list; write [p_1, ..., p_n] or {{\"rates\": [...]}}")
    return lambda model, arch, stats, ratio, **_: rates


def allocator(spec: str) -> Allocator:
    """The registered allocation named ``spec``; any other spec is read as a RATES.json path."""
    return ALLOCATIONS.get(spec) if spec in ALLOCATIONS else rate_file(spec)


def label(spec: str | list[float]) -> str:
    """How a record names the allocation: its name, ``file:PATH``, or ``explicit`` for a list."""
    if isinstance(spec, list):
        return "explicit"
    return spec if spec in ALLOCATIONS else f"file:{spec}"


def _register_every_module() -> None:
    """Import each module of this folder: an allocation in a file of its own registers itself
    (and its place in ``ALLOCATIONS.names()``, the search's baselines) with no line to add here.
    At the end, as they import the registry from here."""
    for found in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{found.name}")


_register_every_module()
