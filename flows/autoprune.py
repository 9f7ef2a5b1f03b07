"""AutoPrune's metric search as a Prefect flow: the library's loop with cached tasks injected.

The loop is :func:`selfprune.evolve.autoprune.run` (itself the rate search's
:func:`~selfprune.evolve.evolution.run_search` over metric texts), the one ``selfprune.autoprune``
runs. As in ``flows/search.py``, a generation's metrics are scored as one batch of cached
``score_candidate`` tasks (a metric's candidate: canonical metric, pattern, allocation, sparsity),
oracle requests go through the cached ``oracle_call`` task, and each generation publishes artifacts;
so a rerun after a crash, a SIGKILL or a failed run redoes only what had not completed, replays the
LLM's replies and follows the same path.
"""

from __future__ import annotations

import selfprune.flows  # noqa: F401  (first: selfprune's Prefect settings and quiet logs; flows/__init__.py)

# isort: split

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from selfprune.artifacts.report import metric_markdown, plot_history, plot_metric_graph
from selfprune.config import AutopruneConfig
from selfprune.evolve import autoprune as library
from selfprune.evolve.pipeline import write_summary
from selfprune.flows.evolution import artifact_key, batch_scorer, cached_transport, prepare, publisher, task_runner
from selfprune.seeds import over_seeds


@flow(name="selfprune-autoprune")
def autoprune(config: AutopruneConfig) -> dict:
    """Search a pruning metric judged at ``config.sparsities``; write ``config.out``/best.json and plots.
    With ``seeds``, one subflow run per seed (``seed-N``) and ``config.out``/seeds.json."""
    if config.seeds:
        return over_seeds(config, lambda one: autoprune.with_options(flow_run_name=f"seed-{one.seed}")(one),
                          library.figures)
    logger = get_run_logger()
    with task_runner(config) as workers:
        out, setup = prepare(config, logger, "selfprune.flows.autoprune.autoprune", library.check, workers)
        calls = {"oracle_calls": 0, "oracle_replays": 0}
        score = batch_scorer(config, setup, str(out / "evaluations.jsonl"), workers,
                             tolerate_invalid=True)
        publish = publisher(config, logger, lambda r: {"metric": r["metric"], "fitness": round(r["fitness"], 4),
                                                       "from": r["source"], "edit": r["edit"]}, metric_markdown, "GP")
        summary = library.run(config, setup, score, cached_transport(config, calls), publish) | calls
    write_summary(summary, out)
    plot_history(summary, config, out / "fitness.png")
    plot_metric_graph(summary, config, out / "metrics.png")
    lines = [f"| {name} | " + " | ".join(f"{ppl:.3f}" for ppl in by_s.values()) + " |"
             for name, by_s in summary["test_ppl"].items()]
    create_markdown_artifact(
        metric_markdown(config.generations, {"metric": summary["metric"], "fitness": summary["fitness"],
                                             "source": "search", "edit": ""})
        + f"\nTest perplexity ({config.pattern}, {config.allocation} allocation):\n\n"
        + "| metric | " + " | ".join(str(s) for s in config.sparsities) + " |\n"
        + "| --- |" + " --- |" * len(config.sparsities) + "\n" + "\n".join(lines)
        + f"\n\nplots: `{out / 'fitness.png'}`, `{out / 'metrics.png'}`\n",
        key=f"{artifact_key(config)}-final",
    )
    return summary
