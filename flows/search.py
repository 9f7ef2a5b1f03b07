"""Self-Pruner's search as a Prefect flow: the library's loop with cached tasks injected.

The loop is :func:`selfprune.evolve.runner.run`, the one the library's ``selfprune.search`` runs.
This flow injects: candidate scoring through the cached ``score_candidate`` task (a generation's
candidates submitted as one batch, so the task runner may run them side by side), oracle requests
through the cached ``oracle_call`` task, and a per-generation hook that publishes artifacts. Running
the same configuration again after a crash, a SIGKILL or a failed run redoes only what had not
completed and follows the same path: the oracles are deterministic given the seed, and LLM replies
are replayed from the cache.
"""

from __future__ import annotations

import selfprune.flows  # noqa: F401  (first: selfprune's Prefect settings and quiet logs; flows/__init__.py)

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from selfprune.arch import Arch
from selfprune.artifacts.report import best_markdown, fmt_rates, plot_history, plot_rates
from selfprune.config import SearchConfig
from selfprune.evolve import runner
from selfprune.faults import preflight
from selfprune.evolve.oracles import ChatRequest, Reply
from selfprune.models import load_tokenizer, model_fingerprint
from selfprune.tasks.caching import kept_result
from selfprune.tasks.oracle import oracle_call
from selfprune.tasks.pruning import capture_statistics, score_candidate
from selfprune.flows.run_info import announce_run


def _artifact_key(config: SearchConfig) -> str:
    return "selfprune-" + "".join(c if c.isalnum() else "-" for c in Path(config.out).name.lower())


# One candidate at a time by default: candidates share the one loaded model (and, on a GPU, its
# memory). The batch is still submitted whole, so a larger pool only needs a different runner.
@flow(name="selfprune-search", task_runner=ThreadPoolTaskRunner(max_workers=1))
def search(config: SearchConfig) -> dict:
    """Search per-layer rates with mean ``config.ratio``; write ``config.out``/best.json and plots."""
    logger = get_run_logger()
    announce_run(logger, "selfprune.flows.search.search")
    preflight(config)
    runner.check(config)
    runner.check_windows(config, load_tokenizer(config.model))  # the tokenizer only: a cached rerun reads no weights
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    calibration = vars(runner.calibration(config))
    model_fp = model_fingerprint(config.model)
    stats = capture_statistics(config.model, model_fp, calibration, config.device, config.dtype)
    setup = runner.Setup(Arch(**stats["arch"]), model_fp, stats["stats_key"])
    calls = {"oracle_calls": 0, "oracle_replays": 0}

    def score(structures: list, split: str, windows: int | None) -> list[dict]:
        how = vars(runner.scoring(config, split, windows))
        futures = [score_candidate.submit(config.model, model_fp, setup.stats_key, s, how, calibration, config.device,
                                          config.dtype, str(out / "evaluations.jsonl"), method=config.method)
                   for s in structures]
        for f in futures:
            f.wait()
        return [kept_result(f.state) | {"cached": f.state.name == "Cached"} for f in futures]

    def transport(request: ChatRequest) -> Reply:
        ask = (request.to_dict(), config.base_url, config.oracle_timeout)
        state = oracle_call(*ask, return_state=True)
        if state.name == "Cached" and Reply.from_dict(state.result()).text is None:
            # A late reply is not replayed: this run asks again (with a longer --oracle-timeout, say).
            state = oracle_call.with_options(refresh_cache=True)(*ask, return_state=True)
        calls["oracle_replays" if state.name == "Cached" else "oracle_calls"] += 1
        return Reply.from_dict(kept_result(state))

    key = _artifact_key(config)
    progress = create_progress_artifact(0.0, key=f"{key}-progress", description="generations done")

    def publish(g: runner.GenerationReport) -> None:
        rows = [{"rates": fmt_rates(r["rates"]), "kept_params": r["kept_params"], "fitness": round(r["fitness"], 4),
                 "origin": "cache" if r["cached"] else config.oracle} for r in g.rows]
        replies = "" if g.oracle is None else "; oracle replies so far: " + ", ".join(
            f"{n} {kind}" for kind, n in g.oracle["replies"].items()) + f", {g.oracle['fallbacks']} GA fallbacks"
        create_table_artifact(rows, key=f"{key}-gen-{g.index}",
                              description=f"generation {g.index}: {len(rows)} candidates{replies}")
        create_markdown_artifact(best_markdown(g.index, g.population[0], setup.arch.n_layers), key=f"{key}-best")
        update_progress_artifact(progress, 100.0 * (g.index + 1) / (g.generations + 1))
        logger.info(f"generation {g.index}/{g.generations}: best {g.best:.3f}, mean {g.mean:.3f} | "
                    f"{g.evaluated} evaluated, {g.cached} cached{replies}")

    summary = runner.run(config, setup, score, transport, publish) | calls
    runner.write_summary(summary, out)
    plot_history(summary["history"], out / "fitness.png")
    plot_rates(summary["rates"], config.ratio, out / "rates.png")
    create_markdown_artifact(
        best_markdown(config.generations, summary, setup.arch.n_layers)
        + f"- test perplexity: **{summary['test_ppl']:.4f}** (uniform Wanda-sp: {summary['uniform_test_ppl']:.4f}), "
        f"{summary['test_tokens']} tokens in {config.seqlen}-token windows\n"
        f"- plots: `{out / 'fitness.png'}`, `{out / 'rates.png'}`\n",
        key=f"{key}-final",
    )
    return summary
