"""Registries: an unknown name is a UserError listing what is registered, and a method, allocation or
oracle registered from outside is usable by name (the reverse-wanda method really prunes differently)."""

from __future__ import annotations

import pytest
import torch

import selfprune
from selfprune.allocators import ALLOCATIONS
from selfprune.core.errors import UserError
from selfprune.core.registry import Registry
from selfprune.evolve.classical import GAOracle
from selfprune.evolve.oracle_registry import ORACLES, OracleKind, make_oracle
from selfprune.methods import wanda_sp
from selfprune.methods.registry import METHODS, Method, register_method


def reverse_rank(model, arch, stats) -> wanda_sp.Rankings:
    """Wanda-sp's rankings upside down: the most important units go first."""
    r = wanda_sp.rank(model, arch, stats)
    return wanda_sp.Rankings([g.flip(0) for g in r.groups], [c.flip(0) for c in r.channels])


register_method(Method("reverse-wanda", "test-1", reverse_rank))
ALLOCATIONS.register("alternating", lambda model, arch, stats, ratio: [ratio + 0.1, ratio - 0.1] * (arch.n_layers // 2))
ORACLES.register("ga-wide", OracleKind("ga-wide", lambda arg, base_url, transport: GAOracle(mutation_sigma=0.2)))


def test_registry_get_register_and_unknown_name():
    reg: Registry[int] = Registry("widget")
    reg.register("one", 1)

    @reg.register("double")
    def double(x: int) -> int:
        return 2 * x

    assert reg.get("one") == 1 and reg.get("double") is double and reg.names() == ["one", "double"]
    reg.register("first", 0, order=0)
    reg.register("second", 2, order=1)
    assert reg.names() == ["first", "second", "one", "double"] and reg.ranked() == ["first", "second"]
    assert "one" in reg and "three" not in reg
    with pytest.raises(UserError, match=r"unknown widget 'three'; registered: first, second, one, double"):
        reg.get("three")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("one", 11)


def test_unknown_method_lists_the_registered_ones(tiny_workspace):
    with pytest.raises(UserError, match=r"unknown pruning method 'nope'; registered: wanda-sp, reverse-wanda"):
        selfprune.prune(str(tiny_workspace / "model"), 0.3, method="nope", device="cpu")


def test_unknown_allocation_is_read_as_a_file_and_names_the_registered_ones(tiny_workspace):
    with pytest.raises(UserError, match=r"does not exist; pass uniform, owl, sdsa, atp, dlp, alphapruning, alternating, or a RATES.json"):
        selfprune.prune(str(tiny_workspace / "model"), 0.3, "nope", device="cpu")


def tiny_prune(ws, **kwargs) -> selfprune.PruneResult:
    return selfprune.prune(str(ws / "model"), 0.5, data=str(ws / "corpus.txt"), samples=4, calib_seqlen=64,
                           device="cpu", **kwargs)


def test_registered_method_prunes_other_units(tiny_workspace):
    wanda = tiny_prune(tiny_workspace)
    reverse = tiny_prune(tiny_workspace, method="reverse-wanda")
    assert reverse.structure == wanda.structure  # same rates, same counts ...
    assert reverse.record["kept_channels"] != wanda.record["kept_channels"]  # ... other units
    assert reverse.record["kept_groups"] != wanda.record["kept_groups"]
    assert reverse.record["method"] == "reverse-wanda/uniform" and reverse.record["method_version"] == "test-1"
    assert wanda.record["method"] == "wanda-sp/uniform" and wanda.record["method_version"] == METHODS.get("wanda-sp").version
    w = next(p for n, p in wanda.model.named_parameters() if "down_proj" in n)
    r = next(p for n, p in reverse.model.named_parameters() if "down_proj" in n)
    assert w.shape == r.shape and not torch.equal(w, r)


def test_registered_allocation_is_used_by_name(tiny_workspace):
    result = tiny_prune(tiny_workspace, allocation="alternating")
    assert result.rates == pytest.approx([0.6, 0.4, 0.6, 0.4])
    assert result.record["method"] == "wanda-sp/alternating"


def test_registered_oracle_is_built_by_name():
    oracle = make_oracle("ga-wide")
    assert isinstance(oracle, GAOracle) and oracle.mutation_sigma == 0.2
    with pytest.raises(UserError, match="choose one of ga, random, openai:MODEL, ga-wide"):
        make_oracle("ga-narrow")
