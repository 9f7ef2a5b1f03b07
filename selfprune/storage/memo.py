"""Process-safe on-disk memos (diskcache) that never pickle.

Parallel workers share these (the model fingerprints, the token ids of a corpus), so a memo is a
``diskcache.Cache`` (SQLite with its own locking) rather than a JSON file rewritten whole by every
process. Its :class:`RawDisk` admits only ``str`` keys and ``str``/``bytes`` values, which
diskcache stores as they are, and refuses to read back anything pickled, so a memo file can never
run code. Memos live under ``$SELFPRUNE_HOME/<name>`` (resolved at each call), never evict, and
can be deleted at any time: their content is recomputed when next needed.
"""

from __future__ import annotations

import diskcache
from diskcache.core import MODE_PICKLE, UNKNOWN

from .paths import subdir


class RawDisk(diskcache.Disk):
    """diskcache's storage, limited to what it keeps raw: str keys, str or bytes values."""

    def put(self, key):
        if type(key) is not str:
            raise TypeError(f"memo keys are str, not {type(key).__name__}")
        return super().put(key)

    def get(self, key, raw):
        if not raw:
            raise ValueError("memo holds a pickled key; refusing to unpickle it (delete the memo directory)")
        return super().get(key, raw)

    def store(self, value, read, key=UNKNOWN):
        if read or type(value) not in (str, bytes):
            raise TypeError(f"memo values are str or bytes, not {type(value).__name__}")
        return super().store(value, read, key=key)

    def fetch(self, mode, filename, value, read):
        if mode == MODE_PICKLE:
            raise ValueError("memo holds a pickled value; refusing to unpickle it (delete the memo directory)")
        return super().fetch(mode, filename, value, read)


def open_memo(name: str) -> diskcache.Cache:
    """The memo ``$SELFPRUNE_HOME/<name>``; use it as a context manager so it is closed."""
    return diskcache.Cache(str(subdir(name)), eviction_policy="none", disk=RawDisk)
