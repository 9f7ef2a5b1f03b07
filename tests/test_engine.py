"""The pruning engine on tiny random models of every supported family."""

from __future__ import annotations

import math
import os
import random
import re

import pytest
import torch
from helpers import build_tiny, random_windows

import selfprune
from selfprune.allocators.owl import outlier_ratios, owl_rates
from selfprune.allocators.rates import check_rates, check_ratio, project_to_mean, uniform
from selfprune.core.errors import CorruptFile, UserError
from selfprune.engine.models import load_model
from selfprune.export.hf import save_pruned
from selfprune.methods import slicing, wanda_sp
from selfprune.methods.structure import LayerKeep, layer_keep, rates_to_structure, realized_ratio, structure_to_json
from selfprune.model import stats
from selfprune.model.arch import arch_of
from selfprune.model.ppl import perplexity


def _ranked(model, seed=0):
    arch = arch_of(model.config)
    st = stats.capture(model, random_windows(4, 32, seed))
    return arch, st, wanda_sp.rank(model, arch, st)


def _state_digest(model) -> dict[str, float]:
    return {k: float(v.double().sum()) for k, v in model.state_dict().items()}


def test_load_local_dir_reads_arch_and_fingerprint(tiny_dir):
    lm = load_model(str(tiny_dir), device="cpu")
    assert lm.arch.n_layers == 4 and lm.arch.hidden == 64
    assert lm.arch.qkv_bias == (lm.arch.model_type == "qwen2")
    assert lm.fingerprint == load_model(str(tiny_dir), device="cpu").fingerprint


def test_fingerprint_is_memoized_by_path_size_and_mtime(tmp_path, monkeypatch):
    from selfprune.model import checkpoint
    from selfprune.storage.hashing import sha256_file

    build_tiny("llama_mha").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    first = checkpoint.fingerprint(tmp_path)
    hashed = []
    monkeypatch.setattr(checkpoint, "sha256_file", lambda p: hashed.append(p) or sha256_file(p))
    assert checkpoint.fingerprint(tmp_path) == first and hashed == []  # from the memo
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert checkpoint.fingerprint(tmp_path) == first and hashed == [weights.resolve()]  # same bytes, rehashed
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    assert checkpoint.fingerprint(tmp_path) != first


@pytest.mark.parametrize("kind", ["llama_mha", "llama_gqa", "qwen2", "mistral"])
def test_sliced_model_equals_dense_model_with_units_zeroed(kind):
    """Slicing is exact: the small model computes what the dense model computes with the
    removed heads' o_proj columns and removed channels' down_proj columns set to zero."""
    model = build_tiny(kind)
    arch, _, rankings = _ranked(model)
    structure = (LayerKeep(arch.n_kv_heads - 1, 50), LayerKeep(0, 96), LayerKeep(1, 0), LayerKeep(arch.n_kv_heads, 10))
    pruned = slicing.materialize(model, arch, rankings, structure)
    masked = build_tiny(kind)
    for (groups, channels), layer in zip(slicing.kept_units(rankings, structure), masked.model.layers):
        q, _ = slicing.head_rows(arch, groups)
        keep_q = torch.zeros(layer.self_attn.o_proj.in_features, dtype=torch.bool)
        keep_q[q] = True
        layer.self_attn.o_proj.weight[:, ~keep_q] = 0
        keep_c = torch.zeros(arch.intermediate, dtype=torch.bool)
        keep_c[channels] = True
        layer.mlp.down_proj.weight[:, ~keep_c] = 0
    ids = random_windows(2, 24, seed=5)
    torch.testing.assert_close(pruned(ids).logits, masked(ids).logits, rtol=1e-5, atol=1e-5)
    layer0 = pruned.model.layers[0]
    assert layer0.self_attn.q_proj.out_features == (arch.n_kv_heads - 1) * arch.group_size * arch.head_dim
    assert layer0.self_attn.k_proj.out_features == (arch.n_kv_heads - 1) * arch.head_dim
    assert layer0.mlp.gate_proj.out_features == 50 and layer0.mlp.down_proj.in_features == 50
    assert isinstance(pruned.model.layers[1].self_attn, slicing.RemovedAttention)
    assert isinstance(pruned.model.layers[2].mlp, slicing.RemovedMLP)


