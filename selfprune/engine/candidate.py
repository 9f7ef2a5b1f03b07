"""What a search or a report scores: one type per kind of candidate model.

* :class:`Dense`: the model itself.
* :class:`Structured`: whole KV groups and MLP channels removed (a structure), optionally refitted.
* :class:`Sparse`: a metric's lowest-scoring single weights zeroed in a pattern, at per-layer
  sparsities that a registered allocation decides or that are given (a sparsity search's).

Each knows its JSON (:meth:`to_json`: its part of a cache key, byte for byte what earlier versions
wrote, and what a record or a ledger line holds), its size, and is read back from JSON by
:func:`from_json` only; Prefect tasks take the candidate itself. Building one is
:meth:`selfprune.engine.pruner.Pruner.model`; the versions of the code that make its number join
its key in :func:`selfprune.engine.identity.candidate_identity`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from .. import allocators
from ..core.errors import UserError
from ..methods.sparsity import parse_pattern, weights, zeros
from ..methods.structure import Structure, dense_structure, kept_params, realized_ratio, structure_from_json, structure_to_json
from ..metrics import resolve_metric
from ..model.arch import Arch
from ..reconstruct import NONE, RECONSTRUCT_VERSION, check_reconstruction


class Size(NamedTuple):
    """How much a candidate removes: the share of prunable weights, and the decoder layers' kept parameters."""

    realized_ratio: float
    kept_params: int


@dataclass(frozen=True)
class Dense:
    """The dense model: what every report compares against."""

    def to_json(self) -> None:
        return None

    def size(self, arch: Arch, rates: list[float] | None = None) -> Size:
        return Structured(dense_structure(arch)).size(arch)


@dataclass(frozen=True)
class Structured:
    """Whole units removed: the kept KV groups and channels per layer (rate vectors that round
    alike are one candidate), and the refit of their consumers (``lsq``) or ``none``."""

    structure: Structure
    reconstruct: str = NONE

    def __post_init__(self) -> None:
        check_reconstruction(self.reconstruct, "structured")

    def to_json(self) -> list[list[int]]:
        return structure_to_json(self.structure)

    def size(self, arch: Arch, rates: list[float] | None = None) -> Size:
        return Size(realized_ratio(arch, self.structure), kept_params(arch, self.structure))


@dataclass(frozen=True)
class Sparse:
    """A metric's single-weight pruning: its canonical text, the pattern, the target sparsity, and
    the per-layer sparsities, named by a registered ``allocation`` (computed where it is built) or
    given as ``rates``; ``reconstruct`` updates the kept weights (``sparsegpt``) or lets SparseGPT
    choose the mask (``sparsegpt-adaptive``)."""

    metric: str
    pattern: str
    sparsity: float
    allocation: str | None = None
    rates: tuple[float, ...] | None = None
    reconstruct: str = NONE

    def __post_init__(self) -> None:
        if (self.allocation is None) == (self.rates is None):
            raise ValueError("a sparse candidate takes an allocation or its rates, exactly one")
        check_reconstruction(self.reconstruct, "sparse")

    @classmethod
    def of(cls, metric: str, pattern: str, sparsity: float, allocation: str | None = None,
           rates: list[float] | None = None, reconstruct: str = NONE) -> Sparse:
        """From what a user writes: the metric and pattern made canonical, the allocation checked
        (registered: a rate file's rates could change under one name)."""
        if allocation is not None and allocation not in allocators.ALLOCATIONS:
            raise UserError(f"allocation {allocation!r} of a metric's candidate must be registered "
                            f"({', '.join(allocators.ALLOCATIONS.names())}): a file's rates could change under the same name")
        return cls(resolve_metric(metric).text, parse_pattern(pattern).text, sparsity, allocation,
                   None if rates is None else tuple(rates), reconstruct)

    def to_json(self) -> dict:
        """The reconstruction and its version appear only when there is one, so candidates without
        one keep the keys they had before reconstruction existed."""
        decided = {"allocation": self.allocation} if self.rates is None else {"rates": list(self.rates)}
        found = {"metric": self.metric, "pattern": self.pattern, **decided, "sparsity": self.sparsity}
        if self.reconstruct != NONE:
            found |= {"reconstruct": self.reconstruct, "reconstruct_version": RECONSTRUCT_VERSION}
        return found

    def size(self, arch: Arch, rates: list[float] | None = None) -> Size:
        """``rates``: the per-layer sparsities an allocation gave (its own, for a searched candidate)."""
        zeroed = zeros(arch, list(self.rates) if self.rates is not None else rates, parse_pattern(self.pattern))
        return Size(zeroed / weights(arch), arch.n_layers * arch.layer_params - zeroed)


Candidate = Dense | Structured | Sparse


def from_json(structure: list | dict | None, reconstruct: str = NONE) -> Candidate:
    """A candidate back from its JSON (:meth:`to_json`; a structured one's reconstruction given
    beside it): the one place a candidate's JSON is read."""
    if structure is None:
        return Dense()
    if isinstance(structure, dict):
        if reconstruct != NONE:
            raise ValueError("a sparse candidate carries its reconstruction in its JSON")
        rates = structure.get("rates")
        return Sparse(structure["metric"], structure["pattern"], structure["sparsity"], structure.get("allocation"),
                      None if rates is None else tuple(rates), structure.get("reconstruct", NONE))
    return Structured(structure_from_json(structure), reconstruct)
