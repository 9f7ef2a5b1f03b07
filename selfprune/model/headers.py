"""A checkpoint's tensor shapes from its files' headers alone, and its config checked against them.

transformers builds a model from ``config.json`` before it reads a weight, so a config that says
``hidden_size`` 2^20 or ``num_hidden_layers`` 10^7 is allocated, or looped over for hours, before
anything notices that it does not fit its weights; a config with fewer layers than its weights
loads, silently dropping the rest. So before a local checkpoint is built, its config is compared
with the shapes its weight files hold, read without their data: the JSON header of each
safetensors file (``safe_open``), the tensor table of a GGUF (gguf's reader, memory-mapped), or a
``.bin`` pickle loaded memory-mapped onto the meta device (``weights_only``). A file that cannot be
read as what its name says, or a config field that disagrees with the weights, is a UserError
naming the file, or the field, the config's value and the weights'.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from ..core.errors import UserError, cause
from ..storage.userfiles import read_json
from .arch import Arch

Shapes = dict[str, tuple[int, ...]]

# What transformers reads from a directory, in its order of preference: an index of shards, or one file.
CHECKPOINTS = (("model.safetensors.index.json", "model.safetensors"),
               ("pytorch_model.bin.index.json", "pytorch_model.bin"))
FIX = "use the config.json that came with these weights, or download the checkpoint again"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GGUF_TOP = {"token_embd": "model.embed_tokens", "output": "lm_head", "output_norm": "model.norm"}
_GGUF_PARTS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def tensor_shapes(path: Path) -> Shapes:
    """Tensor name -> shape (Hugging Face names, ``[out, in]``) of the checkpoint at ``path``: a model
    directory or a ``.gguf`` file. Empty when the directory holds no weights transformers reads."""
    if path.is_file():
        st = path.stat()
        return _gguf_shapes(str(path), st.st_size, st.st_mtime_ns)
    shapes: Shapes = {}
    for f in _checkpoint_files(path):
        shapes.update(_safetensors_shapes(f) if f.suffix == ".safetensors" else _pickle_shapes(f))
    return shapes


def _checkpoint_files(path: Path) -> list[Path]:
    for index, single in CHECKPOINTS:
        if (path / index).is_file():
            index_data = read_json(path / index, "checkpoint index", "the index that came with the shards")
            weight_map = index_data.get("weight_map") if isinstance(index_data, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) and Path(f).name == f
                                                            for f in weight_map.values()):
                raise UserError(f"checkpoint index {path / index} has no weight_map of shard file names; {FIX}")
            return [path / f for f in sorted(set(weight_map.values()))]
        if (path / single).is_file():
            return [path / single]
    return []


def _unreadable(path: Path | str, kind: str, e: Exception) -> UserError:
    return UserError(f"{path} is not a readable {kind} file ({cause(e)}); it is truncated or corrupt. "
                     f"Fix: download or convert it again")


def _safetensors_shapes(path: Path) -> Shapes:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as e:  # noqa: BLE001 - whatever the header holds, it is the file's problem
        raise _unreadable(path, "safetensors", e) from None


def _pickle_shapes(path: Path) -> Shapes:
    import torch

    try:
        state = torch.load(path, map_location="meta", weights_only=True, mmap=True)
        return {name: tuple(t.shape) for name, t in state.items()}
    except Exception as e:  # noqa: BLE001
        raise _unreadable(path, "PyTorch checkpoint (zip format, weights only)", e) from None


@lru_cache(maxsize=4)
def _gguf_shapes(path: str, size: int, mtime_ns: int) -> Shapes:
    """The GGUF's tensors by their Hugging Face names (memoized: every load of it asks, and a large
    GGUF's metadata takes seconds to walk). gguf lists dimensions innermost first: reversed here."""
    from gguf import GGUFReader

    try:
        tensors = GGUFReader(path).tensors
        return {_hf_name(t.name): tuple(int(d) for d in reversed(t.shape)) for t in tensors}
    except Exception as e:  # noqa: BLE001 - a truncated or random file fails anywhere in the reader
        raise _unreadable(path, "GGUF", e) from None


def _hf_name(name: str) -> str:
    m = _GGUF_LAYER.match(name)
    if m:
        return f"model.layers.{m[1]}.{_GGUF_PARTS.get(m[2], m[2])}.{m[3]}"
    top, _, kind = name.rpartition(".")
    return f"{_GGUF_TOP.get(top, top)}.{kind}"


