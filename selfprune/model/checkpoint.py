"""A model checkpoint on disk: what a loaded one is, its identity, and reading it with transformers.

Below :mod:`selfprune.engine.models` (which resolves ``--model`` specs) and :mod:`selfprune.export.hf`
(which reads pruned exports), so both, and the demo's GGUF conversion, share one reader.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import UserError, cause
from ..storage.hashing import sha256_file
from ..storage.memo import open_memo
from .arch import Arch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


@dataclass
class LoadedModel:
    """A model ready for pruning: the module, its tokenizer, its shapes and its identity."""

    model: torch.nn.Module
    tokenizer: object
    arch: Arch
    fingerprint: str
    source: str


def read_config(source: str, what: str, **kwargs):
    """transformers' config of ``source`` (``what`` names it in errors). Whatever transformers raises
    for a config (not JSON, a list, a string where a size goes, zero heads, a GGUF it cannot map, an
    unreachable hub) is the input's problem: a UserError, not a traceback."""
    from transformers import AutoConfig  # heavy: only when loading

    try:
        return AutoConfig.from_pretrained(source, **kwargs)
    except Exception as e:  # noqa: BLE001 - see the docstring
        raise UserError(f"could not read the config of {what} ({cause(e)}). Fix: give a model "
                        "directory with the config.json its weights came with, a valid .gguf file, or a hub id "
                        "with the hub reachable") from None


def from_pretrained(source: str, dtype: torch.dtype, **kwargs) -> tuple[torch.nn.Module, object]:
    """(model, tokenizer) through transformers' ``from_pretrained``; a ``gguf_file`` is dequantized,
    and the result carries no quantizer, so it is a plain float model from here on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: only when loading

    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if "gguf_file" in kwargs:
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model, tokenizer


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise UserError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {path}; point --model at a model directory")
    return files


def fingerprint(path: Path) -> str:
    """sha256 over the weight files' bytes (and names), memoized by path, size and mtime.

    Hashing tens of GB takes minutes, so the digest of each file is remembered in the memo
    ``$SELFPRUNE_HOME/fingerprints`` and recomputed only when size or mtime changes.
    """
    outer = hashlib.sha256()
    with open_memo("fingerprints") as memo:
        for f in _weight_files(path.resolve()):
            st = f.stat()
            key = f"{f}|{st.st_size}|{st.st_mtime_ns}"
            digest = memo.get(key)
            if digest is None:
                digest = sha256_file(f)
                memo.set(key, digest)
            outer.update(f.name.encode() + digest.encode())
    return outer.hexdigest()[:24]

