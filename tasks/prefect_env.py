"""Prefect settings for selfprune: call ``configure()`` before Prefect runs anything.

Prefect reads its settings from the environment when ``prefect.context`` is first imported,
so the CLI (and the tests) call ``configure(home)`` first; if Prefect was already imported,
``configure`` refreshes Prefect's global settings context so the new values still apply.

What it sets (each only when the user has not set it: in the environment, under any of the
setting's aliases, or in the active profile of their own ``~/.prefect/profiles.toml``):

``PREFECT_HOME=<home>/prefect``
    Prefect's database (runs, logs) for the ephemeral/local server lives here, not in ``~/.prefect``.
``PREFECT_LOCAL_STORAGE_PATH=<home>/results``
    Persisted task results, i.e. the task cache. Created with mode 0700: whoever can write it
    decides what a run reads back. (Prefect would even decode each file with the serializer named
    inside it, pickle included; selfprune reads results only as plain JSON, see
    :mod:`selfprune.tasks.caching`.) An existing directory that others can write, or that another
    user owns (this one, the home and what is in it, ``PREFECT_HOME``), is named in one warning
    line at each start, with the fix; its mode is left as it is.
``PREFECT_RESULTS_PERSIST_BY_DEFAULT=true``
    Caching needs persisted results.
``PREFECT_RESULTS_DEFAULT_SERIALIZER=json``
    Results that persist by default (flow return values) are written as JSON, not pickle. A
    value JSON cannot encode is not persisted (Prefect logs a warning; the run goes on).
    Cached tasks use a stricter plain-JSON serializer of their own (``selfprune.tasks.caching``).
    This matters for subflows: when a failed parent flow run is retried, Prefect reuses each
    completed subflow run by reading its persisted result; if that result could not be written,
    the retry fails ("Path .../results/<uuid> does not exist"). Flows must therefore return
    JSON-encodable values (dicts, lists, numbers, store keys).
``PREFECT_SERVER_ANALYTICS_ENABLED=false``
    No telemetry attempts (they fail, noisily, offline).
``PREFECT_CLIENT_MAX_RETRIES`` from ``SELFPRUNE_API_OUTAGE_S`` (default 300 s)
    How long a run rides through a Prefect server that is away (a restart, a pod moving): Prefect's
    client retries every API call with growing waits (2, 4, 8, ... s), so 8 retries cover 300 s
    (:func:`selfprune.tasks.faults.retries_for_outage`). Past that the run ends with one line.
``PREFECT_SERVER_EPHEMERAL_ENABLED=true`` and ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120``
    Without ``PREFECT_API_URL`` each process starts its own temporary server (uvicorn + SQLite
    in ``PREFECT_HOME``). Measured on a 2-core machine: 17-23 s for the first flow of a process
    on a fresh database, 9-11 s once the database exists; Prefect's default 20 s timeout is too
    tight there. With ``PREFECT_API_URL`` pointing at a running ``prefect server start`` (or at
    ``ensure_api_server()``'s) a process pays only ``import prefect`` (about 1.5 s).

Keeping the user's profile visible: moving ``PREFECT_HOME`` would also move where Prefect looks
for ``profiles.toml``; when ``~/.prefect/profiles.toml`` exists (and ``PREFECT_HOME`` /
``PREFECT_PROFILES_PATH`` are not set) it stays the profiles file, so a ``PREFECT_API_URL`` the
user put in their profile still sends runs to their server. Pass ``user_profiles=False`` to
isolate completely (the tests do).
"""

from __future__ import annotations

import os
import sys
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# One entry per setting we manage: the name we set, then every other name Prefect accepts.
_ALIASES: dict[str, tuple[str, ...]] = {
    "PREFECT_HOME": (),
    "PREFECT_LOCAL_STORAGE_PATH": ("PREFECT_RESULTS_LOCAL_STORAGE_PATH",),
    "PREFECT_RESULTS_PERSIST_BY_DEFAULT": (),
    "PREFECT_RESULTS_DEFAULT_SERIALIZER": (),
    "PREFECT_SERVER_ANALYTICS_ENABLED": (),
    "PREFECT_CLIENT_MAX_RETRIES": (),
    "PREFECT_SERVER_EPHEMERAL_ENABLED": ("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE",),
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": (),
    "PREFECT_LOGGING_LEVEL": (),
}

USER_PROFILES = Path("~/.prefect/profiles.toml")


