"""Self-Pruner's search as a Prefect flow: the library's loop with cached tasks injected.

The loop is :func:`selfprune.evolve.runner.run`, the one the library's ``selfprune.search`` runs.
Its body is :func:`selfprune.flows.evolution.run_flow`, which injects: candidate scoring through the cached
``score_candidate`` task (a generation's candidates submitted as one batch to the run's task runner:
this process, or Dask / Ray workers side by side with ``--runner``), oracle requests through the cached ``oracle_call`` task, and a
per-generation hook that publishes artifacts. Running
the same configuration again after a crash, a SIGKILL or a failed run redoes only what had not
completed and follows the same path: the oracles are deterministic given the seed, and LLM replies
are replayed from the cache.
"""

from __future__ import annotations

import selfprune.flows  # noqa: F401  (first: selfprune's Prefect settings and quiet logs; flows/__init__.py)

# isort: split

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from selfprune.artifacts.report import best_markdown, fmt_rates, plot_history, plot_rates
from selfprune.config import SearchConfig
from selfprune.evolve import runner
from selfprune.flows.evolution import View, run_flow
from selfprune.model.arch import Arch


def final(summary: runner.RateSummary, config: SearchConfig, arch: Arch, out: Path, key: str) -> None:
    plot_history(summary, config, out / "fitness.png")
    plot_rates(summary, config, out / "rates.png")
    best = {"fitness": summary.fitness, "kept_params": summary.kept_params, "rates": summary.rates}
    create_markdown_artifact(
        best_markdown(config.generations, best, arch.n_layers)
        + f"- test perplexity: **{summary.test_ppl:.4f}** (uniform Wanda-sp: {summary.uniform_test_ppl:.4f}), "
        f"{summary.test_tokens} tokens in {config.seqlen}-token windows\n"
        f"- plots: `{out / 'fitness.png'}`, `{out / 'rates.png'}`\n",
        key=f"{key}-final",
    )


VIEW = View(row=lambda r: {"rates": fmt_rates(r["rates"]), "kept_params": r["kept_params"], "fitness": round(r["fitness"], 4)},
            best=lambda arch: lambda i, best: best_markdown(i, best, arch.n_layers), final=final)


@flow(name="selfprune-search")
def search(config: SearchConfig) -> dict:
    """Search per-layer rates with mean ``config.ratio``; write ``config.out``/best.json and plots.
    With ``seeds``, one subflow run per seed (``seed-N``) and ``config.out``/seeds.json."""
    return run_flow(runner.RATES, VIEW, config, "selfprune.flows.search.search",
                    lambda one: search.with_options(flow_run_name=f"seed-{one.seed}")(one))