def test_lowest_scored_units_go_hand_computed():
    """A hand-made layer: o_proj column magnitudes and activation norms decide the order."""
    model = build_tiny("llama_gqa")  # 8 query heads, 2 KV groups, head_dim 8
    arch = arch_of(model.config)
    layer = model.model.layers[0]
    o = torch.ones(64, 64)
    o[:, :32] = 3.0  # group 0 (query heads 0-3) has larger weights ...
    down = torch.ones(64, 96)
    down[:, 7] = 0.1  # channel 7 has tiny weights
    layer.self_attn.o_proj.weight.copy_(o)
    layer.mlp.down_proj.weight.copy_(down)
    st = {"tokens": torch.tensor(1.0, dtype=torch.float64)}
    for i in range(arch.n_layers):
        attn_sq = torch.ones(64)
        attn_sq[:32] = 0.01  # ... but its inputs are 10x smaller in norm: 3 * 0.1 < 1 * 1
        mlp_sq = torch.full((96,), 4.0)
        mlp_sq[3] = 0.0001  # channel 3 is silent: score 1 * 0.01 < channel 7's 0.1 * 2
        st |= {f"{i}.attn_in.sq": attn_sq, f"{i}.mlp_in.sq": mlp_sq}
    ranks = wanda_sp.rank(model, arch, st)
    # group scores: g0 = 32 channels * 3 * 0.1 = 9.6, g1 = 32 * 1 * 1 = 32 -> g0 goes first
    assert ranks.groups[0].tolist() == [0, 1]
    assert ranks.channels[0][:2].tolist() == [3, 7]
    assert wanda_sp.kept(ranks.channels[0], 94).tolist() == [c for c in range(96) if c not in (3, 7)]


@pytest.mark.parametrize("kind", ["llama_mha", "llama_gqa", "qwen2"])
def test_realized_ratio_matches_target(kind):
    arch = arch_of(build_tiny(kind).config)
    # Each layer lands within half an MLP channel of its target (the rounding rule), so the mean does too.
    half_channel = arch.channel_params / (2 * arch.layer_params) + 1e-12
    rng = random.Random(0)
    for beta in (0.1, 0.3, 0.5, 0.7):
        for _ in range(20):
            rates = project_to_mean([rng.uniform(0, 1) for _ in range(arch.n_layers)], beta)
            realized = realized_ratio(arch, rates_to_structure(arch, rates))
            assert abs(realized - beta) <= half_channel, (rates, realized)
        even = rates_to_structure(arch, uniform(arch.n_layers, beta))
        assert abs(realized_ratio(arch, even) - beta) <= half_channel


def test_rate_one_removes_both_sublayers_and_zero_keeps_all():
    arch = arch_of(build_tiny("llama_gqa").config)
    assert layer_keep(arch, 1.0) == LayerKeep(0, 0)
    assert layer_keep(arch, 0.0) == LayerKeep(arch.n_kv_heads, arch.intermediate)


def test_dense_untouched_and_candidates_independent_of_order(tiny_dir):
    lm = load_model(str(tiny_dir), device="cpu")
    arch, _, rankings = _ranked(lm.model)
    before = _state_digest(lm.model)
    s1 = rates_to_structure(arch, [0.2, 0.6, 0.4, 0.4])
    s2 = rates_to_structure(arch, [0.9, 0.1, 0.5, 0.1])
    ids = random_windows(2, 16, seed=9)
    seq = [slicing.materialize(lm.model, arch, rankings, s)(ids).logits for s in (s1, s2)]
    assert _state_digest(lm.model) == before
    for s, logits in zip((s1, s2), seq):
        fresh = load_model(str(tiny_dir), device="cpu").model
        torch.testing.assert_close(slicing.materialize(fresh, arch, rankings, s)(ids).logits, logits, rtol=0, atol=0)


