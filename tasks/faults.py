"""The faults a long run meets outside its own code, as this process's Prefect settings place them.

:func:`preflight` runs before a flow does any work (the CLI calls it before Prefect starts its
temporary server; each flow calls it again, for runs a worker starts): every directory the run
writes must be writable, each device must hold the stated estimate (:func:`needs`), and a local
Prefect database must lock. :func:`explain` turns a failure during the run into one
:class:`~selfprune.core.errors.EnvironmentFault` when the machine caused it: a full disk, a read-only
directory, a Prefect server that stayed away longer than the outage allowance, or one that came
back without the run (its database was reset or replaced).

The outage allowance is Prefect's own client retrying: ``SELFPRUNE_API_OUTAGE_S`` (default 300)
sets ``PREFECT_CLIENT_MAX_RETRIES`` (:func:`retries_for_outage`; see :mod:`selfprune.tasks.prefect_env`).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from selfprune.config import AutopruneConfig, EvolutionConfig, ReportConfig, RunConfig
from selfprune.core.errors import EnvironmentFault, UserError
from selfprune.storage.preflight import MIB, Need, check, disk_fault, exception_chain

OUTAGE_ENV = "SELFPRUNE_API_OUTAGE_S"
DEFAULT_OUTAGE_S = 300

# What a run writes, measured on the demo search (184 task runs: a 5.7 MB database and a 4.4 MB
# write-ahead log, 4 KB per cached result), with headroom.
RESULT_BYTES = 16 << 10
DATABASE_BASE = 16 * MIB
DATABASE_PER_TASK_RUN = 64 << 10
HOME_BYTES = 64 * MIB  # statistics, token and fingerprint memos
OUT_BYTES = 2 * MIB  # summary, plots, report pages
LEDGER_LINE_BYTES = 2 << 10  # a line of evaluations.jsonl


def retries_for_outage(seconds: float) -> int:
    """Prefect's client waits 2, 4, 8, ... s (+-20 % jitter) between retries: the fewest retries
    whose waits add up to ``seconds``, so the allowance is between ``seconds`` and twice it."""
    return max(1, math.ceil(math.log2(max(seconds, 0) + 2)) - 1)


def outage_allowance(env: Mapping[str, str] = os.environ) -> float:
    """``SELFPRUNE_API_OUTAGE_S`` in seconds; a value that is not a positive number is bad input."""
    raw = env.get(OUTAGE_ENV, "").strip()
    if not raw:
        return DEFAULT_OUTAGE_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"{OUTAGE_ENV}={raw!r} is not a positive number of seconds; unset it for {DEFAULT_OUTAGE_S}")
    return value


@dataclass(frozen=True)
class Places:
    """Where this process's runs write: the cache home, Prefect's results, Prefect's local database
    (None when ``PREFECT_API_URL`` names a server: its database is that server's business)."""

    home: Path
    results: Path
    database: Path | None
    api_url: str | None

    @classmethod
    def current(cls) -> Places:
        from prefect.settings import get_current_settings

        from selfprune.storage.paths import root

        settings = get_current_settings()
        url = settings.server.database.connection_url.get_secret_value()
        database = Path(url.split(":///", 1)[1]) if not settings.api.url and url.startswith("sqlite") else None
        return cls(root(), Path(settings.results.local_storage_path), database, settings.api.url)

    def watched(self, out: str | None = None) -> list[Path]:
        extra = [self.database.parent] if self.database else []
        return [self.home, self.results, *extra, *([Path(out)] if out else [])]


def _task_runs(config: RunConfig) -> int:
    if isinstance(config, EvolutionConfig):
        evaluations = config.population + config.generations * (config.mutations + config.crossovers) + 2
        per_candidate = len(config.sparsities) if isinstance(config, AutopruneConfig) else 1
        finals = 5 * per_candidate if isinstance(config, AutopruneConfig) else 0  # the built-ins on the test split
        oracle = 2 * config.generations + 1 if config.oracle.startswith("openai") else 0
        return evaluations * per_candidate + finals + oracle + 1
    assert isinstance(config, ReportConfig)
    ratios = max(len(config.ratios), 1)
    metric_rows = len(config.metrics) * len(config.patterns) * len(config.metric_allocations) * ratios
    models = 1 + 2 * ratios + len(config.searches) + metric_rows
    return 1 + models * (2 + len(config.tasks))


def needs(config: EvolutionConfig | ReportConfig, places: Places) -> list[Need]:
    """The stated estimate of what a run of ``config`` writes, and where."""
    from selfprune.data.demo import demo_model_pending_bytes

    runs = _task_runs(config)
    home = HOME_BYTES + (demo_model_pending_bytes() if config.model == "demo" else 0)
    found = [
        Need("the cache (statistics, memos" + (", the demo model" if home > HOME_BYTES else "") + ")", places.home, home),
        Need("cached task results", places.results, runs * RESULT_BYTES),
        Need("the run's files", Path(config.out), OUT_BYTES + runs * LEDGER_LINE_BYTES),
    ]
    if places.database is not None:
        found.append(Need("Prefect's local database", places.database.parent,
                          DATABASE_BASE + runs * DATABASE_PER_TASK_RUN))
    return found


def preflight(config: EvolutionConfig | ReportConfig) -> None:
    """Before any work: writable directories, room for the estimate, a lockable local database."""
    places = Places.current()
    check(needs(config, places), places.database)


def rerun_command() -> str:
    """The command line of this process (the CLI's), to run again after the fix."""
    import shlex

    return "selfprune " + shlex.join(sys.argv[1:]) if Path(sys.argv[0]).name in ("selfprune", "cli.py") else "the same command"


def api_fault(exc: BaseException, url: str | None) -> EnvironmentFault | None:
    """The Prefect API's faults: the server gone longer than the allowance, or back without the run."""
    import httpx
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

    for e in exception_chain(exc):
        if isinstance(e, ObjectNotFound) or (isinstance(e, PrefectHTTPStatusError) and e.response.status_code == 404):
            return EnvironmentFault(
                f"the Prefect server at {url} no longer knows this run (its database was reset or replaced while the "
                "run went on)"
            )
        if isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadTimeout, httpx.RemoteProtocolError)):
            return EnvironmentFault(
                f"the Prefect server at {url} did not answer for longer than the outage allowance "
                f"({OUTAGE_ENV}={outage_allowance():.0f} s; raise it to ride through longer outages)"
            )
    return None


