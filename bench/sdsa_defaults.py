"""How SDSA's defaults were chosen: a grid over its temperature T and spread lambda, scored on the
FITNESS split (never the test split), Wanda's metric at 60% unstructured sparsity on the demo model.

Run: python bench/sdsa_defaults.py [--model demo] [--sparsity 0.6] [--windows 16]
Prints fitness perplexity per (T, lambda), uniform's for reference, and the best pair.
"""

from __future__ import annotations

import argparse
import itertools

from selfprune.allocators.rates import uniform
from selfprune.allocators.sdsa import sdsa_rates, skewness
from selfprune.engine.models import load_model
from selfprune.engine.settings import Calibration, Scoring
from selfprune.engine.workbench import Workbench
from selfprune.methods.sparsity import parse_pattern, sparsify
from selfprune.metrics import resolve_metric
from selfprune.model.ppl import perplexity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--data", default="demo")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--metric", default="wanda")
    ap.add_argument("--sparsity", type=float, default=0.6)
    ap.add_argument("--windows", type=int, default=16, help="fitness windows of 512 tokens")
    args = ap.parse_args()

    bench = Workbench(load_model(args.model, args.device), Calibration(args.data, samples=128, seqlen=512))
    ids = bench.scorer.windows(Scoring(args.data, "fitness", seqlen=512, windows=args.windows))
    scores = bench.pruner.metric_scores(resolve_metric(args.metric))
    cached = {i: scores(i) for i in range(bench.arch.n_layers)}
    skews = [skewness(list(cached[i].values())) for i in range(bench.arch.n_layers)]
    pattern = parse_pattern("unstructured")

    def fitness(rates: list[float]) -> float:
        return perplexity(sparsify(bench.lm.model, bench.arch, cached.__getitem__, rates, pattern).model, ids).ppl

    print(f"{args.metric} at {args.sparsity} unstructured, fitness ppl on {ids.numel():,} tokens")
    print(f"uniform: {fitness(uniform(bench.arch.n_layers, args.sparsity)):.3f}")
    results = {}
    for t, lam in itertools.product((0.5, 1.0, 2.0), (0.04, 0.08, 0.12)):
        results[t, lam] = fitness(sdsa_rates(skews, args.sparsity, temperature=t, lam=lam))
        print(f"T={t:<4} lambda={lam:<5} {results[t, lam]:.3f}")
    (t, lam), best = min(results.items(), key=lambda kv: kv[1])
    print(f"best: T={t}, lambda={lam} ({best:.3f})")


if __name__ == "__main__":
    main()
