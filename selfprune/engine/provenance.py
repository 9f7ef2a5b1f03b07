"""What an export record (``selfprune.json``) says of a pruned model's origin: enough to rebuild it
from its base model."""

from __future__ import annotations

from .. import allocators
from ..methods import slicing
from ..methods.sparsity import Pattern, Sparsified
from ..methods.structure import Structure, kept_params, realized_ratio, structure_to_json
from ..metrics import Metric
from ..reconstruct import NONE
from ..reconstruct import identity as reconstruction
from .calibrated import Calibrated
from .pruner import Pruner


def origin(calibrated: Calibrated) -> dict:
    """What every record holds of its origin: the base model, calibration, statistics, precision."""
    lm = calibrated.lm
    return {
        "base_model": {"source": lm.source, "fingerprint": lm.fingerprint, "arch": calibrated.arch.to_dict()},
        "calibration": calibrated.calibration.key_fields() | {"fingerprint": calibrated.fingerprint},
        "stats_key": calibrated.stats_key,
        "precision": calibrated.precision,
    }


def structured_record(pruner: Pruner, rates: list[float], structure: Structure, allocation_spec: str | list[float]) -> dict:
    """A structurally pruned model's record. ``method`` reads ``METHOD/ALLOCATION`` (e.g.
    ``wanda-sp/owl``); ``method_version`` says which scoring of that method ranked the units."""
    units = slicing.kept_units(pruner.rankings, structure)
    arch = pruner.arch
    return {
        "method": f"{pruner.method.name}/{allocators.label(allocation_spec)}",
        "method_version": pruner.method.version,
        "rates": rates,
        "structure": structure_to_json(structure),
        "kept_groups": [g.tolist() for g, _ in units],
        "kept_channels": [c.tolist() for _, c in units],
        "attention_unit": "kv_group",
        "realized_ratio": realized_ratio(arch, structure),
        "kept_params": kept_params(arch, structure),
        **origin(pruner.calibrated),
    }


def sparse_record(calibrated: Calibrated, metric: Metric, pattern: Pattern, rates: list[float], result: Sparsified,
                  allocation_spec: str | list[float], reconstruct: str = NONE) -> dict:
    """An unstructured or N:M model's record."""
    return {
        "method": f"metric/{allocators.label(allocation_spec)}",
        "metric": {"text": metric.text, "key": metric.key},
        **reconstruction(reconstruct),
        "pattern": pattern.text,
        "rates": rates,
        "layer_sparsity": result.layer_sparsity,
        "realized_sparsity": result.realized,
        **origin(calibrated),
    }
