"""A selfprune export as one GGUF file for llama.cpp (and Ollama, LM Studio, llama-cpp-python).

llama.cpp's ``deci`` architecture reads per-layer head counts and feed-forward widths
(``deci.attention.head_count``, ``..head_count_kv``, ``deci.feed_forward_length``: one value per
layer), and runs layers without attention and without a feed-forward network, as Nemotron-51B needs:
every structure selfprune produces has a GGUF form. The file is written with the ``gguf`` package's
writer (f32 or f16) and quantized by llama.cpp's own quantizer through llama-cpp-python.

Three facts of llama.cpp's ``deci`` graph (llama-cpp-python 0.3.36, ``src/models/deci.cpp``) decide
how a removed unit is written, so the file computes exactly what the export does:

* It reads the head size from layer 0's head count: a first layer without attention keeps one
  all-zero KV group (its output is zero).
* It skips the rest of a layer whose feed-forward width is 0, that layer's attention output with it,
  and on the last layer the selection of output rows: an MLP removed from a layer that keeps its
  attention, or from the last layer, is written as one all-zero channel (its output is zero).
* It has no bias for a removed unit: a removed attention or MLP whose output bias the export keeps
  (``attention_bias`` / ``mlp_bias`` models) is written as one zero unit with that bias.

Each zero unit costs one head's or one channel's weights. Rotary embeddings are interleaved in
llama.cpp, so Q and K (and their biases) are permuted per layer, with that layer's head counts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..core.errors import UserError
from ..model.arch import Arch, arch_of
from ..model.checkpoint import read_config
from .hf import RECORD, kept_widths
from .llamacpp import llamacpp_quantize

QUANTS = ("f32", "f16", "q8_0", "q4_k_m")
ARCH = "deci"
PRE_DEFAULT = "default"  # llama.cpp's pre-tokenizer when the export's own is not known


@dataclass(frozen=True)
class Widths:
    """One layer as written: query heads, KV heads, feed-forward channels; and which of them are a
    zero unit standing for a removed attention or MLP."""

    heads: int
    kv_heads: int
    ff: int
    zero_attention: bool = False
    zero_mlp: bool = False


def layer_widths(kept: list[tuple[int, int]], arch: Arch, biases: set[str]) -> list[Widths]:
    """Per layer, what the file holds for the export's kept (KV groups, channels); ``biases``: the
    layers (``"attn.i"``, ``"mlp.i"``) whose removed unit keeps an output bias."""
    out = []
    last = len(kept) - 1
    for i, (groups, channels) in enumerate(kept):
        zero_attention = groups == 0 and (i == 0 or f"attn.{i}" in biases)
        has_attention = groups > 0 or zero_attention
        zero_mlp = channels == 0 and (has_attention or i == last or f"mlp.{i}" in biases)
        g = 1 if zero_attention else groups
        out.append(Widths(g * arch.group_size, g, 1 if zero_mlp else channels, zero_attention, zero_mlp))
    return out


def rope(config: dict) -> tuple[float, dict]:
    """The rotary base and the scaling (``rope_type`` and its fields), as transformers 5 writes them
    (``rope_parameters``) or 4 did (``rope_theta``, ``rope_scaling``)."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", config.get("rope_theta", 10000.0)))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return theta, params


def check_gguf_export(export_dir: Path, quant: str) -> tuple[dict, Arch, list[tuple[int, int]]]:
    """Every check that needs no weights, before anything is written: an export (or a dense model
    directory), a family and features llama.cpp's ``deci`` expresses, a known quantization (and
    llama-cpp-python for one). Returns the config, the shapes and each layer's kept units."""
    export_dir = Path(export_dir)
    if quant not in QUANTS:
        raise UserError(f"--quant {quant}: use one of {', '.join(QUANTS)}")
    if not (export_dir / "config.json").is_file():
        raise UserError(f"{export_dir} is neither a selfprune export nor a model directory (no config.json): give "
                        "the directory of selfprune prune --out DIR, or a dense model's")
    config = json.loads((export_dir / "config.json").read_text())
    arch = arch_of(read_config(str(export_dir), str(export_dir), local_files_only=True))
    if (export_dir / RECORD).is_file() and "selfprune_layers" in config:
        kept = kept_widths(config["selfprune_layers"], arch, export_dir)
    else:  # a dense model (its directory, or exported as it is): every unit kept
        kept = [(arch.n_kv_heads, arch.intermediate)] * arch.n_layers
    if config.get("hidden_act", "silu") != "silu":
        raise UserError(f"{export_dir}: hidden_act {config['hidden_act']!r}; llama.cpp's deci runs SiLU MLPs only")
    kind = rope(config)[1]["rope_type"]
    if kind not in ("default", "linear", "llama3"):
        raise UserError(f"{export_dir}: rope scaling {kind!r} has no GGUF form here (default, linear and llama3 do)")
    if not (export_dir / "tokenizer.json").is_file():
        raise UserError(f"{export_dir} has no tokenizer.json: a GGUF carries its tokenizer (a fast BPE tokenizer; "
                        "SentencePiece tokenizer.model files are not written yet)")
    tokenizer = json.loads((export_dir / "tokenizer.json").read_text())
    if tokenizer.get("model", {}).get("type") != "BPE" or tokenizer["model"].get("byte_fallback"):
        raise UserError(f"{export_dir}/tokenizer.json is not a byte-level BPE tokenizer: only those are written to "
                        "GGUF here (Llama 3, SmolLM2, Qwen2, Mistral Nemo); SentencePiece ones are not yet")
    if not tokenizer["model"].get("merges"):
        raise UserError(f"{export_dir}/tokenizer.json has no merges: llama.cpp loads a BPE vocabulary with its merges only")
    if quant not in ("f32", "f16"):
        _quantizer()
    return config, arch, kept


