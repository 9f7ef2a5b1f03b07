"""Convert a selfprune export to the DeciLM / nemotron-nas layout that vLLM serves natively.

vLLM's ``DeciLMForCausalLM`` (``vllm/model_executor/models/nemotron_nas.py``; model_type
``nemotron-nas``, e.g. nvidia/Llama-3_1-Nemotron-51B, Llama-3_3-Nemotron-Super-49B) builds each
decoder layer from ``config.block_configs[i]``:

* ``attention.no_op``: the layer has no attention and no ``input_layernorm``. Otherwise
  ``num_kv_heads = num_attention_heads // attention.n_heads_in_group`` and the number of QUERY
  heads is the global ``num_attention_heads``. selfprune removes whole KV groups together with
  their query heads, so a layer that keeps some but not all groups has fewer query heads than the
  global count: it has no DeciLM form. Only "all groups" and "no groups" (``no_op``) are held.
* ``ffn.no_op``: no MLP and no ``post_attention_layernorm``. Otherwise the width is
  ``_find_multiple(int(2 * ffn_mult * hidden / 3), 256)`` if the ffn config object HAS an
  ``ffn_mult`` attribute, else ``ffn.intermediate_size``. NVIDIA's own config code always gives the
  object ``ffn_mult`` (rounded to 6 decimals), so with it only multiples of 256 are expressible.
  The ``configuration_decilm.py`` written here is selfprune's own: its ffn objects carry exactly
  the keys of ``config.json``, and ``config.json`` holds ``intermediate_size`` always and
  ``ffn_mult`` only where that formula gives the width back exactly. So every per-layer MLP width
  is held (through ``intermediate_size``), and older readers that only know ``ffn_mult`` see it
  where it is exact.
* vLLM's layer passes ``residual=None`` to a fused add-RMSNorm when the MLP of a layer is the first
  sub-layer to run (all attention before it removed); that returns a single tensor and the layer
  fails, so an MLP before the first kept attention is refused too. A model with no attention at all
  is refused (vLLM cannot size its KV cache).

Weight names are the Llama names vLLM's loader expects (``model.layers.i.self_attn.q_proj.weight``
...; it stacks q/k/v and gate/up itself), so the conversion keeps the names and drops the norms of
``no_op`` sub-layers (and rotary buffers). Qwen2 maps to ``qkv_bias: true`` with no o_proj bias.
``config.json`` needs ``trust_remote_code=True`` (transformers has no nemotron-nas config class);
it carries both ``rope_parameters`` (transformers 5) and ``rope_theta`` / ``rope_scaling``
(transformers 4), so the rotary embedding is right under either.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..methods.structure import LayerKeep
from ..model.arch import Arch, arch_of
from ..model.checkpoint import read_config
from ..model.headers import check_config, tensor_shapes
from ..storage.fileio import atomic_path, atomic_write_text
from ..storage.userfiles import read_json
from .hf import kept_widths

CONFIG_MODULE = "configuration_decilm"
WEIGHT_SKIP = re.compile(r"rotary_emb\.inv_freq$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Files of a selfprune export that are not weights and are not copied as they are.
_NOT_COPIED = {"config.json", "model.safetensors.index.json", "selfprune.json"}

CONFIG_PY = '''"""DeciLM (model_type nemotron-nas) configuration, written by selfprune's export_deci.