def explain(exc: BaseException, out: str | None = None) -> EnvironmentFault | None:
    """The EnvironmentFault behind ``exc`` (with what to do next), or None when it is not the machine's."""
    places = Places.current()
    fault = (api_fault(exc, places.api_url) if places.api_url else None) or disk_fault(exc, places.watched(out))
    if fault is None:
        return None
    return EnvironmentFault(f"{str(fault).rstrip('.')}. Every finished result is cached; rerun to resume: {rerun_command()}")


class FailureLogs:
    """The logging filter of Prefect's run loggers for a failure a user caused (a UserError: bad
    input, an oracle that stays down). Without ``drop`` (a worker's run log) its record keeps
    Prefect's one-line message, which names the exception and its text, without the traceback,
    unless the logger is at DEBUG. With ``drop`` (the CLI, whose main() prints the one line itself)
    it is dropped, and so is that of a failure the machine caused (:func:`explain`). Any other
    failure is a bug and keeps its traceback."""

    def __init__(self, drop: bool) -> None:
        self.drop = drop

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if self.drop:
            return not (isinstance(exc, UserError) or "UserError(" in str(record.msg)
                        or (exc is not None and explain(exc) is not None))
        if isinstance(exc, UserError) and not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            record.exc_info, record.exc_text = None, None
        return True


def filter_failure_logs(drop: bool) -> None:
    """:class:`FailureLogs` on Prefect's flow-run and task-run loggers, once for each ``drop``."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, FailureLogs) and f.drop == drop for f in logger.filters):
            logger.addFilter(FailureLogs(drop))
