"""The application: the CLI, Prefect settings and Prefect-aware faults, the inputs checked before a run."""
