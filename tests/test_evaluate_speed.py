"""Speed / memory measurement and generation on tiny dense and pruned models."""

from __future__ import annotations

import pytest
import torch
from helpers import build_tiny, byte_tokenizer, random_windows

from selfprune.core.errors import UserError
from selfprune.evaluate.speed import format_measurement, measure, weight_stats
from selfprune.methods import slicing, wanda_sp
from selfprune.methods.structure import LayerKeep
from selfprune.model import stats
from selfprune.model.arch import arch_of

# _cached_vs_full passes past_key_values (the name every transformers 4.56-5.x accepts)
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")

FIELDS = {
    "backend", "device", "dtype", "params", "weight_bytes", "kv_cache_bytes_per_token", "peak_memory_bytes",
    "peak_memory_delta_bytes", "peak_memory_method", "prefill_s", "prefill_tokens_per_s", "generate_s",
    "generate_tokens_per_s", "decode_tokens_per_s", "prompt_tokens", "new_tokens", "batch_size", "repeats",
    "torch_version", "threads",
}


@pytest.fixture(scope="module")
def tiny():
    model = build_tiny("llama_gqa")
    arch = arch_of(model.config)
    rankings = wanda_sp.rank(model, arch, stats.capture(model, random_windows(4, 32)))
    return model, arch, rankings


def test_measure_dense_and_pruned(tiny):
    model, arch, rankings = tiny
    # layer 1: attention fully removed; layer 3: MLP fully removed; layer 2 narrower
    pruned = slicing.materialize(model, arch, rankings,
                                 (LayerKeep(2, 96), LayerKeep(0, 48), LayerKeep(1, 32), LayerKeep(2, 0)))
    tok = byte_tokenizer()
    results = {}
    for name, m in (("dense", model), ("pruned", pruned)):
        r = measure(m, tok, prompt_tokens=16, new_tokens=4, batch_size=2, repeats=2, device="cpu")
        assert set(r) == FIELDS
        assert r["prefill_tokens_per_s"] > 0 and r["generate_tokens_per_s"] > 0
        assert r["peak_memory_bytes"] > 0 and r["peak_memory_method"]
        assert r["new_tokens"] == 4 and r["batch_size"] == 2
        print(name, format_measurement(r))
        results[name] = r
    d, p = results["dense"], results["pruned"]
    assert p["params"] < d["params"] and p["weight_bytes"] < d["weight_bytes"]
    assert d["params"] == sum(t.numel() for t in model.parameters())
    # K+V bytes per token: dense 4 layers x 2 groups; pruned 2 + 0 + 1 + 2 groups (head_dim 8, fp32)
    assert d["kv_cache_bytes_per_token"] == 4 * 2 * 2 * 8 * 4
    assert p["kv_cache_bytes_per_token"] == (2 + 0 + 1 + 2) * 2 * 8 * 4


def test_weight_stats_counts_tied_once():
    model = build_tiny("llama_mha")
    n, b = weight_stats(model)
    model.lm_head.weight = model.model.embed_tokens.weight
    n2, b2 = weight_stats(model)
    assert n2 == n - model.lm_head.weight.numel() and b2 == 4 * n2


def _cached_vs_full(model) -> float:
    """Largest logit difference between a full forward and prefill + one cached decode step."""
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        step = model(ids[:, :-1], use_cache=True)
        cache = getattr(step, "past_key_values", None) or getattr(step, "cache", None)
        last = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1]
    return (full - last).abs().max().item()


def test_generate_with_removed_attention(tiny):
    model, arch, rankings = tiny
    pruned = slicing.materialize(model, arch, rankings,
                                 (LayerKeep(2, 96), LayerKeep(0, 96), LayerKeep(2, 48), LayerKeep(0, 0)))
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    out = pruned.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                          do_sample=False, pad_token_id=0)
    assert out.shape == (2, 16)
    assert _cached_vs_full(pruned) < 1e-4  # the KV cache gives the same logits as a full forward


def test_cache_positions_when_layer0_attention_removed(tiny):
    """Cache bookkeeping reads the sequence length from layer 0, even when its attention is gone."""
    model, arch, rankings = tiny
    pruned = slicing.materialize(model, arch, rankings, (LayerKeep(0, 96),) + (LayerKeep(2, 96),) * 3)
    assert _cached_vs_full(pruned) < 1e-4


def test_measure_rejects_bad_settings(tiny):
    model = tiny[0]
    with pytest.raises(UserError):
        measure(model, None, new_tokens=0)
    with pytest.raises(UserError, match="model is on cpu"):
        measure(model, None, device="cuda:0")
