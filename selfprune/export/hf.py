"""Save a pruned model as a self-describing directory and load it back.

Layout: safetensors weights (``save_pretrained``), ``config.json`` with ``selfprune_layers``
(per layer: kept KV groups, kept MLP channels), the tokenizer, and ``selfprune.json`` (rates,
kept unit indices, realized ratio, base-model fingerprint, data, method). Stock
``from_pretrained`` builds every layer at the dense width, so :func:`load_pruned` builds the
skeleton on the meta device, shapes each layer, and assigns the saved tensors: no pickled modules,
no ``trust_remote_code``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..core.errors import UserError
from ..methods.slicing import prune_layer
from ..model.arch import Arch, arch_of, decoder_layers
from ..model.checkpoint import LoadedModel, fingerprint, read_config
from ..model.devices import MAP, check_resident, resolve_device, resolve_dtype
from ..model.headers import check_config, tensor_shapes
from ..storage.fileio import atomic_write_text, staged_dir

RECORD = "selfprune.json"
# The architecture a selfprune export names in config.json: vLLM serves it through the
# selfprune-vllm plugin (plugins/vllm); transformers picks its classes by model_type, not by this.
ARCHITECTURE = "SelfpruneForCausalLM"


def save_pruned(model: torch.nn.Module, tokenizer, out_dir: Path, record: dict) -> Path:
    """Write the export; ``record`` becomes ``selfprune.json`` (it must hold no secrets).

    Every file appears whole (staged, then atomically replaced), and ``selfprune.json`` comes last:
    loaders take a directory for an export by that file, so a killed save is never mistaken for one.
    """
    out_dir = Path(out_dir)
    (out_dir / RECORD).unlink(missing_ok=True)  # overwriting: no longer an export until done
    with staged_dir(out_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        config_path = staging / "config.json"
        config = json.loads(config_path.read_text())
        config_path.write_text(json.dumps({**config, "architectures": [ARCHITECTURE]}, indent=2))
    atomic_write_text(out_dir / RECORD, json.dumps(record, indent=2))
    return out_dir


def kept_widths(layers: object, arch: Arch, path: Path) -> list[tuple[int, int]]:
    """``selfprune_layers`` as (KV groups, MLP channels) per layer, each within the dense layer's."""
    def fits(width: object) -> bool:
        return (isinstance(width, list) and len(width) == 2 and all(type(n) is int for n in width)
                and 0 <= width[0] <= arch.n_kv_heads and 0 <= width[1] <= arch.intermediate)

    if not isinstance(layers, list) or len(layers) != arch.n_layers or not all(fits(w) for w in layers):
        count = len(layers) if isinstance(layers, list) else "no"
        raise UserError(f"{path}/config.json: selfprune_layers ({count} entries) must list, for each of the "
                        f"{arch.n_layers} layers of num_hidden_layers, [KV groups kept (0-{arch.n_kv_heads}), "
                        f"MLP channels kept (0-{arch.intermediate})]. "
                        "Fix: re-export the model (selfprune prune --out DIR)")
    return [(g, c) for g, c in layers]


def load_pruned(path: Path, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load a selfprune export: ``selfprune.load_pruned("DIR")``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    config = read_config(str(path), str(path), local_files_only=True)
    layers = getattr(config, "selfprune_layers", None)
    if layers is None:
        raise UserError(f"{path}/config.json has no selfprune_layers; this is not a selfprune export")
    arch = arch_of(config)
    layers = kept_widths(layers, arch, path)
    check_config(arch, getattr(config, "vocab_size", None), tensor_shapes(path), f"{path}/config.json", layers)
    dev = resolve_device(device)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    for i, (layer, (g, c)) in enumerate(zip(decoder_layers(model), layers)):
        prune_layer(layer, arch, i, torch.arange(g), torch.arange(c))
    state: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    result = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise UserError(f"{path} does not match its config ({result}); re-export the model")
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Non-persistent buffers (rotary inv_freq) are not saved: rebuild them, in float32, on the device.
    rotary_cls = type(model.model.rotary_emb)
    del model.model.rotary_emb
    model.to(dtype=resolve_dtype(dtype, dev)).eval().requires_grad_(False)
    model.model.rotary_emb = rotary_cls(config=config)
    if device == MAP:
        from accelerate import dispatch_model, infer_auto_device_map

        dispatch_model(model, infer_auto_device_map(model, no_split_module_classes=model._no_split_modules))
        check_resident(model)
    else:
        model.to(dev)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return LoadedModel(model, tokenizer, arch, fingerprint(path), str(path))
