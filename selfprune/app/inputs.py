"""A run's inputs, checked before Prefect starts: everything that needs no model loaded.

A typo in a model path or hub id, a data file, an oracle name, an oracle's key or a rate file
fails in about a second with one line (a UserError, exit 2), not after a temporary Prefect server
and a flow run have started (tens of seconds) and with retry advice that would fail the same way.
The CLI calls :func:`check_inputs` before it configures Prefect. Each check is the validator the
run itself applies later (:mod:`selfprune.engine.models`, :mod:`selfprune.data.corpora`, the searches' own
``check``, :mod:`selfprune.llm.endpoint`, the report's search files), so each rule lives once.
"""

from __future__ import annotations

from ..config import AutopruneConfig, EvolutionConfig, ReportConfig, RunConfig, SearchConfig
from ..core.errors import UserError


def check_inputs(config: RunConfig) -> None:
    """Model, data, the search's settings and oracle, the oracle's key, and the report's search files.
    (Imports here: torch and transformers come with them, which ``selfprune --help`` need not wait for.)"""
    from ..data.corpora import check_data
    from ..engine.models import check_model

    check_model(config.model)
    check_data(config.data)
    if isinstance(config, SearchConfig):
        from ..evolve import runner

        runner.check(config)
    if isinstance(config, AutopruneConfig):
        from ..evolve import autoprune

        autoprune.check(config)
    if isinstance(config, EvolutionConfig):
        check_oracle_key(config)
    if isinstance(config, ReportConfig):
        from ..evaluate.report import read_searches

        for path in config.searches:
            read_searches(path)


def check_oracle_key(config: EvolutionConfig) -> None:
    """An ``openai:`` oracle has the key its server needs (:func:`~selfprune.llm.endpoint.api_key`).
    Checked here, not by the flow: a deployment's rerun whose replies are all cached needs none."""
    from ..llm.endpoint import missing_key

    missing = missing_key(config.base_url, config.api_key_env) if config.oracle.startswith("openai:") else None
    if missing:
        raise UserError(missing)
