"""The library's front door for scripts and notebooks: ``selfprune.prune`` and ``selfprune.perplexity``.

Each call is one whole job (load, calibrate, allocate, slice, export; or load and score) on plain
values, the way the CLI's commands are: the CLI parses its options, calls these, and prints.
``selfprune.report`` (the comparison without Prefect) lives in :mod:`selfprune.evaluate.report`.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from . import allocators
from .allocators.rates import check_ratio
from .core.errors import UserError
from .core.progress import step
from .data.corpora import check_data, split_windows
from .engine.models import load_arch, load_model
from .engine.provenance import sparse_record, structured_record
from .engine.settings import Calibration
from .engine.workbench import Progress, Workbench
from .export.hf import RECORD, save_pruned
from .methods.sparsity import Pattern, parse_pattern
from .methods.structure import EXACT, Alignment, Structure, dense_structure, rates_to_structure, realized_ratio
from .metrics import Metric, resolve_metric
from .model.arch import Arch
from .model.checkpoint import LoadedModel
from .model.devices import model_precision
from .model.ppl import perplexity as score_windows
from .protocol import protocol
from .reconstruct import RECONSTRUCTIONS, check_reconstruction, identity
from .searched import PruneSettings, settle
from .storage.userfiles import read_json

log = logging.getLogger(__name__)

FORMATS = {"hf": "a selfprune export", "deci": "DeciLM for vLLM"}


@dataclass(frozen=True)
class PruneResult:
    """A pruned model in memory, with what it came from; ``out`` is its export directory, if any."""

    model: torch.nn.Module
    tokenizer: Any
    arch: Arch  # the dense model's shapes (what ``structure`` counts against)
    rates: list[float]
    structure: Structure
    record: dict  # what ``selfprune.json`` holds
    ratio: float  # the target: given, or a search's best.json's
    realized_ratio: float  # share of the prunable parameters removed (structured) or zeroed (metric)
    out: Path | None = None
    settings_note: str | None = None  # from a search's best.json: the settings taken from it, and the caller's changes


def prune(
    model: str | LoadedModel,
    ratio: float | None = None,
    allocation: str | list[float] = "uniform",
    data: str | None = None,
    *,
    samples: int | None = None,
    calib_seqlen: int | None = None,
    method: str | None = None,
    device: str = "auto",
    dtype: str | None = None,
    out: str | Path | None = None,
    format: str = "hf",
    metric: str | None = None,
    pattern: str | None = None,
    align: Alignment | None = None,
    reconstruct: str | None = None,
    progress: Progress | None = None,
) -> PruneResult:
    """Prune ``model`` (a spec as for ``--model``, or a loaded one) to mean rate ``ratio`` (``None``: 0.5,
    or the search's when ``allocation`` is its best.json).

    ``allocation``: a registered allocation (``uniform``, ``owl``, ``sdsa``), a RATES.json path, or
    one rate per layer. ``method``: a registered structured pruning method. ``metric``: instead,
    zero single weights by a pruning metric (a built-in name such as ``wanda``, ``ria``, or an
    expression such as ``abs(W) * X_rms``) in ``pattern`` (``unstructured``, ``unstructured-layer``,
    ``2:4``, ``4:8``); ``ratio`` is then the sparsity. ``reconstruct``: refit what stays on the
    calibration windows, layer by layer (``sparsegpt`` on the metric's mask; ``sparsegpt-adaptive``,
    SparseGPT's own mask, no metric needed; ``lsq`` for structured pruning). ``align``: kept heads and MLP channels in
    multiples that kernels like (:class:`~selfprune.methods.structure.Alignment`). With ``out`` the model is exported there
    (``format`` ``hf``: load it with :func:`selfprune.load_pruned`; ``deci``: serve it with vLLM).
    ``progress``: ``(label, total) -> advance(n)`` for every pass; without it, the long steps are
    logged (:mod:`selfprune.core.progress`). The dense model is not modified.
    With a search's best.json as ``allocation``, every setting left ``None`` is the search's (so the
    searched model is rebuilt; a ``ratio`` other than the searched one is a UserError: its rates
    average that one), else the defaults (0.5, ``demo``, 128 x 512, ``wanda-sp``, ``auto``, exact,
    ``none``, ``unstructured``); ``settings_note`` of the result says what came from the search.
    """
    given = PruneSettings(ratio, data, samples, calib_seqlen, method, dtype, align.channels if align else None,
                          align.heads if align else None, reconstruct, metric, pattern)
    settings, note = settle(allocation, given)
    if note is not None:
        log.info(note)
    ratio = check_ratio(settings.ratio)
    data, samples, calib_seqlen, method, dtype = (settings.data, settings.samples, settings.calib_seqlen,
                                                  settings.method, settings.dtype)
    metric, pattern, reconstruct = settings.metric, settings.pattern, settings.reconstruct
    align = Alignment(settings.align_heads, settings.align)
    if format not in FORMATS:
        raise UserError(f"format {format!r} is not known; use " + " or ".join(f"{k} ({v})" for k, v in FORMATS.items()))
    if isinstance(allocation, str):
        allocators.allocator(allocation)  # a bad rate file fails here, before the model loads
    check_data(data)  # and a data typo
    if RECONSTRUCTIONS.get(reconstruct).own_mask:
        if metric is not None:
            raise UserError(f"--reconstruct {reconstruct} chooses its own mask; drop --metric, or keep it with "
                            "--reconstruct sparsegpt to update the metric's mask")
        metric = "wanda"  # what an allocation reads outliers from (and ATP tunes on) beside SparseGPT's own mask
    check_reconstruction(reconstruct, "sparse" if metric is not None else "structured")
    found = _check_metric(metric, pattern, ratio, allocation, format) if metric is not None else None
    if align != EXACT:
        if found is not None:
            raise UserError("--align shapes structured pruning; a model pruned by --metric keeps every row (drop --align)")
        align.check(load_arch(model) if isinstance(model, str) else model.arch)
    lm = load_model(model, device, dtype) if isinstance(model, str) else model
    bench = Workbench(lm, Calibration(data, samples, calib_seqlen), progress, method)
    if found is not None:
        return replace(_prune_weights(bench, lm, *found, ratio, allocation, out, reconstruct), settings_note=note)
    rates = bench.pruner.allocate(allocation, ratio)
    structure = rates_to_structure(bench.arch, rates, align)
    if out is not None and format == "deci":
        _check_deci(structure, bench.arch)
    pruned = bench.pruner.structured(structure, reconstruct)
    record = (structured_record(bench.pruner, rates, structure, allocation) | {"align": {"heads": align.heads, "channels": align.channels}}
              | identity(reconstruct))
    if out is not None:
        out = Path(out)
        save = _save_deci if format == "deci" else save_pruned
        _export(bench.calibrated.progress, out, lambda: save(pruned, lm.tokenizer, out, record))
    return PruneResult(pruned, lm.tokenizer, bench.arch, rates, structure, record, ratio,
                       realized_ratio(bench.arch, structure), out, note)


def _check_metric(metric: str, pattern: str, ratio: float, allocation: str | list[float],
                  format: str) -> tuple[Metric, Pattern]:
    """The metric and pattern, or a UserError before any model is loaded."""
    found, pat = resolve_metric(metric), parse_pattern(pattern)
    pat.check_fixed([ratio], allocation)
    if format != "hf":
        raise UserError("--format deci holds structurally pruned models; a model pruned by --metric exports as hf")
    return found, pat


def _prune_weights(bench: Workbench, lm: LoadedModel, metric: Metric, pattern: Pattern, ratio: float,
                   allocation: str | list[float], out: str | Path | None, reconstruct: str) -> PruneResult:
    """The metric path of :func:`prune`: zeros in place of the lowest-scoring weights."""
    rates, result = bench.pruner.sparse(metric, allocation, ratio, pattern, reconstruct)
    record = sparse_record(bench.calibrated, metric, pattern, rates, result, allocation, reconstruct)
    if out is not None:
        out = Path(out)
        _export(bench.calibrated.progress, out, lambda: save_pruned(result.model, lm.tokenizer, out, record))
    return PruneResult(result.model, lm.tokenizer, bench.arch, rates, dense_structure(bench.arch), record, ratio,
                       result.realized, out)


def _export(progress: Progress, out: Path, write: Callable[[], object]) -> None:
    """``write()`` the export as a step of its own: a large model's weights take a while to write."""
    advance = progress(f"export -> {out}", 1)
    write()
    advance(1)


def _check_deci(structure: Structure, arch: Arch) -> None:
    """A UserError listing every layer that DeciLM / vLLM cannot hold, before anything is written."""
    from .export.deci import deci_compatible

    ok, reasons = deci_compatible(structure, arch)
    if not ok:
        raise UserError("this structure cannot be written as DeciLM / nemotron-nas for vLLM:\n  - "
                        + "\n  - ".join(reasons) + "\nFix: use --format hf (load it with selfprune.load_pruned)")


def _save_deci(model: torch.nn.Module, tokenizer, out: Path, record: dict) -> None:
    """The selfprune export in a temporary directory beside OUT, converted into OUT."""
    from .export.deci import export_deci

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}-", dir=out.parent) as tmp:
        save_pruned(model, tokenizer, Path(tmp), record)
        export_deci(Path(tmp), out)


def perplexity(
    model: str | LoadedModel | PruneResult,
    data: str = "demo",
    split: str = "test",
    seqlen: int = 512,
    windows: int | None = None,
    batch_size: int = 4,
    device: str = "auto",
    dtype: str = "auto",
    progress: Progress | None = None,
) -> dict:
    """Token-level perplexity of ``model`` on ``split`` of ``data``, in ``windows`` (``None``: all)
    non-overlapping windows of ``seqlen`` tokens.

    ``model``: a spec as for ``--model`` (loaded with ``device``/``dtype``), or a model already in
    memory (a loaded model, ``selfprune.load_pruned(DIR)``, a :class:`PruneResult`), scored where
    it lies. Returns the :class:`selfprune.model.ppl.Perplexity` fields with ``data`` and ``split``, and,
    for a spec or a loaded model, ``model`` and ``fingerprint``.
    """
    lm = load_model(model, device, dtype) if isinstance(model, str) else model
    ids = split_windows(lm.tokenizer, data, split, seqlen, windows)
    result = score_windows(lm.model, ids, batch_size, (progress or step)("perplexity", len(ids)))
    identity = {"model": lm.source, "fingerprint": lm.fingerprint} if isinstance(lm, LoadedModel) else {}
    record = result.to_dict() | identity | {"data": data, "split": split}
    if identity:  # an export's statistics are in its record; a dense model had none
        where = model_precision(lm.model)
        origin = Path(lm.source) / RECORD
        calibration = read_json(origin, "export record", "a selfprune export").get("calibration") if origin.is_file() else None
        record["protocol"] = protocol(lm.source, lm.fingerprint, record, record, calibration, where["device"], where["dtype"])
    return record
