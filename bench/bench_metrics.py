"""Cost of evaluating one pruning metric on the demo model, against one bare forward pass over the
same fitness tokens: scoring every linear with the metric, masking (unstructured, per row), and the
candidate's perplexity, each as a ratio of that forward pass.

Run: python bench/bench_metrics.py [--model demo] [--metrics magnitude,wanda,ria] [--windows 8]
All figures come from one run on one machine; quote the ratios, not the absolute times. The
statistics (and G, for a metric that reads it) come from the store when present: run once first.
"""

from __future__ import annotations

import argparse
import time

import torch

from selfprune.engine.models import load_model
from selfprune.engine.settings import Calibration, Scoring
from selfprune.engine.workbench import Workbench
from selfprune.methods.sparsity import parse_pattern, sparsify
from selfprune.metrics import resolve_metric
from selfprune.model.ppl import perplexity


def timed(fn, *args):
    t0 = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--data", default="demo")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--metrics", default="magnitude,wanda,ria")
    ap.add_argument("--windows", type=int, default=8, help="fitness windows of 512 tokens")
    ap.add_argument("--sparsity", type=float, default=0.5)
    args = ap.parse_args()

    bench = Workbench(load_model(args.model, args.device), Calibration(args.data, samples=128, seqlen=512))
    ids = bench.scorer.windows(Scoring(args.data, "fitness", seqlen=512, windows=args.windows))
    with torch.inference_mode():
        bench.lm.model(input_ids=ids[:1])  # warm-up: first-call allocations are not the forward pass
        _, forward_s = timed(lambda: [bench.lm.model(input_ids=ids[i:i + 4]) for i in range(0, len(ids), 4)])
    print(f"one bare forward pass over {ids.numel():,} fitness tokens: {forward_s:.2f} s")
    print(f"{'metric':<12} {'score':>8} {'mask':>8} {'ppl':>8} {'total':>8}   (x the forward pass)")
    rates = [args.sparsity] * bench.arch.n_layers
    for name in args.metrics.split(","):
        scores = bench.pruner.metric_scores(resolve_metric(name))
        all_scores, score_s = timed(lambda layer_scores: {i: layer_scores(i) for i in range(bench.arch.n_layers)}, scores)
        result, mask_s = timed(sparsify, bench.lm.model, bench.arch, all_scores.__getitem__, rates, parse_pattern("unstructured"))
        _, ppl_s = timed(perplexity, result.model, ids)
        cells = [s / forward_s for s in (score_s, mask_s, ppl_s, score_s + mask_s + ppl_s)]
        print(f"{name:<12} " + " ".join(f"{c:>8.2f}" for c in cells))


if __name__ == "__main__":
    main()
