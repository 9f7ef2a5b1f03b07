"""Architecture facts of a supported decoder-only model, and parameter accounting.

The attention pruning unit is a whole KV group: one key/value head together with the
``n_heads // n_kv_heads`` query heads that read it. Removing a group slices rows of q/k/v and
columns of o, so the query-to-KV ratio (``num_key_value_groups``) never changes and GQA stays
valid in stock attention code; for MHA models a group is simply one head. MLP units are single
intermediate channels (rows of gate/up, columns of down).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from ..core.errors import UserError

if TYPE_CHECKING:
    import torch

# model_type -> human name. Llama 1/2/3/3.1, Vicuna and SmolLM2 all report model_type "llama".
SUPPORTED = {
    "llama": "Llama 1/2/3/3.1, Vicuna, SmolLM2 (MHA and GQA)",
    "mistral": "Mistral",
    "qwen2": "Qwen2 (biased q/k/v)",
}


@dataclass(frozen=True)
class Arch:
    """The shapes that decide pruning units and their parameter counts (dense model)."""

    model_type: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False

    @property
    def group_size(self) -> int:
        """Query heads per KV group."""
        return self.n_heads // self.n_kv_heads

    @property
    def group_params(self) -> int:
        """Parameters one KV group owns across q, k, v and o (biases included)."""
        q = self.group_size * self.head_dim
        kv = 2 * self.head_dim
        bias = (q + kv) if self.qkv_bias else 0
        return (q + kv) * self.hidden + bias + q * self.hidden

    @property
    def channel_params(self) -> int:
        """Parameters one MLP channel owns across gate, up and down (biases included)."""
        return 3 * self.hidden + (2 if self.mlp_bias else 0)

    @property
    def layer_params(self) -> int:
        """Prunable parameters of one decoder layer (norms and the o/down output biases are kept)."""
        return self.n_kv_heads * self.group_params + self.intermediate * self.channel_params

    def to_dict(self) -> dict:
        return asdict(self)


def arch_of(config) -> Arch:
    """Read an :class:`Arch` from a transformers config, or raise a UserError naming what works."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        names = "; ".join(f"{k} ({v})" for k, v in SUPPORTED.items())
        raise UserError(
            f"unsupported architecture {model_type!r}: selfprune supports {names}. "
            "Use a checkpoint of one of these families."
        )
    n_heads = _size("num_attention_heads", config.num_attention_heads)
    n_kv = _size("num_key_value_heads", getattr(config, "num_key_value_heads", None) or n_heads)
    hidden = _size("hidden_size", config.hidden_size)
    if n_heads % n_kv:
        raise UserError(f"config: num_attention_heads ({n_heads}) is not a multiple of num_key_value_heads ({n_kv}). "
                        "Fix: use the config.json that came with the weights")
    return Arch(
        model_type=model_type,
        n_layers=_size("num_hidden_layers", config.num_hidden_layers),
        hidden=hidden,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=_size("head_dim", getattr(config, "head_dim", None) or hidden // n_heads),
        intermediate=_size("intermediate_size", config.intermediate_size),
        qkv_bias=model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
        o_bias=model_type != "qwen2" and bool(getattr(config, "attention_bias", False)),
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
    )


def _size(field: str, value: object) -> int:
    """A size the config sets: a positive integer, or a UserError naming the field (transformers
    checks some types, not all, and not the sign)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"config field {field} is {value!r}; it must be a positive integer. "
                        "Fix: use the config.json that came with the weights")
    return value


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a causal LM of a supported family (all keep them at ``model.model.layers``)."""
    return model.model.layers