def check_config(arch: Arch, vocab_size: object, shapes: Shapes, where: str,
                 widths: list[tuple[int, int]] | None = None) -> None:
    """Raise a UserError unless the config (``arch``, ``vocab_size``) fits ``shapes``: the layers the
    weights number, the embedding's ``[vocab_size, hidden_size]``, and each layer's q/k/gate rows
    (``widths``: per layer, the KV groups and MLP channels kept; every one when None). ``where``
    names the config. Tensors absent from ``shapes`` are not checked (loading reports them)."""
    if not shapes:
        return
    layers = _by_layer(shapes)
    contiguous = not layers or (min(layers) == 0 and max(layers) == len(layers) - 1)
    if len(layers) != arch.n_layers or not contiguous:  # first: a count of 10^7 must not be looped over
        held = len(layers) if contiguous else f"{len(layers)} (numbered with gaps)"
        raise _mismatch(where, "num_hidden_layers", arch.n_layers, held, "the decoder layers the weights number")
    embed = next((s for n, s in shapes.items() if n.endswith("embed_tokens.weight")), None)
    if embed is not None and len(embed) == 2:
        for field, value, held in (("vocab_size", vocab_size, embed[0]), ("hidden_size", arch.hidden, embed[1])):
            if value != held:
                raise _mismatch(where, field, value, held, f"embed_tokens.weight has shape {list(embed)}")
    for i, (groups, channels) in enumerate(widths or [(arch.n_kv_heads, arch.intermediate)] * arch.n_layers):
        for part, rows, unit, field, value in _layer_rows(arch, i, groups, channels, widths is not None):
            if (shape := layers[i].get(part)) is not None:
                _check_rows(where, shape, rows, unit, field, value, arch.hidden, f"layers.{i}.{part}")


def _by_layer(shapes: Shapes) -> dict[int, Shapes]:
    """Layer index -> (name within the layer -> shape)."""
    layers: dict[int, Shapes] = {}
    for name, shape in shapes.items():
        if m := _LAYER.search(name):
            layers.setdefault(int(m[1]), {})[m[2]] = shape
    return layers


def _check_rows(where: str, shape: tuple[int, ...], rows: int, unit: int, field: str, value: str, hidden: int,
                name: str) -> None:
    """A projection's shape must be ``[rows, hidden]``; its rows count ``unit``s of ``field``."""
    detail = f"{name} has shape {list(shape)}"
    if len(shape) != 2 or shape[0] != rows:
        held = shape[0] if shape else "nothing"
        in_units = isinstance(held, int) and unit > 1 and held % unit == 0
        raise _mismatch(where, field, value, f"{held // unit} x {unit} = {held}" if in_units else held, detail)
    if shape[1] != hidden:
        raise _mismatch(where, "hidden_size", hidden, shape[1], detail)


def _layer_rows(arch: Arch, i: int, groups: int, channels: int, pruned: bool) -> list[tuple[str, int, int, str, str]]:
    """(tensor, its rows, rows per unit of the field, the config field that sets them, that field's
    value) for layer ``i``'s q, k and gate projections; a pruned layer's are set by
    ``selfprune_layers``, and a removed attention or MLP has none."""
    hd, per_group = arch.head_dim, arch.group_size * arch.head_dim
    q, kv = groups * per_group, groups * hd
    if pruned:
        kept = f"selfprune_layers[{i}]"
        attention = [("self_attn.q_proj.weight", q, per_group, f"{kept} (KV groups kept)",
                      f"{groups} x {per_group} = {q}"),
                     ("self_attn.k_proj.weight", kv, hd, f"{kept} (KV groups kept)", f"{groups} x {hd} = {kv}")]
        mlp = [("mlp.gate_proj.weight", channels, 1, f"{kept} (MLP channels kept)", str(channels))]
        return (attention if groups else []) + (mlp if channels else [])
    return [("self_attn.q_proj.weight", q, hd, "num_attention_heads x head_dim", f"{arch.n_heads} x {hd} = {q}"),
            ("self_attn.k_proj.weight", kv, hd, "num_key_value_heads x head_dim", f"{arch.n_kv_heads} x {hd} = {kv}"),
            ("mlp.gate_proj.weight", channels, 1, "intermediate_size", str(channels))]


def _mismatch(where: str, field: str, value: object, held: object, detail: str) -> UserError:
    return UserError(f"{where} does not match its weights: {field} is {value} in the config but {held} in the weights "
                     f"({detail}); nothing was loaded. Fix: {FIX}")
