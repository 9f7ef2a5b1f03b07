"""Search benchmark on the demo model with the GA oracle, all figures from one run:

1. Prefect + cache overhead per candidate: the cached ``score_candidate`` task inside a flow
   against calling the scoring function directly (target <= 10% of one fitness evaluation);
2. search throughput against a naive loop that reloads the model and recomputes the statistics
   for every candidate (target >= 3x);
3. the wall time of rerunning a finished search (target <= 5% of the original).

Run: python bench/bench_search.py [--samples 16] [--population 6]
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
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--population", type=int, default=6)
    ap.add_argument("--generations", type=int, default=3)
    ap.add_argument("--naive", type=int, default=2, help="candidates for the naive loop")
    ap.add_argument("--overhead", type=int, default=4, help="candidates for the overhead comparison")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    from selfprune.data.demo import demo_corpus_path, demo_model_dir

    model, corpus = str(demo_model_dir()), str(demo_corpus_path())
    os.environ["SELFPRUNE_HOME"] = tempfile.mkdtemp(prefix="selfprune-bench-")
    from selfprune.tasks import prefect_env

    prefect_env.configure(user_profiles=False, log_level="ERROR")
    prefect_env.ensure_api_server()
    from selfprune.allocators.rates import project_to_mean
    from selfprune.config import SearchConfig
    from selfprune.engine.candidate import Structured
    from selfprune.engine.models import load_model
    from selfprune.engine.settings import Calibration, ModelSpec, Scoring
    from selfprune.engine.shared import shared_workbench
    from selfprune.engine.workbench import Workbench
    from selfprune.flows.search import search

    settings = dict(model=model, data=corpus, ratio=0.5, oracle="ga", population=args.population,
                    mutations=args.population // 2, crossovers=args.population // 2,
                    generations=args.generations, samples=args.samples, fitness_windows=4, test_windows=4,
                    device=args.device)
    t0 = time.perf_counter()
    first = search(SearchConfig(out=os.path.join(os.environ["SELFPRUNE_HOME"], "run1"), **settings))
    search_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = search(SearchConfig(out=os.path.join(os.environ["SELFPRUNE_HOME"], "run2"), **settings))
    rerun_s = time.perf_counter() - t0
    assert again["evaluations"] == 0 and again["rates"] == first["rates"]

    # 1. Overhead: the same fresh candidates scored directly, then through the cached task in a flow.
    from prefect import flow

    from selfprune.tasks.pruning import score_candidate

    calibration = Calibration(corpus, args.samples, 512)
    bench = shared_workbench(model, calibration, args.device)  # the flow's own, already loaded
    scoring = Scoring(corpus, "fitness", 512, 4)
    rng = random.Random(1)
    structures = [Structured(bench.pruner.structure(project_to_mean([rng.uniform(0, 0.9) for _ in range(30)], 0.5, 0.9)))
                  for _ in range(args.overhead)]
    t0 = time.perf_counter()
    for structure in structures:
        bench.score(structure, scoring)
    direct_s = (time.perf_counter() - t0) / len(structures)

    @flow(name="bench-overhead")
    def score_all() -> None:
        for structure in structures:
            score_candidate(ModelSpec(model, bench.lm.fingerprint, args.device), bench.stats_key, structure, scoring, calibration)

    t0 = time.perf_counter()
    score_all()
    task_s = (time.perf_counter() - t0) / len(structures)

    # 2. Naive loop: reload the model and recompute the statistics for every candidate.
    t0 = time.perf_counter()
    for structure in structures[: args.naive]:
        bench.calibrated.stats_path.unlink(missing_ok=True)
        fresh = Workbench(load_model(model, args.device), calibration)
        fresh.score(structure, scoring)
        del fresh
    naive_s = (time.perf_counter() - t0) / args.naive
    search_per_candidate = search_s / (first["evaluations"] + 3)  # +3: final test and uniform scores

    print(f"demo model, GA oracle, {args.samples} calibration windows, 4x512-token fitness")
    print(f"search: {first['evaluations']} evaluations + 3 final scores in {search_s:.1f} s "
          f"= {search_per_candidate:.2f} s per evaluation (model load, statistics, Prefect included)")
    print(f"Prefect + cache overhead per candidate: {task_s - direct_s:+.3f} s = "
          f"{(task_s - direct_s) / direct_s:.1%} of one fitness evaluation ({direct_s:.2f} s) (target <= 10%)")
    print(f"naive loop (reload + statistics + score): {naive_s:.1f} s per candidate -> search throughput "
          f"{naive_s / search_per_candidate:.1f}x (target >= 3x)")
    print(f"rerun of the finished search: {rerun_s:.1f} s = {rerun_s / search_s:.1%} of the original (target <= 5%)")


if __name__ == "__main__":
    main()
