"""Candidates on Dask workers against this process, on the demo model, all figures from one run:

1. generation throughput: a batch of candidates on 2 Dask workers against 1 (and the local runner);
2. the engine's per-candidate overhead (submission, a task run, the result coming back) on one
   Dask worker against scoring the same candidates directly in this process (target <= 5%).

Every runner scores its own fresh random structures at ratio 0.5 (so no cache answers), after a
warm-up batch that loads the model into each worker. Workers run one thread each; the direct and
local figures use one thread too, so the comparison is per process, and on a machine with C cores
at most C workers can run at once.

Measured here (2 cores, one run): direct 5.29 s, local 5.18 s, 1 Dask worker 5.34 s (+1.0%),
2 Dask workers 3.10 s per candidate (1.72x). Two findings it made: Dask's default
MALLOC_TRIM_THRESHOLD_ slowed the workers' forward passes by ~25% (flows/evolution.py now drops
it), and a flow closing over a loaded model pickles that model into every Dask submission.

Run: python bench/bench_runners.py [--candidates 8] [--samples 16]
A fresh SELFPRUNE_HOME (temporary) keeps every cache cold; the demo files are reused.
"""

import argparse
import os
import random
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--samples", type=int, default=16)
    args = ap.parse_args()

    from selfprune.data.demo import demo_corpus_path, demo_model_dir

    model, corpus = str(demo_model_dir()), str(demo_corpus_path())
    os.environ["SELFPRUNE_HOME"] = tempfile.mkdtemp(prefix="selfprune-bench-")
    os.environ["DASK_LOGGING__DISTRIBUTED"] = "warning"
    import torch

    torch.set_num_threads(1)
    from selfprune.tasks import prefect_env

    prefect_env.configure(user_profiles=False, log_level="ERROR")
    prefect_env.ensure_api_server()
    from prefect import flow

    from selfprune.allocators.rates import project_to_mean
    from selfprune.config import SearchConfig
    from selfprune.engine.candidate import Structured
    from selfprune.engine.settings import Scoring
    from selfprune.engine.shared import shared_workbench
    from selfprune.evolve import pipeline
    from selfprune.flows.evolution import batch_scorer, task_runner

    base = SearchConfig(model=model, data=corpus, samples=args.samples, fitness_windows=4, device="cpu")
    calibration = vars(pipeline.calibration(base))
    bench = shared_workbench(model, pipeline.calibration(base), "cpu")
    rng = random.Random(1)

    def batch(n: int) -> list:
        return [Structured(bench.pruner.structure(project_to_mean([rng.uniform(0, 0.9) for _ in range(30)], 0.5, 0.9)))
                for _ in range(n)]

    scoring = Scoring(corpus, "fitness", 512, 4)

    def direct() -> float:
        """Seconds per candidate scored in this process, after one untimed warm-up candidate."""
        todo = batch(args.candidates + 1)
        bench.score(todo[0], scoring)
        t0 = time.perf_counter()
        for s in todo[1:]:
            bench.score(s, scoring)
        return (time.perf_counter() - t0) / args.candidates

    first = direct()

    model_fp, stats_key = bench.lm.fingerprint, bench.stats_key

    # The flow closes over plain values only: Prefect ships the flow run's context (the flow
    # included) with every Dask submission, and a closure over the workbench would pickle the model.
    @flow(name="bench-runners")
    def timed(config: SearchConfig, warm_up: list, todo: list) -> float:
        with task_runner(config) as workers:
            score = batch_scorer(config, model_fp, stats_key, calibration, "", workers)
            score(warm_up, "fitness", 4)  # each worker loads the model
            t0 = time.perf_counter()
            score(todo, "fitness", 4)
            return (time.perf_counter() - t0) / len(todo)

    per = {"local": timed(base, batch(2), batch(args.candidates))}
    for n in (1, 2):
        per[f"dask x{n}"] = timed(base.model_copy(update={"runner": "dask", "workers": n}), batch(2 * n),
                                  batch(args.candidates))
    after = direct()
    direct_s = (first + after) / 2  # before and after the runners: the machine drifts
    print(f"demo model, ratio 0.5, {args.candidates} candidates per batch, fitness 4 x 512 tokens, 1 thread per process, "
          f"{os.cpu_count()} cores")
    print(f"direct (no Prefect): {direct_s:.2f} s per candidate (mean of {first:.2f} before, {after:.2f} after)")
    for name, s in per.items():
        print(f"{name}: {s:.2f} s per candidate = {direct_s / s:.2f}x the direct throughput")
    print(f"generation throughput, 2 Dask workers vs 1: {per['dask x1'] / per['dask x2']:.2f}x")
    print(f"engine overhead per candidate, 1 Dask worker vs direct: {per['dask x1'] - direct_s:+.3f} s = "
          f"{(per['dask x1'] - direct_s) / direct_s:.1%} of one fitness evaluation (target <= 5%)")


if __name__ == "__main__":  # Dask spawns processes
    main()
