"""The Prefect flows of selfprune. Importing this package (every flow module does, first) applies
selfprune's Prefect settings and quiet logs to the process: :func:`setup_flow_process`."""

from selfprune.tasks.caching import guard_prefect_results
from selfprune.tasks.prefect_env import configure, quiet_flow_logs


def setup_flow_process() -> dict[str, str]:
    """selfprune's Prefect settings (:func:`~selfprune.tasks.prefect_env.configure`: the cache under
    ``$SELFPRUNE_HOME/results``, JSON results, ...) and quiet logs, for whatever process imports the flows.

    Called when this package is imported, which every flow module does first; so a run the CLI
    starts, one a worker starts (``python -m prefect.engine`` imports the deployment's entrypoint),
    and ``prefect flow-run retry`` all use one cache and one result format, and read every persisted
    result as plain JSON (:func:`selfprune.tasks.caching.guard_prefect_results`). Settings the user
    set stay as they are; Prefect's already-loaded settings are refreshed.
    """
    applied = configure()
    guard_prefect_results()
    quiet_flow_logs()
    return applied


setup_flow_process()
