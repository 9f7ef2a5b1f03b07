"""A content-addressed artifact store: tensors as safetensors, records as JSON. Never pickle.

Layout under the root (default ``<SELFPRUNE_HOME or ~/.cache/selfprune>/store``)::

    tensors/<key[:2]>/<key>.safetensors     put_tensors / get_tensors / has
    records/<kind>/<key[:2]>/<key>.json     put_json / get_json / has_json

A *key* is a content hash of whatever produced the artifact (see ``selfprune.hashing``), so
writing the same key twice writes the same bytes: every write is a whole-file atomic replace
(temporary file in the same directory, fsync, ``os.replace``), which means a reader sees either
the old complete file or the new complete file, and a process killed mid-write leaves at most a
stray ``.*.tmp`` file that is never read. Each safetensors file carries a sha256 digest of its
tensors in its metadata, checked on read: a corrupt or truncated file raises ``UserError`` that
names the file and tells the user to delete it; the store never repairs it behind their back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any, Iterator

import torch

from selfprune.errors import UserError

DIGEST_KEY = "selfprune.sha256"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def default_root() -> Path:
    """``<SELFPRUNE_HOME or ~/.cache/selfprune>/store``, resolved at call time."""
    from selfprune.paths import home

    return home() / "store"


def _check_name(what: str, name: str) -> str:
    shortest = 2 if what == "key" else 1  # keys are sharded by their first two characters
    if not isinstance(name, str) or len(name) < shortest or not _NAME_RE.match(name) or ".." in name:
        raise ValueError(
            f"invalid artifact {what} {name!r}: use {shortest}-128 characters of [A-Za-z0-9_.-] "
            "(keys are content hashes)"
        )
    return name


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes of ``tensors`` (order-independent)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


@contextlib.contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and ``os.replace`` it in."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _corrupt(path: Path, why: object) -> UserError:
    return UserError(
        f"artifact file {path} is corrupt or unreadable ({why}). Delete it (rm '{path}') and "
        "run again: it will be recomputed."
    )


class ArtifactStore:
    """Tensors and JSON records addressed by content-hash keys under one root directory."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root).expanduser() if root is not None else default_root()

    def __repr__(self) -> str:
        return f"ArtifactStore({str(self.root)!r})"

    # ---- tensors ------------------------------------------------------------------------
    def tensor_path(self, key: str) -> Path:
        _check_name("key", key)
        return self.root / "tensors" / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        """Whether a tensor file exists for ``key`` (not whether it is intact: see get_tensors)."""
        return self.tensor_path(key).is_file()

    def put_tensors(
        self, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
    ) -> Path:
        """Write ``tensors`` (moved to CPU, made contiguous) atomically; return the file's path."""
        from safetensors.torch import save_file

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
        with _atomic_target(path) as tmp:
            save_file(cpu, str(tmp), metadata=meta)
        return path

    def get_tensors(self, key: str, device: str | torch.device = "cpu", verify: bool = True) -> dict[str, torch.Tensor]:
        """Read the tensors stored under ``key``. Missing: KeyError. Corrupt: UserError."""
        from safetensors import safe_open

        path = self.tensor_path(key)
        if not path.is_file():
            raise KeyError(f"no tensors stored under key {key!r} ({path})")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                meta = fh.metadata() or {}
                out = {name: fh.get_tensor(name) for name in fh.keys()}
        except Exception as exc:  # safetensors raises its own error types for bad headers/sizes
            raise _corrupt(path, exc) from exc
        if verify:
            expected = meta.get(DIGEST_KEY)
            if expected is None:
                raise _corrupt(path, f"no {DIGEST_KEY} digest: not written by this store")
            if tensors_digest(out) != expected:
                raise _corrupt(path, "digest mismatch")
        if torch.device(device).type != "cpu":
            out = {k: v.to(device) for k, v in out.items()}
        return out

    def get_metadata(self, key: str) -> dict[str, str]:
        """The metadata given to put_tensors (without the store's own digest)."""
        from safetensors import safe_open

        path = self.tensor_path(key)
        if not path.is_file():
            raise KeyError(f"no tensors stored under key {key!r} ({path})")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                meta = dict(fh.metadata() or {})
        except Exception as exc:
            raise _corrupt(path, exc) from exc
        meta.pop(DIGEST_KEY, None)
        return meta

    # ---- JSON records ---------------------------------------------------------------------
    def json_path(self, kind: str, key: str) -> Path:
        _check_name("kind", kind)
        _check_name("key", key)
        return self.root / "records" / kind / key[:2] / f"{key}.json"

    def has_json(self, kind: str, key: str) -> bool:
        return self.json_path(kind, key).is_file()

    def put_json(self, kind: str, key: str, obj: Any) -> Path:
        """Write ``obj`` as canonical JSON (sorted keys) atomically; return the file's path."""
        path = self.json_path(kind, key)
        data = json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n"
        with _atomic_target(path) as tmp:
            tmp.write_text(data, encoding="utf-8")
        return path

    def get_json(self, kind: str, key: str) -> Any:
        """Read the record ``kind/key``. Missing: KeyError. Corrupt: UserError."""
        path = self.json_path(kind, key)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise KeyError(f"no {kind} record stored under key {key!r} ({path})") from None
        try:
            return json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _corrupt(path, exc) from exc


def default_store() -> ArtifactStore:
    """The store under the current ``SELFPRUNE_HOME`` (re-read on every call)."""
    return ArtifactStore()


def put_tensors(key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    return default_store().put_tensors(key, tensors, metadata)


def get_tensors(key: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return default_store().get_tensors(key, device=device)


def has(key: str) -> bool:
    return default_store().has(key)


def put_json(kind: str, key: str, obj: Any) -> Path:
    return default_store().put_json(kind, key, obj)


def get_json(kind: str, key: str) -> Any:
    return default_store().get_json(kind, key)


def has_json(kind: str, key: str) -> bool:
    return default_store().has_json(kind, key)
