"""The Prefect flows of selfprune. Importing this package (every flow module does, first)
applies selfprune's Prefect settings and quiet logs to the process: see
:func:`selfprune.app.prefect_env.setup_flow_process`."""

from selfprune.app.prefect_env import setup_flow_process as _setup

_setup()
