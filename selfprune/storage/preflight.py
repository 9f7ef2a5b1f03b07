"""The machine a run writes to: checked before the work, and named when it fails during the work.

Before: every directory a run will write (the cache home, Prefect's results, its database, the
run's ``--out``) must take a file, and each device must have room for the stated estimate of what
the run writes there (:class:`Need`). During: a failure caused by the disk (``ENOSPC``, SQLite's
"database or disk is full", or a failure while a watched disk has no space left) or by a read-only
or unwritable directory becomes an :class:`~selfprune.core.errors.EnvironmentFault` naming the path and
the fix. Plain functions, no Prefect: the application layer supplies the paths. Also at the start: one warning
line for each of those directories that someone else can write (:func:`warn_if_shared`).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sqlite3
import stat
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import EnvironmentFault

MIB = 1 << 20
FULL_BELOW = 1 * MIB  # a watched device with less free space than this is taken as full
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}
logger = logging.getLogger(__name__)
FIX_LOCATION = "SELFPRUNE_HOME=DIR moves the cache and Prefect's local database, --out DIR the run's files"


@dataclass(frozen=True)
class Need:
    """About ``size`` bytes that a run writes under ``path``, for ``what`` (said in the message)."""

    what: str
    path: Path
    size: int


def mib(size: float) -> str:
    return f"{size / MIB:,.0f} MiB" if size >= 10 * MIB else f"{size / MIB:,.1f} MiB"


def _existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (what a directory to be created will live on)."""
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(_existing(path)).free


def unwritable(path: Path, what: str, error: OSError) -> EnvironmentFault:
    return EnvironmentFault(
        f"cannot write {what} to {path}: {error.strerror or error}. Fix: make it writable (a read-only "
        f"mount or its permissions), or write elsewhere: {FIX_LOCATION}."
    )


def no_space(path: Path, detail: str) -> EnvironmentFault:
    return EnvironmentFault(
        f"no space left on the device holding {path} ({detail}; {mib(free_bytes(path))} free now). Fix: free "
        f"space there, or write elsewhere: {FIX_LOCATION}."
    )


def ensure_dir(path: Path, what: str, mode: int = 0o777) -> Path:
    """``mkdir -p path``, or an EnvironmentFault naming it (read-only, permission, full)."""
    try:
        path.mkdir(mode=mode, parents=True, exist_ok=True)
    except OSError as e:
        if e.errno in _NO_SPACE:
            raise no_space(path, f"creating the directory for {what}") from None
        raise unwritable(path, what, e) from None
    return path


def shared_with_others(path: Path) -> tuple[str, str] | None:
    """(why, fix) when someone else can put files in the directory ``path``; None when only this
    user can, or it does not exist yet. Files there are not this user's to trust: a planted cached
    result or memo changes what a run computes."""
    try:
        st = path.stat()
    except OSError:
        return None
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not by you (uid {os.geteuid()})", f"use a directory of your own: {FIX_LOCATION}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by others (mode {stat.S_IMODE(st.st_mode):04o})", f"chmod 700 {path}"
    return None


_WARNED: set[str] = set()  # one line per directory and process: the CLI and each flow check again


def warn_if_shared(dirs: Iterable[tuple[Path, str]]) -> None:
    """One warning line for each directory in ``dirs`` (path, what) that others can write, with the
    fix; the mode is the user's to change, never changed here."""
    for path, what in dirs:
        found = shared_with_others(path)
        if found is None or f"{path} {found[0]}" in _WARNED:
            continue
        _WARNED.add(f"{path} {found[0]}")
        logger.warning("%s (%s) %s: a file planted there changes what selfprune reads back. Fix: %s", path, what, *found)


