"""Where selfprune keeps what it fetches and caches on disk."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "SELFPRUNE_HOME"


def home() -> Path:
    """The cache root: ``$SELFPRUNE_HOME`` if set, else ``~/.cache/selfprune``; created on demand.

    Below it: ``models/`` (the demo model), ``data/`` (the demo corpus), the memos ``tokens/``
    (token ids) and ``fingerprints/`` (weight-file digests), and ``store/`` (statistics).
    Everything there can be deleted; it is fetched or recomputed when next needed.
    """
    env = os.environ.get(HOME_ENV, "").strip()
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "selfprune"
    root.mkdir(parents=True, exist_ok=True)
    return root


def subdir(name: str) -> Path:
    """``home()/name``, created on demand."""
    path = home() / name
    path.mkdir(parents=True, exist_ok=True)
    return path
