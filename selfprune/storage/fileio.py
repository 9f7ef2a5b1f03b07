"""Whole-file atomic writes: a reader sees the old complete file or the new one, never a half.

Every writer of a file that something reads back (the store, exports, memos, reports) goes
through here: write a temporary file in the target's directory (same file system, so the rename
is atomic), fsync it, ``os.replace`` it over the target, then fsync the directory where the OS
allows. A process killed mid-write leaves at most a stray ``.<name>.<pid>.<random>.tmp`` file,
which nothing reads. Temporary files are created with ``open``, so they get the umask's modes.

Nothing is written through a symbolic link: a link planted where a run writes (``best.json`` ->
someone's file) is itself replaced by ``os.replace``, and :func:`append_line` opens with
``O_NOFOLLOW`` and replaces a link by a file of its own, with a warning; the link's target is never
opened.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` for a writer that needs a path (``save_file``);
    when the block succeeds the file is fsynced and replaces ``path``. Parents are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        _replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; return ``path``."""
    with atomic_path(path) as tmp, open(tmp, "xb") as fh:  # "x": a fresh file, never an existing one or a link
        fh.write(data)
    return Path(path)


def atomic_write_text(path: Path | str, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; return ``path``."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def append_line(path: Path | str, line: str) -> None:
    """Append ``line`` and a newline to a log such as ``evaluations.jsonl``, all or nothing: a write
    that fails (a full disk) is cut back off, so readers never meet half a line.

    A symbolic link at ``path`` is replaced by a new log, with a warning naming where it pointed:
    appending through it would write to a file outside the run, and refusing would fail the
    evaluation just computed over a log line."""
    with open(path, "ab", buffering=0, opener=_no_follow) as fh:
        start = os.fstat(fh.fileno()).st_size
        rest = memoryview(line.encode("utf-8") + b"\n")
        try:
            while rest:  # an unbuffered write may write part of it and say so
                rest = rest[fh.write(rest):]
        except OSError:
            os.ftruncate(fh.fileno(), start)
            raise


def _no_follow(path: str, flags: int) -> int:
    """``os.open`` for :func:`append_line` that never follows a link at ``path`` (it replaces it)."""
    flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        return os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno != errno.ELOOP and not os.path.islink(path):
            raise
    atomic_write_bytes(path, b"")  # replaces the link itself, and says so
    return os.open(path, flags, 0o666)


@contextlib.contextmanager
def staged_dir(directory: Path | str) -> Iterator[Path]:
    """Yield an empty staging directory inside ``directory`` for writers that emit several files
    (``save_pretrained``); when the block succeeds each file written there replaces its namesake
    in ``directory`` atomically. A failure leaves ``directory`` as it was."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory, prefix=".staging-"))
    try:
        yield staging
        for f in sorted(staging.iterdir()):
            if not f.is_file():
                raise ValueError(f"staged_dir only moves files; {f.name} is not one")
            _replace(f, directory / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace(tmp: Path, path: Path) -> None:
    """fsync ``tmp``, rename it over ``path``, and make the rename durable where the OS allows."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    if path.is_symlink():
        logger.warning("%s was a symbolic link (to %s): selfprune never writes through one, so it replaced the link "
                       "itself; the link's target is untouched", path, os.readlink(path))
    os.replace(tmp, path)
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