def _active_profile_keys(path: Path) -> set[str]:
    """The setting names the active profile in ``path`` sets (empty if unreadable)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return set()
    active = os.environ.get("PREFECT_PROFILE") or data.get("active") or "ephemeral"
    profile = (data.get("profiles") or {}).get(active) or {}
    return {str(k).upper() for k in profile}


def configure(
    home: Path | str | None = None,
    *,
    log_level: str | None = None,
    user_profiles: bool = True,
    env: dict[str, str] | None = None,
) -> dict[str, str]:
    """Point Prefect at ``home`` (default: ``selfprune.storage.paths.home()``); return what was set.

    ``env`` defaults to ``os.environ``; pass a copy to build the environment of a subprocess
    without touching this process (nothing is created on disk and Prefect is not refreshed).
    """
    from selfprune.storage.paths import root as selfprune_root
    from selfprune.storage.preflight import ensure_dir, warn_if_shared
    from selfprune.tasks.faults import outage_allowance, retries_for_outage

    in_process = env is None
    target = os.environ if env is None else env
    root = Path(home).expanduser().resolve() if home is not None else selfprune_root()

    explicit = {k for k in _ALIASES for name in (k, *_ALIASES[k]) if target.get(name, "") != ""}
    if user_profiles and not target.get("PREFECT_HOME") and not target.get("PREFECT_PROFILES_PATH"):
        user_file = USER_PROFILES.expanduser()
        if user_file.is_file():
            target["PREFECT_PROFILES_PATH"] = str(user_file)
            keys = _active_profile_keys(user_file)
            explicit |= {k for k in _ALIASES if keys & {k, *_ALIASES[k]}}

    wanted = {
        "PREFECT_HOME": str(root / "prefect"),
        "PREFECT_LOCAL_STORAGE_PATH": str(root / "results"),
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_RESULTS_DEFAULT_SERIALIZER": "json",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_CLIENT_MAX_RETRIES": str(retries_for_outage(outage_allowance(target))),
        "PREFECT_SERVER_EPHEMERAL_ENABLED": "true",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    }
    if log_level:
        wanted["PREFECT_LOGGING_LEVEL"] = log_level.upper()
    applied = {k: v for k, v in wanted.items() if k not in explicit}
    target.update(applied)

    if in_process:
        for key, what in (("PREFECT_HOME", "Prefect's local database"), ("PREFECT_LOCAL_STORAGE_PATH", "cached task results")):
            if key in applied:
                ensure_dir(Path(applied[key]), what, mode=0o700)
        refresh()
        warn_if_shared(read_back_dirs(root))
    return applied


def read_back_dirs(root: Path) -> list[tuple[Path, str]]:
    """(directory, what) for each directory whose files a selfprune process reads back, as the
    current settings place them: the cache root and what is in it, Prefect's home and its results."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    found = {root: "the selfprune cache (SELFPRUNE_HOME)"}
    if root.is_dir():
        found |= {p: "in the selfprune cache" for p in sorted(root.iterdir()) if p.is_dir() and p not in found}
    found[Path(settings.home)] = "Prefect's local database"
    found[Path(settings.results.local_storage_path)] = "cached task results"
    return list(found.items())


def refresh() -> None:
    """Make an already-imported Prefect re-read its settings from the environment."""
    if "prefect.context" in sys.modules:
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()


def results_dir() -> Path:
    """Where Prefect persists task results (the task cache) under the current settings."""
    from prefect.settings import get_current_settings

    return Path(get_current_settings().results.local_storage_path)


def ensure_api_server(timeout: float | None = None) -> str:
    """Return ``PREFECT_API_URL``, first starting a local server for this process if unset.

    The server is the one Prefect's ephemeral mode would start anyway (a uvicorn subprocess on
    127.0.0.1 using ``PREFECT_HOME``'s database, stopped when this process exits), but its URL
    is exported to ``os.environ`` so that subprocesses (workers, resumed runs) reuse it instead
    of each paying 10-20 s to start their own.
    """
    url = os.environ.get("PREFECT_API_URL", "")
    if url:
        return url
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url or start_temporary_server(timeout)
    os.environ["PREFECT_API_URL"] = url
    refresh()
    return url


STARTUP_WAIT = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"  # Prefect's own setting, honoured when set


