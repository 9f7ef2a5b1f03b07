"""The application's front: the CLI and the inputs it checks before a run (Prefect's settings and faults: ``selfprune.tasks``)."""
