"""Load a supported causal LM (local dir, hub id, GGUF file, pruned export, or the demo) and
fingerprint its weights."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .arch import Arch, arch_of
from .devices import resolve_device, resolve_dtype
from .errors import UserError
from .paths import home

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


@dataclass
class LoadedModel:
    """A model ready for pruning: the module, its tokenizer, its shapes and its identity."""

    model: torch.nn.Module
    tokenizer: object
    arch: Arch
    fingerprint: str
    source: str


def _looks_like_path(spec: str) -> bool:
    """Hub ids are ``org/name``; anything else that names a file system location is a path."""
    return spec.startswith(("/", "./", "../", "~")) or spec.endswith(".gguf") or spec.count("/") > 1


def _resolve(spec: str) -> tuple[str, dict, Path | None]:
    """``spec`` -> (what to pass to ``from_pretrained``, its kwargs, the local path if any)."""
    if spec == "demo":
        from .demo import demo_model_dir

        spec = str(demo_model_dir())
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"{path} is a file but not a .gguf; pass a model directory or a .gguf file")
        return str(path.parent), {"local_files_only": True, "gguf_file": path.name}, path
    if path.is_dir():
        return str(path), {"local_files_only": True}, path
    if _looks_like_path(spec):
        raise UserError(f"model path {spec} does not exist; check the path, or use --model demo for the built-in model")
    return spec, {}, None


def model_fingerprint(spec: str) -> str:
    """The fingerprint of ``spec`` without loading it (a hub model is fetched into the HF cache)."""
    _, _, local = _resolve(spec)
    if local is None:
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(spec))
    return fingerprint(local)


def load_model(spec: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load ``spec``: ``demo``, a local Hugging Face directory, a ``.gguf`` file (dequantized),
    a selfprune export directory, or a hub id (needs a reachable hub).

    The architecture is checked from the config before any weights are read, so an unsupported
    model fails in a second with the list of what works.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    source, kwargs, local = _resolve(spec)
    if local is not None and (local / "selfprune.json").is_file():
        from .export import load_pruned

        return load_pruned(local, device=device, dtype=dtype)
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except OSError as e:
        raise UserError(
            f"could not load a config for {spec!r} ({str(e).splitlines()[0]}); give a local model directory "
            "or .gguf file, or a hub id with the hub reachable"
        ) from None
    arch = arch_of(config)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dt, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if "gguf_file" in kwargs:  # dequantized: plain float weights from here on
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.to(dev).eval().requires_grad_(False)
    return LoadedModel(model, tokenizer, arch, model_fingerprint(spec), spec)


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise UserError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {path}; point --model at a model directory")
    return files


def fingerprint(path: Path) -> str:
    """sha256 over the weight files' bytes (and names), memoized by path, size and mtime.

    Hashing tens of GB takes minutes, so the digest of each file is remembered in
    ``$SELFPRUNE_HOME/fingerprints.json`` and recomputed only when size or mtime changes.
    """
    memo_path = home() / "fingerprints.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        memo = {}
    outer = hashlib.sha256()
    for f in _weight_files(path.resolve()):
        st = f.stat()
        key = f"{f}|{st.st_size}|{st.st_mtime_ns}"
        if key not in memo:
            h = hashlib.sha256()
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
            memo[key] = h.hexdigest()
        outer.update(f.name.encode() + memo[key].encode())
    tmp = memo_path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(memo, indent=0))
    os.replace(tmp, memo_path)
    return outer.hexdigest()[:24]


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a Llama-family causal LM."""
    return model.model.layers