def start_temporary_server(timeout: float | None = None) -> str | None:
    """Start the temporary server Prefect's ephemeral mode would start on first use (the same
    instance, which Prefect then reuses), ending with this process however it ends; settings are
    left as they are. Returns its URL; None when a server is configured. ``timeout``: seconds to
    wait for it to answer; by default ``$PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` where
    set, else 120 (Prefect's 20 is too short for a first start creating its database on a busy
    machine). Not answering in time is the machine's fault: an :class:`EnvironmentFault` that says
    what to do, not Prefect's traceback."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    if os.environ.get("PREFECT_API_URL") or get_current_settings().api.url:
        return None
    wait = timeout or float(os.environ.get(STARTUP_WAIT) or 120)
    server = SubprocessASGIServer()
    if not server.running:
        log = Path(get_current_settings().home) / SERVER_LOG
        try:
            with _output_to(log):
                server.start(timeout=wait)
        except RuntimeError as e:
            if "Timed out" not in str(e):
                raise
            from selfprune.core.errors import EnvironmentFault

            raise EnvironmentFault(
                f"the temporary Prefect server did not answer within {wait:g} s (a busy machine, or a first start "
                f"creating its database in {get_current_settings().home}; its log: {log}): run the same command again, wait longer "
                f"with {STARTUP_WAIT}=300, or start one with `prefect server start` and export "
                "PREFECT_API_URL=http://127.0.0.1:4200/api") from None
        stop_with_this_process(server.server_process.pid)
    return server.api_url


SERVER_LOG = "temporary-server.log"  # in PREFECT_HOME, beside the database the server uses


@contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """This process's stdout and stderr (the file descriptors) go to ``path`` while the block runs,
    so that the server it starts writes there for its whole life: its shutdown and its database's
    complaints are Prefect's own business, not lines at the end of a clean run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(path, "ab") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            yield
    finally:
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)


# A watchdog beside the temporary server: polls for this process's end (its parent pid changes)
# and then ends the server, SIGTERM and after 5 s SIGKILL. A clean exit stops the server first
# (Prefect's atexit), and the watchdog then finds it gone.
_WATCHDOG = """
import os, signal, sys, time
parent, server, started = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
signal.signal(signal.SIGINT, signal.SIG_IGN)
while os.getppid() == parent:
    time.sleep(0.5)
try:  # still the server we were started for (same start time), not a process that took its pid since
    if open(f"/proc/{server}/stat").read().rsplit(")", 1)[1].split()[19] != started:
        sys.exit(0)
except (OSError, IndexError):
    sys.exit(0)
for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
    try:
        os.kill(server, sig)
    except ProcessLookupError:
        break
    end = time.monotonic() + wait
    while time.monotonic() < end:
        try:
            os.kill(server, 0)
        except ProcessLookupError:
            sys.exit(0)
        time.sleep(0.1)
"""


def stop_with_this_process(server_pid: int) -> None:
    """End the temporary server ``server_pid`` when this process ends, however it ends: a SIGKILL
    (the OOM killer, a preempted job) skips the exit hooks that stop it, and it would stay
    behind, orphaned, with its port and memory."""
    import subprocess

    try:  # the server's start time (/proc/PID/stat field 22): Linux only
        started = Path(f"/proc/{server_pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return
    _WATCHDOGS.append(subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(server_pid), started],
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, start_new_session=True))


_WATCHDOGS: list = []  # kept referenced: they outlive this process by design


# ---------------------------------------------------------------------------------------------
# Every process that runs a selfprune flow: the CLI, a worker's flow-run process, `prefect
# flow-run retry`. They all import a flow module, so the flow package applies this on import
# (selfprune.flows.setup_flow_process).
# ---------------------------------------------------------------------------------------------
_PROGRESS_BARS_OFF = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}


def quiet_progress_bars() -> None:
    """No third-party progress bars (transformers' weight loading and shard writing, the hub's
    downloads, gguf's dequantization through plain tqdm): selfprune reports its own progress, and
    a worker's log would fill with redrawn bars. tqdm reads ``TQDM_DISABLE`` when it is first
    imported, so this runs before anything imports it where it can (the CLI's entry point)."""
    for key, value in _PROGRESS_BARS_OFF.items():
        os.environ.setdefault(key, value)
    try:  # transformers reads its own switch, not only the environment
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


def quiet_flow_logs() -> None:
    """One line per failure with its cause in Prefect's run logs, and no progress bars (model
    loading under a worker would otherwise fill its log with tqdm bars)."""

    from selfprune.tasks.faults import filter_failure_logs

    quiet_progress_bars()
    filter_failure_logs(drop=False)
