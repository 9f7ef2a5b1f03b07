"""Stable content hashes for cache keys: built from small explicit inputs, never tensors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def stable_json(obj: Any) -> str:
    """Canonical JSON (sorted keys, no whitespace), so equal inputs hash equal across runs."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_default)


def _default(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"cannot hash {type(obj).__name__} into a cache key; pass a config or hash instead")


def content_hash(*parts: Any, length: int = 24) -> str:
    """sha256 over the canonical JSON of ``parts``, truncated to ``length`` hex digits."""
    return hashlib.sha256(stable_json(parts).encode()).hexdigest()[:length]


def sha256_file(path: Path) -> str:
    """sha256 (hex) of a file's bytes, read in blocks (weight files are tens of GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()
