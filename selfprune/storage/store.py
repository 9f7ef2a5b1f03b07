"""A content-addressed tensor store: safetensors files named by content hash. Never pickle.

Layout under the root (default ``<SELFPRUNE_HOME or ~/.cache/selfprune>/store``)::

    tensors/<key[:2]>/<key>.safetensors

A *key* is a content hash of whatever produced the tensors (see ``selfprune.storage.hashing``), so
writing the same key twice writes the same bytes: every write is a whole-file atomic replace
(:mod:`selfprune.storage.fileio`), so a reader sees either the old complete file or the new one. Each file
carries a sha256 digest of its tensors in its metadata, checked on read: a corrupt or truncated
file raises :class:`~selfprune.core.errors.CorruptFile` naming it. The store never repairs a file
behind the caller's back; a caller that can recompute the content may :meth:`ArtifactStore.set_aside`
the bad file (kept, renamed) and write a new one.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open

from ..core.errors import CorruptFile
from .fileio import atomic_path
from .paths import home

DIGEST_KEY = "selfprune.sha256"
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{1,127}$")


def _check_key(key: str) -> str:
    # keys are sharded by their first two characters, and must not escape the root
    if not isinstance(key, str) or not _KEY_RE.match(key) or ".." in key:
        raise ValueError(f"invalid artifact key {key!r}: use 2-128 characters of [A-Za-z0-9_.-] (keys are content hashes)")
    return key


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes of ``tensors`` (order-independent)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


class ArtifactStore:
    """Tensors addressed by content-hash keys under one root directory."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root).expanduser() if root is not None else home() / "store"

    def __repr__(self) -> str:
        return f"ArtifactStore({str(self.root)!r})"

    def tensor_path(self, key: str) -> Path:
        _check_key(key)
        return self.root / "tensors" / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        """Whether a tensor file exists for ``key`` (not whether it is intact: see get_tensors)."""
        return self.tensor_path(key).is_file()

    def put_tensors(
        self, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
    ) -> Path:
        """Write ``tensors`` (moved to CPU, made contiguous) atomically; return the file's path."""
        path = self.tensor_path(key)
        meta = dict(metadata or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise TypeError("safetensors metadata must map str to str")
        if DIGEST_KEY in meta:
            raise ValueError(f"metadata key {DIGEST_KEY!r} is reserved")
        cpu: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
            t = t.detach().to("cpu").contiguous()
            storage = t.untyped_storage()
            # safetensors refuses tensors that share storage: give views their own copy
            if storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size():
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
            cpu[name] = t
        meta[DIGEST_KEY] = tensors_digest(cpu)
        with atomic_path(path) as tmp:
            safetensors.torch.save_file(cpu, str(tmp), metadata=meta)
        return path

    def get_tensors(self, key: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Read the tensors stored under ``key``. Missing: KeyError. Corrupt: CorruptFile."""
        path = self.tensor_path(key)
        if not path.is_file():
            raise KeyError(f"no tensors stored under key {key!r} ({path})")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                meta = fh.metadata() or {}
                out = {name: fh.get_tensor(name) for name in fh.keys()}
        except Exception as exc:  # safetensors raises its own error types for bad headers/sizes
            raise CorruptFile(path, exc) from exc
        expected = meta.get(DIGEST_KEY)
        if expected is None:
            raise CorruptFile(path, f"no {DIGEST_KEY} digest: not written by this store")
        if tensors_digest(out) != expected:
            raise CorruptFile(path, "digest mismatch")
        if torch.device(device).type != "cpu":
            out = {k: v.to(device) for k, v in out.items()}
        return out

    def set_aside(self, key: str) -> Path | None:
        """Rename the file of ``key`` to ``<file>.corrupt-<UTC time>`` (kept for inspection, never
        read again) so the key can be written afresh; return the new path, or None when the file
        is already gone (another process set it aside first)."""
        path = self.tensor_path(key)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        aside = path.with_name(f"{path.name}.corrupt-{stamp}")
        try:
            path.rename(aside)
        except FileNotFoundError:
            return None
        return aside