def _reference_ppl(model, windows) -> float:
    nll, n = 0.0, 0
    for w in windows:
        logp = torch.log_softmax(model(w[None]).logits[0].double(), -1)
        for t in range(len(w) - 1):
            nll -= float(logp[t, w[t + 1]])
            n += 1
    return math.exp(nll / n)


def test_perplexity_equals_plain_reference_loop():
    model = build_tiny("qwen2")
    windows = random_windows(5, 20, seed=3)
    got = perplexity(model, windows, batch_size=2)
    assert got.tokens == 5 * 19 and got.seqlen == 20 and got.windows == 5
    assert got.ppl == pytest.approx(_reference_ppl(model, windows), rel=1e-4)


def test_export_round_trip(tiny_dir, tmp_path):
    lm = load_model(str(tiny_dir), device="cpu")
    arch, _, rankings = _ranked(lm.model)
    structure = rates_to_structure(arch, [0.3, 1.0, 0.5, 0.2])
    pruned = slicing.materialize(lm.model, arch, rankings, structure)
    windows = random_windows(3, 32, seed=4)
    out = save_pruned(pruned, lm.tokenizer, tmp_path / "export", {"rates": [0.3, 1.0, 0.5, 0.2]})
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    back = selfprune.load_pruned(out, device="cpu")  # the documented one call
    assert back.model.config.selfprune_layers == structure_to_json(structure)
    a, b = perplexity(pruned, windows).ppl, perplexity(back.model, windows).ppl
    assert b == pytest.approx(a, rel=1e-5)
    assert sum(p.numel() for p in back.model.parameters()) == sum(p.numel() for p in pruned.parameters())
    # `load_model` recognises an export directory too.
    assert load_model(str(out), device="cpu").model.config.selfprune_layers == back.model.config.selfprune_layers


def test_owl_rates_have_target_mean_and_spread():
    model = build_tiny("llama_gqa")
    st = stats.capture(model, random_windows(4, 32))
    lods = outlier_ratios(model, st)
    rates = owl_rates(lods, 0.5)
    assert len(rates) == 4 and sum(rates) / 4 == pytest.approx(0.5, abs=1e-9)
    assert max(rates) - min(rates) == pytest.approx(0.16, abs=1e-6) or len(set(lods)) == 1
    assert rates.index(min(rates)) == lods.index(max(lods))  # most outliers -> pruned least


# ---- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [0, 1, -0.1, 1.5, float("nan")])
def test_bad_ratio(ratio):
    with pytest.raises(UserError, match="--ratio"):
        check_ratio(ratio)


def test_bad_rates():
    with pytest.raises(UserError, match="4 layers"):
        check_rates([0.5] * 3, 4, 0.5)
    with pytest.raises(UserError, match="outside"):
        check_rates([0.5, 0.5, 1.2, -0.2], 4, 0.5)
    with pytest.raises(UserError, match="average"):
        check_rates([0.5, 0.5, 0.5, 0.9], 4, 0.5)


def test_missing_model_path(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(str(tmp_path / "nope"), device="cpu")


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=256)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UserError, match="unsupported architecture 'gpt2'.*llama"):
        load_model(str(tmp_path / "gpt2"), device="cpu")


def test_foreign_statistics_are_refused():
    st = stats.capture(build_tiny("llama_mha"), random_windows(2, 16))
    assert set(st) == {"tokens"} | {f"{i}.{s}.{kind}" for i in range(4) for s in stats.HOOKED for kind in ("sq", "sum")}
    assert stats.check(st, 4, "here")["tokens"] == 32
    with pytest.raises(CorruptFile, match="here.*8-layer model, but missing") as err:
        stats.check(st, 8, "here")  # statistics of a 4-layer model for an 8-layer one
    assert err.value.path == "here"
    with pytest.raises(CorruptFile, match="unexpected"):
        stats.check(st | {"0.attn_in.cube": st["0.attn_in.sq"]}, 4, "here")  # another version's file
    with pytest.raises(CorruptFile, match="missing"):
        stats.check({k: v for k, v in st.items() if not k.endswith(".sum")}, 4, "here")  # an older version's file


