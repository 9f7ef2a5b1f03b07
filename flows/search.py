"""Self-Pruner's search as a Prefect flow: the library's loop with cached tasks injected.

The loop is :func:`selfprune.evolve.runner.run`, the one the library's ``selfprune.search`` runs.
This flow injects (:mod:`selfprune.flows.evolution`): candidate scoring through the cached
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

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from selfprune.artifacts.report import best_markdown, fmt_rates, plot_history, plot_rates
from selfprune.config import SearchConfig
from selfprune.evolve import runner
from selfprune.evolve.pipeline import write_summary
from selfprune.flows.evolution import artifact_key, batch_allocator, batch_scorer, cached_transport, prepare, publisher, task_runner
from selfprune.seeds import over_seeds


@flow(name="selfprune-search")
def search(config: SearchConfig) -> dict:
    """Search per-layer rates with mean ``config.ratio``; write ``config.out``/best.json and plots.
    With ``seeds``, one subflow run per seed (``seed-N``) and ``config.out``/seeds.json."""
    if config.seeds:
        return over_seeds(config, lambda one: search.with_options(flow_run_name=f"seed-{one.seed}")(one), runner.figures)
    logger = get_run_logger()
    with task_runner(config) as workers:
        out, setup = prepare(config, logger, "selfprune.flows.search.search", runner.check, workers)
        calls = {"oracle_calls": 0, "oracle_replays": 0}
        score = batch_scorer(config, setup, str(out / "evaluations.jsonl"), workers)
        publish = publisher(config, logger, lambda r: {"rates": fmt_rates(r["rates"]), "kept_params": r["kept_params"],
                                                       "fitness": round(r["fitness"], 4)},
                            lambda i, best: best_markdown(i, best, setup.arch.n_layers), "GA")
        allocate = batch_allocator(config, setup, workers)
        summary = runner.run(config, setup, score, cached_transport(config, calls), publish, allocate) | calls
    write_summary(summary, out)
    plot_history(summary, config, out / "fitness.png")
    plot_rates(summary, config, out / "rates.png")
    create_markdown_artifact(
        best_markdown(config.generations, summary, setup.arch.n_layers)
        + f"- test perplexity: **{summary['test_ppl']:.4f}** (uniform Wanda-sp: {summary['uniform_test_ppl']:.4f}), "
        f"{summary['test_tokens']} tokens in {config.seqlen}-token windows\n"
        f"- plots: `{out / 'fitness.png'}`, `{out / 'rates.png'}`\n",
        key=f"{artifact_key(config)}-final",
    )
    return summary