def _quantizer() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        raise UserError("--quant q8_0 / q4_k_m quantize with llama.cpp's own quantizer: pip install "
                        "'selfprune[llm-server]' (llama-cpp-python); f32 and f16 need nothing more")


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Q or K (or its bias) from rotate-half order (transformers) to llama.cpp's interleaved pairs."""
    if heads == 0:
        return w
    shape = w.shape
    return w.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _state(export_dir: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(export_dir).glob("*.safetensors")):
        state.update(load_file(str(f)))
    return {k: v.float() for k, v in state.items()}


def _layer_tensors(state: dict[str, torch.Tensor], i: int, w: Widths, arch: Arch) -> dict[str, torch.Tensor]:
    """The HF-named tensors of layer ``i`` as the file holds them: zero units added, Q and K permuted."""
    p, hidden, d = f"model.layers.{i}.", arch.hidden, arch.head_dim
    t = {k[len(p):]: v for k, v in state.items() if k.startswith(p)}
    out: dict[str, torch.Tensor] = {}  # llama.cpp refuses a file with a tensor it does not read: norms only where used
    if w.heads:
        out["input_layernorm.weight"] = t["input_layernorm.weight"]
    if w.ff:
        out["post_attention_layernorm.weight"] = t["post_attention_layernorm.weight"]
    if w.zero_attention:
        for name, rows in (("q_proj", w.heads * d), ("k_proj", d), ("v_proj", d)):
            out[f"self_attn.{name}.weight"] = torch.zeros(rows, hidden)
            if arch.qkv_bias:
                out[f"self_attn.{name}.bias"] = torch.zeros(rows)
        out["self_attn.o_proj.weight"] = torch.zeros(hidden, w.heads * d)
        if "self_attn.bias" in t:
            out["self_attn.o_proj.bias"] = t["self_attn.bias"]
    elif w.heads:
        out |= {k: v for k, v in t.items() if k.startswith("self_attn.")}
        for name, heads in (("q_proj", w.heads), ("k_proj", w.kv_heads)):
            for part in ("weight", "bias"):
                if f"self_attn.{name}.{part}" in out:
                    out[f"self_attn.{name}.{part}"] = _permute(out[f"self_attn.{name}.{part}"], heads)
    if w.zero_mlp:
        out |= {"mlp.gate_proj.weight": torch.zeros(1, hidden), "mlp.up_proj.weight": torch.zeros(1, hidden),
                "mlp.down_proj.weight": torch.zeros(hidden, 1)}
        if arch.mlp_bias:
            out |= {"mlp.gate_proj.bias": torch.zeros(1), "mlp.up_proj.bias": torch.zeros(1)}
        if "mlp.bias" in t:
            out["mlp.down_proj.bias"] = t["mlp.bias"]
    elif w.ff:
        out |= {k: v for k, v in t.items() if k.startswith("mlp.") and "_proj." in k}
    return {p + k: v for k, v in out.items()}


def _rope_freqs(base: float, scaling: dict, head_dim: int) -> torch.Tensor:
    """Llama 3's per-frequency divisors of its rope scaling (the long-wavelength ones slowed by
    ``factor``, a smooth blend between), as llama.cpp's ``rope_freqs`` tensor."""
    freqs = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    factor, low, high = scaling["factor"], scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * torch.pi / freqs
    smooth = ((old / wavelen - low) / (high - low)).clamp(0, 1)
    divisor = 1 / ((1 - smooth) / factor + smooth)
    divisor = torch.where(wavelen < old / high, torch.ones_like(wavelen), divisor)
    divisor = torch.where(wavelen > old / low, torch.full_like(wavelen, factor), divisor)
    return divisor.float()


