"""Staged fitness against single-stage on the demo model: best test perplexity against fitness tokens scored.

Two GA searches with README's demo settings (K = 10, M = S = 4, N = 5, 4 fitness windows of 512
tokens) at ratio 0.5, one with ``--fitness-stages 1:0.5`` (every new candidate on 1 window, the
best half on all 4). After each generation the best so far is scored on the test split; the
x axis counts the tokens of every fitness evaluation computed so far (screening stages included).
Writes docs/staged-fitness.png and prints one line per generation.

Run: python bench/bench_staged.py [--ratio 0.5] [--test-windows 16] [--stages 1:0.5]
"""

from __future__ import annotations

import argparse
import json


def curve(config, label: str) -> list[tuple[int, float]]:
    """(fitness tokens scored so far, best candidate's test ppl) after each generation of one search."""
    from selfprune.core.progress import ignore, one_by_one
    from selfprune.engine.candidate import from_json
    from selfprune.engine.shared import shared_workbench
    from selfprune.evolve import pipeline, runner

    bench = shared_workbench(config.model, pipeline.calibration(config), config.device, config.dtype)
    setup = pipeline.Setup(bench.arch, pipeline.model_spec(config, bench.lm.fingerprint), bench.stats_key)
    spent, points = [0], []

    def score(candidates: list, split: str, windows: int | None, *, advance=ignore) -> list[pipeline.Measurement]:
        how = pipeline.scoring(config, split, windows)
        measured = one_by_one(lambda c: pipeline.Measurement.of(bench.score(c, how).to_dict()), candidates, advance)
        if split == "fitness":
            spent[0] += sum(m.tokens for m in measured)
        return measured

    def on_generation(g: pipeline.GenerationReport) -> None:
        best = from_json(g.population[0]["structure"])
        test = bench.score(best, pipeline.scoring(config, "test", config.test_windows)).ppl
        points.append((spent[0], test))
        print(json.dumps({"run": label, "generation": g.index, "fitness_tokens": spent[0], "best_fitness": g.best,
                          "best_test_ppl": test}), flush=True)

    runner.run(config, setup, pipeline.Injected(score, on_generation=on_generation))
    return points


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--stages", default="1:0.5")
    ap.add_argument("--test-windows", type=int, default=16)
    ap.add_argument("--plot", default="docs/staged-fitness.png")
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from selfprune.config import SearchConfig

    curves = {}
    for label, stages in (("single stage", []), (f"staged {args.stages}", args.stages.split(","))):
        config = SearchConfig(model="demo", data="demo", ratio=args.ratio, oracle="ga", population=10, mutations=4,
                              crossovers=4, generations=5, samples=32, fitness_windows=4, device="cpu",
                              fitness_stages=stages, test_windows=args.test_windows, out="/tmp/selfprune-bench-staged")
        curves[label] = curve(config, label)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, points in curves.items():
        ax.plot([t / 1e3 for t, _ in points], [p for _, p in points], marker="o", label=label)
    ax.set_xlabel("fitness tokens scored (thousands)")
    ax.set_ylabel(f"best candidate's test ppl ({args.test_windows} x 512)")
    ax.set_yscale("log")
    ax.set_title(f"demo model, ratio {args.ratio}, GA K=10 M=S=4 N=5")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    for label, points in curves.items():
        print(f"{label}: {points[-1][0]:,} fitness tokens -> best test ppl {points[-1][1]:.2f}")


if __name__ == "__main__":
    main()
