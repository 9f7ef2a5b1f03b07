"""DeciLM / nemotron-nas export: compatibility rules, config schema and weight mapping (no vLLM)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import build_tiny, byte_tokenizer, random_windows
from safetensors.torch import load_file

from selfprune.core.errors import UserError
from selfprune.export.deci import block_configs, check_deci_dir, deci_compatible, expected_tensors, export_deci, ffn_mult_for, ffn_width
from selfprune.export.hf import save_pruned
from selfprune.methods import slicing, wanda_sp
from selfprune.methods.structure import LayerKeep
from selfprune.model import stats
from selfprune.model.arch import arch_of


def export_tiny(kind: str, structure, out):
    model = build_tiny(kind)
    arch = arch_of(model.config)
    rankings = wanda_sp.rank(model, arch, stats.capture(model, random_windows(4, 32)))
    pruned = slicing.materialize(model, arch, rankings, structure)
    save_pruned(pruned, byte_tokenizer(), out, {"method": "test"})
    return pruned, arch


def reference_logits(deci_dir, ids: torch.Tensor) -> torch.Tensor:
    """A DeciLM forward written from vLLM's DeciLMDecoderLayer semantics, reading only the DeciLM
    config.json and weights: no_op attention skips input_layernorm + attention, no_op ffn skips
    post_attention_layernorm + MLP, num_kv_heads = num_attention_heads // n_heads_in_group."""
    cfg = json.loads((deci_dir / "config.json").read_text())
    w = load_file(str(deci_dir / "model.safetensors"))
    nh, hd, eps = cfg["num_attention_heads"], cfg["head_dim"], cfg["rms_norm_eps"]
    theta = cfg["rope_parameters"]["rope_theta"]
    assert cfg["rope_theta"] == theta  # transformers-4 readers get the same rotary base
    b, t = ids.shape

    def lin(x, name):
        bias = w.get(name + ".bias")
        return F.linear(x, w[name + ".weight"], bias)

    def rms(x, name):
        return w[name] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    inv = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
    freqs = torch.outer(torch.arange(t).float(), inv)
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()

    def rope(x):
        half = torch.cat([-x[..., hd // 2:], x[..., : hd // 2]], -1)
        return x * cos + half * sin

    h = w["model.embed_tokens.weight"][ids]
    for i, block in enumerate(cfg["block_configs"]):
        p = f"model.layers.{i}."
        if not block["attention"]["no_op"]:
            kv = nh // block["attention"]["n_heads_in_group"]
            x = rms(h, p + "input_layernorm.weight")
            q = rope(lin(x, p + "self_attn.q_proj").view(b, t, nh, hd).transpose(1, 2))
            k = rope(lin(x, p + "self_attn.k_proj").view(b, t, kv, hd).transpose(1, 2))
            v = lin(x, p + "self_attn.v_proj").view(b, t, kv, hd).transpose(1, 2)
            k, v = k.repeat_interleave(nh // kv, 1), v.repeat_interleave(nh // kv, 1)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, nh * hd)
            h = h + lin(a, p + "self_attn.o_proj")
        if not block["ffn"]["no_op"]:
            x = rms(h, p + "post_attention_layernorm.weight")
            h = h + lin(F.silu(lin(x, p + "mlp.gate_proj")) * lin(x, p + "mlp.up_proj"), p + "mlp.down_proj")
    h = rms(h, "model.norm.weight")
    return h @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).T


def test_compatibility_rules():
    arch = arch_of(build_tiny("llama_gqa").config)  # 8 query heads, 2 KV groups, MLP 96
    ok, reasons = deci_compatible([[2, 96], [0, 40], [2, 0], [0, 0]], arch)
    assert ok and reasons == []
    ok, reasons = deci_compatible((LayerKeep(2, 96), LayerKeep(1, 96), LayerKeep(2, 96), LayerKeep(1, 10)), arch)
    assert not ok and len(reasons) == 2
    assert reasons[0].startswith("layer 1 keeps 1 of 2 KV groups (4 of 8 query heads)") and "layer 3" in reasons[1]
    ok, reasons = deci_compatible([[0, 0], [0, 96], [2, 96], [2, 96]], arch)  # MLP before any attention
    assert not ok and reasons[0].startswith("layer 1: its MLP would be the first sub-layer")
    ok, reasons = deci_compatible([[0, 96]] * 4, arch)
    assert not ok and any("no layer keeps its attention" in r for r in reasons)
    assert not deci_compatible([[2, 96]] * 3, arch)[0]


def test_block_config_schema_and_ffn_mult():
    arch = arch_of(build_tiny("llama_gqa").config)
    blocks = block_configs([[2, 96], [0, 40], [2, 0], [2, 96]], arch)
    assert blocks[0] == {"attention": {"no_op": False, "replace_with_linear": False, "n_heads_in_group": 4},
                         "ffn": {"no_op": False, "replace_with_linear": False, "intermediate_size": 96}}
    assert blocks[1]["attention"] == {"no_op": True, "replace_with_linear": False}
    assert blocks[2]["ffn"] == {"no_op": True, "replace_with_linear": False}
    # ffn_mult only where vLLM's formula find_multiple(int(2 * mult * hidden / 3), 256) is exact
    assert ffn_mult_for(14336, 4096) == 5.25 and ffn_width(5.25, 4096) == 14336  # Llama-3-8B
    assert ffn_mult_for(1536, 576) == 4.0 and ffn_mult_for(1000, 576) is None
    assert all(ffn_width(ffn_mult_for(n, 4096), 4096) == n for n in range(256, 20000, 256))


@pytest.mark.parametrize("kind", ["llama_gqa", "qwen2"])
def test_export_maps_config_and_weights(kind, tmp_path):
    structure = (LayerKeep(2, 96), LayerKeep(0, 48), LayerKeep(2, 0), LayerKeep(0, 32))
    pruned, arch = export_tiny(kind, structure, tmp_path / "pruned")
    out = export_deci(tmp_path / "pruned", tmp_path / "deci")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "nemotron-nas" and cfg["architectures"] == ["DeciLMForCausalLM"]
    assert cfg["auto_map"] == {"AutoConfig": "configuration_decilm.DeciLMConfig"}
    assert "selfprune_layers" not in cfg and cfg["num_attention_heads"] == arch.n_heads
    assert cfg["block_configs"] == block_configs(structure, arch)
    assert cfg.get("qkv_bias", False) == (kind == "qwen2") and cfg["attention_bias"] is False
    assert (out / "selfprune_record.json").is_file() and not (out / "selfprune.json").exists()
    assert (out / "tokenizer.json").is_file()

    names = set(load_file(str(out / "model.safetensors")))
    assert names == set(expected_tensors(cfg))
    assert "model.layers.1.input_layernorm.weight" not in names  # no_op attention: no norm
    assert "model.layers.2.post_attention_layernorm.weight" not in names  # no_op ffn: no norm
    assert "model.layers.0.self_attn.q_proj.weight" in names
    check_deci_dir(out)

    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = pruned(ids).logits
    torch.testing.assert_close(reference_logits(out, ids), want, atol=1e-4, rtol=1e-4)

    # the config class written beside the weights is what vLLM loads (trust_remote_code=True)
    from transformers import AutoConfig

    loaded = AutoConfig.from_pretrained(out, trust_remote_code=True, local_files_only=True)
    assert loaded.model_type == "nemotron-nas"
    b1, b0 = loaded.block_configs[1], loaded.block_configs[0]
    assert b1.attention.no_op and not b0.attention.no_op
    assert loaded.num_attention_heads // b0.attention.n_heads_in_group == arch.n_kv_heads
    assert b1.ffn.intermediate_size == 48 and not hasattr(b1.ffn, "ffn_mult")
    assert json.loads(loaded.to_json_string())["block_configs"] == cfg["block_configs"]


def test_export_refuses_partial_groups(tmp_path):
    export_tiny("llama_gqa", (LayerKeep(2, 96), LayerKeep(1, 48), LayerKeep(2, 96), LayerKeep(1, 96)), tmp_path / "p")
    with pytest.raises(UserError, match=r"(?s)cannot be written as DeciLM.*layer 1 keeps 1 of 2.*layer 3 keeps 1 of 2"):
        export_deci(tmp_path / "p", tmp_path / "deci")
    assert not (tmp_path / "deci").exists()


def test_check_detects_a_bad_export(tmp_path):
    export_tiny("llama_mha", (LayerKeep(4, 96),) * 4, tmp_path / "p")
    out = export_deci(tmp_path / "p", tmp_path / "deci")
    cfg = json.loads((out / "config.json").read_text())
    cfg["block_configs"][0]["ffn"]["intermediate_size"] = 64
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="wrong shape: model.layers.0.mlp"):
        check_deci_dir(out)