def _tokenizer(writer, export_dir: Path, n_vocab: int, pre: str) -> None:
    """The export's byte-level BPE tokenizer: tokens by id (special added tokens as control tokens,
    rows beyond the tokenizer's as unused padding), merges, special ids, chat template."""
    import gguf

    tok = json.loads((export_dir / "tokenizer.json").read_text())
    by_id = {i: t for t, i in tok["model"]["vocab"].items()}
    types = {}
    for added in tok.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    token_types = [types.get(i, gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED) for i in range(n_vocab)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    gguf.SpecialVocab(export_dir, load_merges=True, n_vocab=n_vocab).add_to_gguf(writer)


def tokenizer_pre(model_dir: Path) -> str:
    """llama.cpp's name for how text is split before BPE (``tokenizer.ggml.pre``): the base model's
    own where it came from a GGUF (the demo model did: its GGUF stays beside it), else ``default``."""
    import gguf

    from ..data.demo import SOURCE_FILE, demo_gguf_path

    record = Path(model_dir) / RECORD
    source = json.loads(record.read_text()).get("base_model", {}).get("source", "") if record.is_file() else str(model_dir)
    if source == "demo" or (Path(source) / SOURCE_FILE).is_file():
        source = str(demo_gguf_path())
    if str(source).endswith(".gguf") and Path(source).is_file():
        field = gguf.GGUFReader(source).get_field("tokenizer.ggml.pre")
        if field is not None:
            return str(field.contents())
    return PRE_DEFAULT


def write_gguf(export_dir: Path, out: Path, quant: str = "f16", pre: str | None = None) -> Path:
    """Write ``out`` (atomically) from the export in ``export_dir`` at ``quant`` (``f32``, ``f16``,
    or through llama.cpp's quantizer ``q8_0`` / ``q4_k_m``). ``pre``: llama.cpp's pre-tokenizer name
    (:func:`tokenizer_pre` when not given)."""
    import gguf

    export_dir, out = Path(export_dir), Path(out)
    config, arch, kept = check_gguf_export(export_dir, quant)
    state = _state(export_dir)
    biases = {f"attn.{i}" for i in range(arch.n_layers) if f"model.layers.{i}.self_attn.bias" in state}
    biases |= {f"mlp.{i}" for i in range(arch.n_layers) if f"model.layers.{i}.mlp.bias" in state}
    widths = layer_widths(kept, arch, biases)
    n_vocab = state["model.embed_tokens.weight"].shape[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    written = out.with_name(f".{out.name}.{'f32.' if quant not in ('f32', 'f16') else ''}tmp")
    writer = gguf.GGUFWriter(str(written), ARCH)
    writer.add_name(export_dir.name)
    writer.add_block_count(arch.n_layers)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(arch.hidden)
    writer.add_feed_forward_length([w.ff for w in widths])
    writer.add_head_count([w.heads for w in widths])
    writer.add_head_count_kv([w.kv_heads for w in widths])
    writer.add_key_length(arch.head_dim)
    writer.add_value_length(arch.head_dim)
    writer.add_rope_dimension_count(arch.head_dim)
    theta, scaling = rope(config)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(n_vocab)
    if scaling["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if quant == "f16" else gguf.LlamaFileType.ALL_F32)
    _tokenizer(writer, export_dir, n_vocab, pre or tokenizer_pre(export_dir))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DECI, arch.n_layers)
    tensors = {k: v for k, v in state.items() if not k.startswith("model.layers.")}
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)  # llama.cpp reuses token_embd
    for i, w in enumerate(widths):
        tensors |= _layer_tensors(state, i, w, arch)
    if scaling["rope_type"] == "llama3":
        writer.add_tensor("rope_freqs.weight", _rope_freqs(theta, scaling, arch.head_dim).numpy())
    for name, t in tensors.items():
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise UserError(f"{export_dir}: tensor {name} has no GGUF name; re-export the model with this version")
        half = quant == "f16" and t.ndim == 2  # norms and biases stay f32, as llama.cpp's converter keeps them
        writer.add_tensor(target, t.to(torch.float16 if half else torch.float32).numpy())
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    if quant in ("f32", "f16"):
        os.replace(written, out)
        return out
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        fallback = llamacpp_quantize(written, tmp, quant)
        os.replace(tmp, out)
    finally:
        written.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    if fallback:  # llama.cpp's own line: widths that its blocks do not divide are stored in another type
        warnings.warn(f"{out.name}: {fallback} (prune with --align 32, or 256 for k-quants, to quantize every tensor at {quant})",
                      stacklevel=2)
    return out


