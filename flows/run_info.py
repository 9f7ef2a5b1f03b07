"""Where a flow run can be found and how to rerun it: said at its start and in every failure."""

from __future__ import annotations

import os
import shlex
from logging import Logger


def ui_url(flow_run_id: str) -> str | None:
    """The run's page when a Prefect server is configured (``PREFECT_API_URL``/``PREFECT_UI_URL``);
    None for the temporary server of a run without one (it is gone when the run ends)."""
    from prefect.settings import get_current_settings

    base = get_current_settings().ui_url
    return f"{base.rstrip('/')}/runs/flow-run/{flow_run_id}" if base else None


def _environment() -> str:
    """The variables a shell needs to find this run and its cache: ``SELFPRUNE_HOME`` when set, and
    ``PREFECT_HOME`` when no server is configured (the run lives in that temporary server's database)."""
    from prefect.settings import get_current_settings

    names = ["SELFPRUNE_HOME"] + ([] if get_current_settings().api.url else ["PREFECT_HOME"])
    return "".join(f"{name}={shlex.quote(os.path.expanduser(os.environ[name]))} " for name in names if os.environ.get(name))


def retry_hint(flow_run_id: str, entrypoint: str, deployed: bool) -> str:
    """The exact rerun command: a deployment's run is retried by id (or the UI's Retry) and runs
    again on a worker, under the deployment's job variables; a run without a deployment needs the
    flow's entrypoint and its environment, and resumes in the calling process."""
    cmd = (f"prefect flow-run retry {flow_run_id}" if deployed
           else f"{_environment()}prefect flow-run retry {flow_run_id} --entrypoint {entrypoint}")
    url = ui_url(flow_run_id)
    where = f" (UI: {url}{', Retry button' if deployed else ''})" if url else ""
    return f"flow run {flow_run_id}{where}; retry it with: {cmd}, or run the same command again"


def announce_run(logger: Logger, entrypoint: str) -> None:
    """Log the current flow run's id, page and retry command at its start."""
    from prefect.runtime import deployment, flow_run

    logger.info(retry_hint(flow_run.id, entrypoint, bool(deployment.id)))
