"""Rebuilding a searched model: the settings besides the rates that decide which units survive.

A search's best.json holds its rates and, under ``config``, the settings it scored them with. Equal
rates under other calibration data, windows, method, alignment or precision keep other units, so a
prune from a best.json takes those settings unless the caller gives them (``None``: not given),
and says in one line which it took and which the caller changed. The ratio is taken too (a
sparsity search's: its sparsity), but not changed: the rates average the searched ratio, so another
one contradicts the file and is a :class:`UserError`. The CLI and ``selfprune.prune`` both settle
their settings here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from .core.errors import UserError
from .storage.userfiles import read_json


@dataclass(frozen=True)
class PruneSettings:
    """What decides a pruned model beside the model and its rates; ``None``: not given."""

    ratio: float | None = None  # the mean rate (with a metric: the sparsity) the rates are allocated to
    data: str | None = None
    samples: int | None = None
    calib_seqlen: int | None = None
    method: str | None = None
    dtype: str | None = None
    align: int | None = None
    align_heads: int | None = None
    reconstruct: str | None = None
    metric: str | None = None
    pattern: str | None = None


DEFAULTS = PruneSettings(0.5, "demo", 128, 512, "wanda-sp", "auto", 1, 1, "none", None, "unstructured")


def _searched(config: dict, precision: dict) -> PruneSettings:
    """A search's settings as a prune's: a sparsity search prunes single weights by its metric and
    pattern; a structured one ranks units by its method (``metric:NAME`` for a metric's ranking)."""
    sparse = config.get("pattern") is not None
    return PruneSettings(
        ratio=config.get("ratio"), data=config["data"], samples=config["samples"], calib_seqlen=config["calib_seqlen"],
        method=config["method"],
        dtype=precision.get("dtype", config["dtype"]), align=config.get("align", 1),
        align_heads=config.get("align_heads", 1), reconstruct=config.get("reconstruct", "none"),
        metric=config["metric"] if sparse else None, pattern=config["pattern"] if sparse else None)


def _option(name: str, searched: PruneSettings) -> str:
    """The option that sets ``name``; a sparsity search's ratio is its ``--sparsity``."""
    return "--sparsity" if name == "ratio" and searched.pattern is not None else f"--{name.replace('_', '-')}"


def _flag(name: str, value, searched: PruneSettings) -> str:
    return f"{_option(name, searched)} {value}"


def _check_ratio(given: float | None, searched: PruneSettings, allocation: str) -> None:
    """A UserError for a ratio the searched rates do not average, before any model is loaded."""
    if given is None or searched.ratio is None or given == searched.ratio:
        return
    option = _option("ratio", searched)
    raise UserError(f"{option} {given} contradicts {Path(allocation).name}: its rates are the search's at {option} "
                    f"{searched.ratio}; drop {option} to rebuild the searched model, or prune to {given} with another "
                    "allocation (--allocation uniform, owl, ...)")


def settle(allocation: str | list[float], given: PruneSettings) -> tuple[PruneSettings, str | None]:
    """``given`` completed from the search whose best.json ``allocation`` names (else from the
    defaults), and the one line saying what came from it; ``None`` when it is not a search's."""
    best = read_json(allocation, "allocation file", "a search's best.json") if _is_json(allocation) else None
    if not isinstance(best, dict) or not isinstance(best.get("config"), dict):
        return _first_given(given, DEFAULTS), None
    searched = _searched(best["config"], best.get("precision") or {})
    _check_ratio(given.ratio, searched, allocation)
    taken, changed = [], []
    for f in fields(PruneSettings):
        mine, theirs = getattr(given, f.name), getattr(searched, f.name)
        if mine is None and theirs is not None:
            taken.append(_flag(f.name, theirs, searched))
        elif mine is not None and mine != theirs:
            changed.append(f"{_flag(f.name, mine, searched)} (the search used {theirs})")
    line = f"from {Path(allocation).name}: {' '.join(taken) or 'nothing'}"
    if changed:
        line += f"; yours: {', '.join(changed)}: the model will differ from the searched one"
    return _first_given(given, searched, DEFAULTS), line


def _first_given(*layers: PruneSettings) -> PruneSettings:
    """Each setting from the first of ``layers`` that has it."""
    return PruneSettings(**{f.name: next((v for layer in layers if (v := getattr(layer, f.name)) is not None), None)
                            for f in fields(PruneSettings)})


def _is_json(allocation: str | list[float]) -> bool:
    return isinstance(allocation, str) and allocation.endswith(".json") and Path(allocation).is_file()
