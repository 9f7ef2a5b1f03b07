"""AutoPrune's metric search as a Prefect flow: the library's loop with cached tasks injected.

The loop is :func:`selfprune.evolve.autoprune.run` (itself the rate search's
:func:`~selfprune.evolve.evolution.run_search` over metric texts), the one ``selfprune.autoprune``
runs, through the same flow body as ``flows/search.py`` (:func:`selfprune.flows.evolution.run_flow`):
a generation's metrics are scored as one batch of cached ``score_candidate`` tasks (a metric's
candidate: canonical metric, pattern, allocation, sparsity), oracle requests go through the cached
``oracle_call`` task, and each generation publishes artifacts; so a rerun after a crash, a SIGKILL
or a failed run redoes only what had not completed, replays the
LLM's replies and follows the same path.
"""

from __future__ import annotations

import selfprune.flows  # noqa: F401  (first: selfprune's Prefect settings and quiet logs; flows/__init__.py)

# isort: split

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from selfprune.artifacts.report import metric_markdown, plot_history, plot_metric_graph
from selfprune.config import AutopruneConfig
from selfprune.evolve import autoprune as library
from selfprune.flows.evolution import View, run_flow
from selfprune.model.arch import Arch


def final(summary: library.MetricSummary, config: AutopruneConfig, arch: Arch, out: Path, key: str) -> None:
    plot_history(summary, config, out / "fitness.png")
    plot_metric_graph(summary, config, out / "metrics.png")
    lines = [f"| {name} | " + " | ".join(f"{ppl:.3f}" for ppl in by_s.values()) + " |"
             for name, by_s in summary.test_ppl.items()]
    create_markdown_artifact(
        metric_markdown(config.generations, {"metric": summary.metric, "fitness": summary.fitness,
                                             "source": "search", "edit": ""})
        + f"\nTest perplexity ({config.pattern}, {config.allocation} allocation):\n\n"
        + "| metric | " + " | ".join(str(s) for s in config.sparsities) + " |\n"
        + "| --- |" + " --- |" * len(config.sparsities) + "\n" + "\n".join(lines)
        + f"\n\nplots: `{out / 'fitness.png'}`, `{out / 'metrics.png'}`\n",
        key=f"{key}-final",
    )


VIEW = View(row=lambda r: {"metric": r["metric"], "fitness": round(r["fitness"], 4), "from": r["source"], "edit": r["edit"]},
            best=lambda arch: metric_markdown, final=final)


@flow(name="selfprune-autoprune")
def autoprune(config: AutopruneConfig) -> dict:
    """Search a pruning metric judged at ``config.sparsities``; write ``config.out``/best.json and plots.
    With ``seeds``, one subflow run per seed (``seed-N``) and ``config.out``/seeds.json."""
    return run_flow(library.METRIC, VIEW, config, "selfprune.flows.autoprune.autoprune",
                    lambda one: autoprune.with_options(flow_run_name=f"seed-{one.seed}")(one))