def test_channel_stats_are_the_inputs_rms_mean_and_variance():
    """What a metric sees of a linear's input, checked against the inputs themselves."""
    model = build_tiny("llama_mha")
    seen = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1]).double()))
    st = stats.capture(model, random_windows(3, 16), batch_size=2)
    handle.remove()
    x = torch.cat(seen)
    got = stats.channel_stats(st, 1, "mlp_in")
    torch.testing.assert_close(got["X_rms"], x.pow(2).mean(0).sqrt().float())
    torch.testing.assert_close(got["X_mean"], x.mean(0).float())
    torch.testing.assert_close(got["X_var"], x.var(0, unbiased=False).float(), atol=1e-6, rtol=1e-4)


def test_corrupt_statistics_are_set_aside_and_recomputed(tiny_workspace, tmp_path, monkeypatch):
    from selfprune.engine.settings import Calibration
    from selfprune.engine.workbench import Workbench
    from selfprune.storage.store import ArtifactStore

    monkeypatch.setenv("SELFPRUNE_HOME", str(tmp_path / "home"))
    lm = load_model(str(tiny_workspace / "model"), device="cpu")
    calibration = Calibration(str(tiny_workspace / "corpus.txt"), samples=4, seqlen=32)
    first = Workbench(lm, calibration)
    path = first.calibrated.stats_path
    good = path.read_bytes()
    flipped = bytearray(good)
    flipped[-5] ^= 0xFF
    for bad in (good[: len(good) // 2], bytes(flipped)):
        path.write_bytes(bad)
        with pytest.warns(UserWarning, match=f"statistics file {re.escape(str(path))} is corrupt"):
            again = Workbench(lm, calibration)
        assert set(again.calibrated.stats) == set(first.calibrated.stats)
        assert all(torch.equal(again.calibrated.stats[k], first.calibrated.stats[k]) for k in first.calibrated.stats)
        stored = ArtifactStore().get_tensors(first.stats_key)  # recomputed and stored again
        assert all(torch.equal(stored[k], first.calibrated.stats[k]) for k in first.calibrated.stats)
    aside = sorted(path.parent.glob(path.name + ".corrupt-*"))
    assert [p.read_bytes() for p in aside] == [good[: len(good) // 2], bytes(flipped)]  # nothing lost


@pytest.mark.cuda
def test_cuda_bf16_path_matches_cpu(tiny_dir):
    """On a GPU: bf16 model, fp32 statistics, the same rankings' candidates, perplexity close to CPU fp32."""
    gpu = load_model(str(tiny_dir), device="cuda", dtype="auto")
    assert next(gpu.model.parameters()).dtype == torch.bfloat16
    cpu = load_model(str(tiny_dir), device="cpu")
    windows = random_windows(4, 32)
    st = stats.capture(gpu.model, windows)
    assert st["0.attn_in.sq"].dtype == torch.float32
    rankings = wanda_sp.rank(cpu.model, cpu.arch, stats.capture(cpu.model, windows))
    structure = rates_to_structure(cpu.arch, [0.3, 0.5, 0.4, 0.6])
    a = perplexity(slicing.materialize(gpu.model, gpu.arch, rankings, structure), windows).ppl
    b = perplexity(slicing.materialize(cpu.model, cpu.arch, rankings, structure), windows).ppl
    assert a == pytest.approx(b, rel=0.05)


def test_one_dense_model_per_process_whatever_the_batch_size(tiny_workspace):
    """The batch size changes no statistic, so it shares the workbench; other calibrations share the model."""
    from selfprune.engine.settings import Calibration
    from selfprune.engine.shared import shared_model, shared_workbench

    model, corpus = str(tiny_workspace / "model"), str(tiny_workspace / "corpus.txt")
    a = shared_workbench(model, Calibration(corpus, 4, 64, batch_size=2), "cpu")
    assert shared_workbench(model, Calibration(corpus, 4, 64, batch_size=4), "cpu") is a
    other = shared_workbench(model, Calibration(corpus, 8, 64), "cpu")
    assert other is not a and other.stats_key != a.stats_key
    assert other.lm is a.lm is shared_model(model, "cpu")
