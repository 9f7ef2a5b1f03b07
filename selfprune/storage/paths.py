"""Where selfprune keeps what it fetches and caches on disk."""

from __future__ import annotations

import os
from pathlib import Path

from .preflight import ensure_dir

HOME_ENV = "SELFPRUNE_HOME"


def root() -> Path:
    """The cache root: ``$SELFPRUNE_HOME`` if set, else ``~/.cache/selfprune`` (not created)."""
    env = os.environ.get(HOME_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "selfprune"


def home() -> Path:
    """:func:`root`, created on demand (an EnvironmentFault names it when it cannot be).

    Below it: ``models/`` (the demo model), ``data/`` (the demo corpus), the memos ``tokens/``
    (token ids) and ``fingerprints/`` (weight-file digests), and ``store/`` (statistics).
    Everything there can be deleted; it is fetched or recomputed when next needed.
    """
    return ensure_dir(root(), f"the selfprune cache ({HOME_ENV})")


def subdir(name: str) -> Path:
    """``home()/name``, created on demand."""
    return ensure_dir(home() / name, f"the selfprune cache ({HOME_ENV})")