``block_configs`` entries become attribute objects holding exactly the keys of config.json, so
``hasattr(block.ffn, "ffn_mult")`` is true only where config.json gives ``ffn_mult``.
"""

from transformers import LlamaConfig


class _Entry:
    def __init__(self, **fields):
        self.no_op = False
        self.replace_with_linear = False
        self.__dict__.update(fields)

    def to_dict(self):
        return dict(self.__dict__)

    def __repr__(self):
        return f"{type(self).__name__}({self.__dict__})"


class AttentionConfig(_Entry):
    pass


class FFNConfig(_Entry):
    pass


class BlockConfig:
    def __init__(self, attention=None, ffn=None, **extra):
        self.attention = attention if isinstance(attention, _Entry) else AttentionConfig(**(attention or {}))
        self.ffn = ffn if isinstance(ffn, _Entry) else FFNConfig(**(ffn or {}))
        self.__dict__.update(extra)

    def to_dict(self):
        out = {k: v for k, v in self.__dict__.items() if k not in ("attention", "ffn")}
        return {"attention": self.attention.to_dict(), "ffn": self.ffn.to_dict(), **out}

    def __repr__(self):
        return f"BlockConfig({self.to_dict()})"


def _blocks(items):
    return [b if isinstance(b, BlockConfig) else BlockConfig(**b) for b in (items or [])]


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        super().__init__(**kwargs)
        self.block_configs = _blocks(block_configs)

    def to_dict(self):
        out = super().to_dict()
        out["block_configs"] = [b.to_dict() for b in _blocks(out.get("block_configs"))]
        return out
'''


def _find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def ffn_width(ffn_mult: float, hidden: int) -> int:
    """The MLP width vLLM (and NVIDIA's DeciLM code) derives from ``ffn_mult``."""
    return _find_multiple(int(2 * ffn_mult * hidden / 3), 256)


def ffn_mult_for(intermediate: int, hidden: int) -> float | None:
    """The ``ffn_mult`` (6 decimals, as NVIDIA's config rounds it) that gives exactly
    ``intermediate`` back, or ``None`` when none does (widths that are not multiples of 256)."""
    mult = round(1.5 * intermediate / hidden, 6)
    return mult if ffn_width(mult, hidden) == intermediate else None


def _layers(structure) -> list[tuple[int, int]]:
    out = []
    for k in structure:
        out.append((k.groups, k.channels) if isinstance(k, LayerKeep) else (int(k[0]), int(k[1])))
    return out


def _arch(arch_or_config) -> Arch:
    return arch_or_config if isinstance(arch_or_config, Arch) else arch_of(arch_or_config)


def deci_compatible(structure: Sequence, arch: Arch | Any) -> tuple[bool, list[str]]:
    """Whether ``structure`` (LayerKeep tuples, or ``config.selfprune_layers`` pairs of kept KV
    groups and kept MLP channels) has a DeciLM form vLLM can load, and if not, why per layer.

    ``arch``: the dense model's :class:`~selfprune.model.arch.Arch` (or its transformers config).
    """
    a = _arch(arch)
    layers = _layers(structure)
    reasons: list[str] = []
    if len(layers) != a.n_layers:
        return False, [f"the structure has {len(layers)} layers but the model has {a.n_layers}"]
    partial = [(i, g) for i, (g, _) in enumerate(layers) if 0 < g < a.n_kv_heads]
    for i, g in partial:
        reasons.append(
            f"layer {i} keeps {g} of {a.n_kv_heads} KV groups ({g * a.group_size} of {a.n_heads} query "
            f"heads); DeciLM's query-head count is global (num_attention_heads = {a.n_heads}), so only "
            f"all {a.n_kv_heads} groups or none (no_op) can be written"
        )
    for i, (g, c) in enumerate(layers):
        if g == 0 and a.o_bias:
            reasons.append(f"layer {i}: its removed attention keeps o_proj's bias, which a no_op attention cannot hold")
        if c == 0 and a.mlp_bias:
            reasons.append(f"layer {i}: its removed MLP keeps down_proj's bias, which a no_op FFN cannot hold")
    if all(g == 0 for g, _ in layers):
        reasons.append("no layer keeps its attention: vLLM cannot size a KV cache for a DeciLM model without one")
    else:
        first_attention = next(i for i, (g, _) in enumerate(layers) if g > 0)
        early = [i for i, (_, c) in enumerate(layers[:first_attention]) if c > 0]
        if early:
            reasons.append(
                f"layer {early[0]}: its MLP would be the first sub-layer to run (attention removed in layers "
                f"0..{first_attention - 1}); vLLM's DeciLM layer then calls its add-RMSNorm with residual=None, "
                f"which returns one tensor where the layer unpacks two"
            )
    return not reasons, reasons


def block_configs(structure: Sequence, arch: Arch | Any) -> list[dict]:
    """The ``block_configs`` list for a compatible structure (see :func:`deci_compatible`)."""
    a = _arch(arch)
    blocks = []
    for g, c in _layers(structure):
        attention = {"no_op": g == 0, "replace_with_linear": False}
        if g:  # all KV groups kept (deci_compatible): the dense query-to-KV ratio
            attention["n_heads_in_group"] = a.group_size
        ffn: dict[str, Any] = {"no_op": c == 0, "replace_with_linear": False}
        if c:
            ffn["intermediate_size"] = c
            mult = ffn_mult_for(c, a.hidden)
            if mult is not None:
                ffn["ffn_mult"] = mult
        blocks.append({"attention": attention, "ffn": ffn})
    return blocks


def _legacy_rope(cfg: dict) -> dict:
    """``rope_theta`` / ``rope_scaling`` (transformers 4 names) from ``rope_parameters``."""
    params = cfg.get("rope_parameters")
    if not isinstance(params, dict):
        return {}
    out: dict[str, Any] = {}
    if "rope_theta" in params:
        out["rope_theta"] = params["rope_theta"]
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    out["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
    return out


def deci_config(base: dict, structure: Sequence, arch: Arch | Any) -> dict:
    """The DeciLM ``config.json`` for a dense config dict ``base`` and a compatible structure."""
    a = _arch(arch)
    cfg = {k: v for k, v in base.items() if k not in ("selfprune_layers", "auto_map", "architectures", "model_type")}
    for key, value in _legacy_rope(base).items():
        cfg.setdefault(key, value)
    cfg.update({
        "architectures": ["DeciLMForCausalLM"],
        "model_type": "nemotron-nas",
        "auto_map": {"AutoConfig": f"{CONFIG_MODULE}.DeciLMConfig"},
        "block_configs": block_configs(structure, a),
        "head_dim": a.head_dim,
        "num_key_value_heads": a.n_kv_heads,
        "attention_bias": a.o_bias,
    })
    if a.qkv_bias and not a.o_bias:  # Qwen2: biased q/k/v, unbiased o
        cfg["qkv_bias"] = True
    return cfg


def deci_tensor_name(name: str, structure: Sequence) -> str | None:
    """The DeciLM checkpoint name of a selfprune tensor, or ``None`` when it is dropped."""
    if WEIGHT_SKIP.search(name):
        return None
    m = _LAYER.match(name)
    if m is None:
        return name
    g, c = _layers(structure)[int(m.group(1))]
    rest = m.group(2)
    if g == 0 and (rest.startswith("input_layernorm.") or rest.startswith("self_attn.")):
        return None
    if c == 0 and (rest.startswith("post_attention_layernorm.") or rest.startswith("mlp.")):
        return None
    return name


def expected_tensors(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape vLLM's DeciLMForCausalLM loads for a DeciLM ``config.json``,
    following its module construction (``block_configs``, the ``ffn_mult`` / ``intermediate_size``
    rule, ``qkv_bias`` / ``attention_bias``, tied embeddings). Used to check an export offline."""
    h, nh, vocab = config["hidden_size"], config["num_attention_heads"], config["vocab_size"]
    hd = config.get("head_dim") or h // nh
    attention_bias = bool(config.get("attention_bias") or config.get("bias"))
    qkv_bias = bool(config["qkv_bias"]) if "qkv_bias" in config else attention_bias
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    if not config.get("tie_word_embeddings", False):
        out["lm_head.weight"] = (vocab, h)
    for i, block in enumerate(config["block_configs"]):
        p = f"model.layers.{i}."
        att, ffn = block["attention"], block["ffn"]
        if not att["no_op"]:
            kv = nh // att["n_heads_in_group"]
            out[p + "input_layernorm.weight"] = (h,)
            out[p + "self_attn.q_proj.weight"] = (nh * hd, h)
            out[p + "self_attn.k_proj.weight"] = (kv * hd, h)
            out[p + "self_attn.v_proj.weight"] = (kv * hd, h)
            out[p + "self_attn.o_proj.weight"] = (h, nh * hd)
            if qkv_bias:
                out.update({p + "self_attn.q_proj.bias": (nh * hd,), p + "self_attn.k_proj.bias": (kv * hd,),
                            p + "self_attn.v_proj.bias": (kv * hd,)})
            if attention_bias:
                out[p + "self_attn.o_proj.bias"] = (h,)
        if not ffn["no_op"]:
            width = ffn_width(ffn["ffn_mult"], h) if "ffn_mult" in ffn else ffn["intermediate_size"]
            out[p + "post_attention_layernorm.weight"] = (h,)
            out[p + "mlp.gate_proj.weight"] = (width, h)
            out[p + "mlp.up_proj.weight"] = (width, h)
            out[p + "mlp.down_proj.weight"] = (h, width)
            if config.get("mlp_bias"):
                out.update({p + "mlp.gate_proj.bias": (width,), p + "mlp.up_proj.bias": (width,),
                            p + "mlp.down_proj.bias": (h,)})
    return out


def check_deci_dir(path: Path) -> None:
    """Raise UserError unless the weights in ``path`` are exactly what vLLM would load for its
    ``config.json`` (names and shapes; only the safetensors headers are read)."""
    from safetensors import safe_open

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    want = expected_tensors(config)
    have: dict[str, tuple[int, ...]] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                have[key] = tuple(fh.get_slice(key).get_shape())
    if config.get("tie_word_embeddings", False):
        have.pop("lm_head.weight", None)
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or extra or wrong:
        detail = "; ".join(f"{label}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
                           for label, keys in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong)) if keys)
        raise UserError(f"{path} does not match its DeciLM config ({detail}); re-export it")


def export_deci(pruned_export_dir: Path, out_dir: Path) -> Path:
    """Write ``out_dir``: a DeciLM (nemotron-nas) checkpoint of the selfprune export
    ``pruned_export_dir`` (a dense Hugging Face directory works too: every layer full).

    Serve it with ``vllm.LLM(model=out_dir, trust_remote_code=True)``. Raises UserError listing the
    layers that cannot be held (see :func:`deci_compatible`). Weights are streamed shard by shard;
    the export's ``selfprune.json`` is kept as ``selfprune_record.json``.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = Path(pruned_export_dir).expanduser().resolve()
    out = Path(out_dir).expanduser().resolve()
    if not (src / "config.json").is_file():
        raise UserError(f"{src} has no config.json; give a selfprune export directory (save_pruned / prune --out)")
    if out == src:
        raise UserError("the DeciLM export needs its own directory; give an out_dir other than the source")
    base = read_json(src / "config.json", "model config", "a selfprune export directory")
    config = read_config(str(src), str(src), local_files_only=True)
    arch = arch_of(config)
    widths = kept_widths(base["selfprune_layers"], arch, src) if base.get("selfprune_layers") else None
    check_config(arch, getattr(config, "vocab_size", None), tensor_shapes(src), f"{src}/config.json", widths)
    structure = [list(w) for w in widths] if widths else [[arch.n_kv_heads, arch.intermediate]] * arch.n_layers
    ok, reasons = deci_compatible(structure, arch)
    if not ok:
        raise UserError(
            f"{src} cannot be written as DeciLM / nemotron-nas for vLLM:\n  - " + "\n  - ".join(reasons)
            + "\nFix: search with whole-layer attention removal only (each layer keeps all KV groups or none), "
            "or serve it with transformers (selfprune.load_pruned) or a vLLM model plugin"
        )
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise UserError(f"no .safetensors weights in {src}; re-export the model with save_pruned")
    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for shard in shards:
        tensors = {}
        with safe_open(str(shard), framework="pt") as fh:
            for key in fh.keys():
                name = deci_tensor_name(key, structure)
                if name is not None:
                    tensors[name] = fh.get_tensor(key).contiguous()
        with atomic_path(out / shard.name) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        weight_map.update({k: shard.name for k in tensors})
    if len(shards) > 1:
        total = sum((out / s.name).stat().st_size for s in shards)
        atomic_write_text(out / "model.safetensors.index.json",
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    atomic_write_text(out / "config.json", json.dumps(deci_config(base, structure, arch), indent=2, sort_keys=False))
    atomic_write_text(out / f"{CONFIG_MODULE}.py", CONFIG_PY)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in _NOT_COPIED:
            shutil.copy2(f, out / f.name)
    if (src / "selfprune.json").is_file():
        shutil.copy2(src / "selfprune.json", out / "selfprune_record.json")
    check_deci_dir(out)
    return out
