"""--align / --align-heads: kept MLP channels and query heads in multiples kernels like, ratio kept."""

from __future__ import annotations

import json
import random

import pytest
from helpers import run_cli, tiny_export

from selfprune import search
from selfprune.allocators.rates import uniform
from selfprune.core.errors import UserError
from selfprune.methods.structure import EXACT, Alignment, layer_keep, rates_to_structure, realized_ratio
from selfprune.model.arch import Arch

# The demo model's shape: 3 KV groups of 3 query heads (head size 64), hidden 576, MLP 1536, 30 layers.
DEMO = Arch(model_type="llama", n_layers=30, hidden=576, n_heads=9, n_kv_heads=3, head_dim=64, intermediate=1536,
            qkv_bias=False, o_bias=False, mlp_bias=False)


def _aligned(kept: int, total: int, step: int) -> bool:
    return kept in (0, total) or kept % step == 0


def test_exact_alignment_is_the_unaligned_rounding():
    # rate 0.3 of a demo layer: round(0.9) = 1 KV group goes (294,912 params); the MLP then removes
    # round((0.3 * 3,538,944 - 294,912) / 1,728) = round(443.7) = 444 channels -> 1092 kept
    assert layer_keep(DEMO, 0.3) == layer_keep(DEMO, 0.3, EXACT) == (k := layer_keep(DEMO, 0.3))
    assert (k.groups, k.channels) == (2, 1092)
    rng = random.Random(0)
    rates = [rng.uniform(0, 1) for _ in range(30)]
    assert rates_to_structure(DEMO, rates) == rates_to_structure(DEMO, rates, Alignment(1, 1))


def test_aligned_widths_by_hand():
    # rate 0.3, channels in 128s: 1092.3 ideal kept channels lies between 1024 and 1152; 1152 is nearer
    assert layer_keep(DEMO, 0.3, Alignment(1, 128)).channels == 1152
    # heads in 6s (2 KV groups): ideal kept groups 3 - 0.3 * 3 = 2.1 -> 2; rate 0.6: 1.2 kept -> 2 (0 is further)
    assert layer_keep(DEMO, 0.3, Alignment(6, 1)).groups == 2
    assert layer_keep(DEMO, 0.6, Alignment(6, 1)).groups == 2
    # rate 0.9: 0.3 kept groups -> 0; the MLP keeps what is left of the budget, in 64s
    k = layer_keep(DEMO, 0.9, Alignment(6, 64))
    assert k.groups == 0 and k.channels % 64 == 0 and abs(k.channels - 205.6) <= 32


@pytest.mark.parametrize("align", [Alignment(1, 64), Alignment(1, 128), Alignment(6, 128), Alignment(9, 256)])
@pytest.mark.parametrize("beta", [0.3, 0.5])
def test_aligned_structures_keep_the_ratio(align, beta):
    rng = random.Random(1)
    searched = [min(0.9, max(0.0, beta + rng.uniform(-0.3, 0.3))) for _ in range(30)]
    searched = [r + beta - sum(searched) / 30 for r in searched]
    step_ratio = align.channels * DEMO.channel_params / (DEMO.layer_params * DEMO.n_layers)
    for rates in (uniform(30, beta), searched):
        structure = rates_to_structure(DEMO, rates, align)
        assert all(_aligned(k.channels, 1536, align.channels) for k in structure)
        assert all(_aligned(k.groups, 3, max(1, align.heads // 3)) for k in structure)
        # within half a channel step of the rates' own ratio (each layer within one step of its rate)
        assert abs(realized_ratio(DEMO, structure) - sum(rates) / 30) <= step_ratio / 2 + 1e-12


def test_bad_alignment_is_refused():
    with pytest.raises(UserError, match="KV groups of 3: give --align-heads a multiple of 3"):
        Alignment(4, 1).check(DEMO)
    with pytest.raises(UserError, match="exceed"):
        Alignment(1, 4096).check(DEMO)
    with pytest.raises(UserError, match="at least 1"):
        Alignment(1, 0).check(DEMO)


def test_prune_and_search_align_on_a_real_model(tiny_workspace, tmp_path, capsys, monkeypatch):
    # the tiny GQA Llama: 2 KV groups of 4 query heads, MLP 96
    out = tiny_export(tiny_workspace, tmp_path / "e", "--ratio", "0.4", "--align", "32")
    layers = json.loads((out / "config.json").read_text())["selfprune_layers"]
    assert all(_aligned(c, 96, 32) for _, c in layers)
    assert json.loads((out / "selfprune.json").read_text())["align"] == {"heads": 1, "channels": 32}

    code, _, err = run_cli(capsys, monkeypatch, "prune", "--model", str(tiny_workspace / "model"), "--ratio", "0.4",
                           "--align-heads", "3", "--out", str(tmp_path / "bad"))
    assert code == 2 and "multiple of 4" in err and not (tmp_path / "bad").exists()

    best = search(model=str(tiny_workspace / "model"), data=str(tiny_workspace / "corpus.txt"), ratio=0.4, samples=4,
                  calib_seqlen=64, seqlen=64, fitness_windows=2, test_windows=2, population=4, mutations=2,
                  crossovers=2, generations=1, device="cpu", align=32, align_heads=4, out=str(tmp_path / "s"))
    assert all(_aligned(c, 96, 32) and _aligned(g, 2, 1) for g, c in best.structure)
