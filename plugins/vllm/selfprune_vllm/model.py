"""A Llama / Qwen2 decoder whose layers each have their own query heads, KV heads and MLP width.

A selfprune export's ``config.json`` is the base model's config plus ``selfprune_layers``: per
decoder layer ``[kept KV groups, kept MLP channels]``. A layer keeps ``groups * (heads / kv_heads)``
query heads and ``groups`` KV heads; zero groups means no attention sub-layer (and no KV cache for
it), zero channels no MLP. Each layer is built from vLLM's own Llama parts (``LlamaAttention`` with
its stacked QKV projection, rotary embedding and paged attention; ``LlamaMLP`` with its stacked
gate/up projection), so kernels, caching and tensor parallelism are vLLM's. Qwen2 differs only in
its biased q/k/v projections.

The weights keep Hugging Face's Llama names; vLLM's loader stacks q/k/v and gate/up itself. The
norms of removed sub-layers are in the export (selfprune keeps the module tree) and are skipped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP
from vllm.model_executor.models.utils import extract_layer_index

_LAYER_WEIGHT = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class RemovedSublayer(nn.Module):
    """A removed sub-layer whose output projection had a bias: it adds that constant and nothing else."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(hidden_size), requires_grad=False)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        residual = hidden_states if residual is None else residual + hidden_states
        return self.bias.to(residual.dtype).expand_as(residual), residual


def layer_shapes(config) -> list[tuple[int, int]]:
    """Per layer (kept KV groups, kept MLP channels), checked against the base model's sizes."""
    layers = getattr(config, "selfprune_layers", None)
    if not isinstance(layers, list) or len(layers) != config.num_hidden_layers:
        raise ValueError("config.json has no selfprune_layers with one [groups, channels] entry per layer: "
                         "this is not a selfprune export (make one with `selfprune prune --out DIR`)")
    shapes = [(int(g), int(c)) for g, c in layers]
    if not any(g for g, _ in shapes):
        raise ValueError("this export keeps no attention in any layer; vLLM cannot size a KV cache for it")
    return shapes


class SelfpruneDecoderLayer(nn.Module):
    """One decoder layer at its own widths; a sub-layer with nothing kept is skipped outright."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        groups, channels = layer_shapes(config)[extract_layer_index(prefix)]
        hidden = config.hidden_size
        qwen2 = config.model_type == "qwen2"
        attention_bias = bool(getattr(config, "attention_bias", False))
        self.self_attn: nn.Module | None = None
        self.mlp: nn.Module | None = None
        if groups:
            self.self_attn = LlamaAttention(
                config=config,
                hidden_size=hidden,
                num_heads=groups * (config.num_attention_heads // config.num_key_value_heads),
                num_kv_heads=groups,
                max_position_embeddings=getattr(config, "max_position_embeddings", 8192),
                quant_config=vllm_config.quant_config,
                bias=qwen2 or attention_bias,
                bias_o_proj=not qwen2 and attention_bias,
                cache_config=vllm_config.cache_config,
                prefix=f"{prefix}.self_attn",
            )
            self.input_layernorm = RMSNorm(hidden, eps=config.rms_norm_eps)
        elif attention_bias and not qwen2:
            self.self_attn = RemovedSublayer(hidden)
        mlp_bias = bool(getattr(config, "mlp_bias", False))
        if channels:
            self.mlp = LlamaMLP(hidden, channels, config.hidden_act, quant_config=vllm_config.quant_config,
                                bias=mlp_bias, prefix=f"{prefix}.mlp")
            self.post_attention_layernorm = RMSNorm(hidden, eps=config.rms_norm_eps)
        elif mlp_bias:
            self.mlp = RemovedSublayer(hidden)

    @staticmethod
    def _normed(norm: RMSNorm, hidden_states: torch.Tensor, residual: torch.Tensor | None):
        """Fold the previous output into the residual and normalize (vLLM's fused add-RMSNorm)."""
        if residual is None:
            return norm(hidden_states), hidden_states
        return norm(hidden_states, residual)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(self.self_attn, RemovedSublayer):
            hidden_states, residual = self.self_attn(hidden_states, residual)
        elif self.self_attn is not None:
            hidden_states, residual = self._normed(self.input_layernorm, hidden_states, residual)
            hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        if isinstance(self.mlp, RemovedSublayer):
            hidden_states, residual = self.mlp(hidden_states, residual)
        elif self.mlp is not None:
            hidden_states, residual = self._normed(self.post_attention_layernorm, hidden_states, residual)
            hidden_states = self.mlp(hidden_states)
        return hidden_states, residual


class SelfpruneForCausalLM(LlamaForCausalLM):
    """vLLM's Llama causal LM with :class:`SelfpruneDecoderLayer` layers."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        layer_shapes(config)
        if getattr(config, "head_dim", None) is None:  # LlamaAttention would divide by the pruned head count
            config.head_dim = config.hidden_size // config.num_attention_heads
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=SelfpruneDecoderLayer)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(w for w in weights if self._kept(w[0]))

    def _kept(self, name: str) -> bool:
        """False for the norm of a removed sub-layer: selfprune's export keeps it, vLLM has no place for it."""
        m = _LAYER_WEIGHT.match(name)
        if not m:
            return True
        layer = self.model.layers[int(m.group(1))]
        rest = m.group(2)
        if rest.startswith("input_layernorm."):
            return isinstance(layer.self_attn, LlamaAttention)
        if rest.startswith("post_attention_layernorm."):
            return isinstance(layer.mlp, LlamaMLP)
        return True
