"""Candidates on Dask workers against this process, on the demo model, all figures from one run:

1. generation throughput: a batch of candidates on 2 Dask workers against 1 (and the local runner);
2. the engine's per-candidate overhead (submission, a task run, the result coming back) on one
   Dask worker against scoring the same candidates directly in this process (target <= 5%).

Every runner scores its own fresh random structures at ratio 0.5 (so no cache answers), after a
warm-up batch that loads the model into each worker. Workers run one thread each; the direct and
local figures use one thread too, so the comparison is per process, and on a machine with C cores
at most C workers can run at once.

Run: python bench/bench_runners.py [--candidates 8] [--samples 16]
A fresh SELFPRUNE_HOME (temporary) keeps every cache cold; the demo files are reused.
"""

from __future__ import annotations

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

    from selfprune.demo import demo_corpus_path, demo_model_dir

    model, corpus = str(demo_model_dir()), str(demo_corpus_path())
    os.environ["SELFPRUNE_HOME"] = tempfile.mkdtemp(prefix="selfprune-bench-")
    os.environ["DASK_LOGGING__DISTRIBUTED"] = "warning"
    import torch

    torch.set_num_threads(1)
    from selfprune import prefect_env

    prefect_env.configure(user_profiles=False, log_level="ERROR")
    prefect_env.ensure_api_server()
    from prefect import flow

    from selfprune.allocation import project_to_mean, structure_from_json, structure_to_json
    from selfprune.config import SearchConfig
    from selfprune.evolve import runner
    from selfprune.flows.evolution import batch_scorer, task_runner
    from selfprune.workbench import Scoring, shared_workbench

    base = SearchConfig(model=model, data=corpus, samples=args.samples, fitness_windows=4, device="cpu")
    calibration = vars(runner.calibration(base))
    bench = shared_workbench(model, runner.calibration(base), "cpu")
    rng = random.Random(1)

    def batch(n: int) -> list:
        return [structure_to_json(bench.structure(project_to_mean([rng.uniform(0, 0.9) for _ in range(30)], 0.5, 0.9)))
                for _ in range(n)]

    scoring = Scoring(corpus, "fitness", 512, 4)
    direct = batch(args.candidates)
    t0 = time.perf_counter()
    for s in direct:
        bench.score(structure_from_json(s), scoring)
    direct_s = (time.perf_counter() - t0) / args.candidates

    @flow(name="bench-runners")
    def timed(config: SearchConfig) -> float:
        with task_runner(config) as workers:
            score = batch_scorer(config, bench.lm.fingerprint, bench.stats_key, calibration, "", workers)
            score(batch(2 * config.workers), "fitness", 4)  # warm-up: each worker loads the model
            todo = batch(args.candidates)
            t0 = time.perf_counter()
            score(todo, "fitness", 4)
            return (time.perf_counter() - t0) / args.candidates

    per = {"local": timed(base)}
    for n in (1, 2):
        per[f"dask x{n}"] = timed(base.model_copy(update={"runner": "dask", "workers": n}))
    print(f"demo model, ratio 0.5, {args.candidates} candidates per batch, fitness 4 x 512 tokens, 1 thread per process, "
          f"{os.cpu_count()} cores")
    print(f"direct (no Prefect): {direct_s:.2f} s per candidate")
    for name, s in per.items():
        print(f"{name}: {s:.2f} s per candidate = {direct_s / s:.2f}x the direct throughput")
    print(f"generation throughput, 2 Dask workers vs 1: {per['dask x1'] / per['dask x2']:.2f}x")
    print(f"engine overhead per candidate, 1 Dask worker vs direct: {per['dask x1'] - direct_s:+.3f} s = "
          f"{(per['dask x1'] - direct_s) / direct_s:.1%} of one fitness evaluation (target <= 5%)")


if __name__ == "__main__":  # Dask spawns processes
    main()