def check_writable(path: Path, what: str) -> None:
    """Create ``path`` and write, sync and remove a small file in it: what the run will do there."""
    ensure_dir(path, what)
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".selfprune-probe-") as probe:
            probe.write(b"\0" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as e:
        if e.errno in _NO_SPACE:
            raise no_space(path, f"a 4 KiB test write for {what} failed") from None
        raise unwritable(path, what, e) from None


def check_space(needs: Iterable[Need]) -> None:
    """Each device must hold what the run writes on it (the needs on one device add up)."""
    by_device: dict[int, list[Need]] = defaultdict(list)
    for need in needs:
        by_device[os.stat(_existing(need.path)).st_dev].append(need)
    for group in by_device.values():
        total, free = sum(n.size for n in group), free_bytes(group[0].path)
        if free < total:
            parts = ", ".join(f"{mib(n.size)} of {n.what} in {n.path}" for n in group)
            raise EnvironmentFault(
                f"not enough space for this run on the device holding {group[0].path}: {mib(free)} free, and the run "
                f"writes about {mib(total)} there ({parts}). Fix: free space there, or write elsewhere: {FIX_LOCATION}."
            )


def check_sqlite_lock(db: Path, timeout: float = 10.0) -> None:
    """Take and release SQLite's write lock on ``db`` (Prefect's local database): on a filesystem
    without working locks (NFS, some network and FUSE mounts) or with a process holding the database,
    Prefect's server would fail later with a less clear error, after the work has started."""
    ensure_dir(db.parent, "the Prefect database")
    try:
        conn = sqlite3.connect(db, timeout=timeout)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.rollback()
        finally:
            conn.close()
    except sqlite3.Error as e:
        raise EnvironmentFault(
            f"cannot lock the Prefect database {db} ({e}, waited {timeout:.0f} s): another process holds it, or its "
            "filesystem does not support SQLite's locks (NFS, some network or FUSE mounts). Fix: stop the process that "
            "holds it, move it to a local disk (SELFPRUNE_HOME=DIR, or PREFECT_HOME=DIR), or run against a server: "
            "`prefect server start` and PREFECT_API_URL=http://127.0.0.1:4200/api."
        ) from None


def check(needs: list[Need], database: Path | None = None) -> None:
    """Everything above, before a run: writable directories, room for the estimate, a lockable database."""
    for path, what in dict((n.path, n.what) for n in needs).items():
        check_writable(path, what)
    check_space(needs)
    if database is not None:
        check_sqlite_lock(database)


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, its causes and contexts, and the members of exception groups, each once."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.extend([e.__cause__, e.__context__, *getattr(e, "exceptions", ())])


def _under(filename: object, places: list[Path]) -> bool:
    """Is ``filename`` inside one of the places a run writes (a read error elsewhere is not ours)?"""
    if not isinstance(filename, (str, os.PathLike)):
        return False
    path = Path(filename).expanduser().absolute()
    return any(path.is_relative_to(Path(p).expanduser().absolute()) for p in places)


def disk_fault(exc: BaseException, watched: Iterable[Path]) -> EnvironmentFault | None:
    """The EnvironmentFault behind ``exc`` when the disk or a directory's permissions caused it; else None.

    A full disk does not always surface as ``ENOSPC`` here (Prefect's server reports its own SQLite
    error as an HTTP 500), so a failure while a watched device is (almost) full is taken as one too.
    """
    watched = list(watched)
    for e in exception_chain(exc):
        if isinstance(e, EnvironmentFault):
            return e
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            return no_space(Path(e.filename or (watched[0] if watched else ".")), f"{e.strerror}")
        if isinstance(e, OSError) and e.errno in _NOT_WRITABLE and _under(e.filename, watched):
            return unwritable(Path(e.filename), "files", e)
        if isinstance(e, sqlite3.OperationalError) and "full" in str(e):
            return no_space(watched[0] if watched else Path("."), f"SQLite: {e}")
    full = full_device(watched)
    return no_space(full, f"the run failed with {type(exc).__name__} while this device was full") if full else None


def full_device(paths: Iterable[Path]) -> Path | None:
    """The first of ``paths`` whose device is (almost) out of space, if any."""
    return next((p for p in paths if free_bytes(p) < FULL_BELOW), None)
