"""Pruning-engine benchmark on the demo model: statistics capture, per-candidate
materialization against one 4x512-token perplexity (target <= 5%), a candidate's whole cost
(materialization and forward) against a bare forward of the same pruned model, and the memory a
candidate adds on top of the loaded dense model (the process's peak resident memory over the
candidates, reset before them on Linux, against the dense model's weight bytes).

Run: python bench/bench_engine.py [--model demo] [--device auto]
All figures come from one run on one machine; quote the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import random
import resource
import time
from pathlib import Path

import torch

from selfprune.allocators.rates import project_to_mean
from selfprune.core.procstatus import status_bytes
from selfprune.data import corpora as data
from selfprune.engine.models import load_model
from selfprune.engine.settings import Calibration, Scoring
from selfprune.engine.workbench import Workbench
from selfprune.model import stats
from selfprune.model.ppl import perplexity


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def reset_peak(device: torch.device) -> float:
    """Start a new peak (CUDA's counter, or Linux's VmHWM through clear_refs); the memory in use now, MiB."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    Path("/proc/self/clear_refs").write_text("5")
    return status_bytes("VmRSS") / 2**20


def since_reset_mib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else status_bytes("VmHWM") / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--data", default="demo")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--candidates", type=int, default=5)
    args = ap.parse_args()

    lm = load_model(args.model, args.device)
    device = next(lm.model.parameters()).device
    calibration = Calibration(args.data, samples=args.samples, seqlen=512)
    # The workbench would serve cached statistics: time the capture pass itself.
    windows = data.split_windows(lm.tokenizer, args.data, "calibration", 512, args.samples)
    t0 = time.perf_counter()
    stats.capture(lm.model, windows, batch_size=4)
    capture_s = time.perf_counter() - t0
    bench = Workbench(lm, calibration)

    rng = random.Random(0)
    build_s, ppl_s = [], []
    scoring = Scoring(args.data, "fitness", seqlen=512, windows=4)
    ids = bench.scorer.windows(scoring)
    perplexity(lm.model, ids)  # warm: the first forward's one-time allocations are not a candidate's
    dense_mib = sum(p.numel() * p.element_size() for p in lm.model.parameters()) / 2**20
    before = reset_peak(device)
    for _ in range(args.candidates):
        rates = project_to_mean([rng.uniform(0, 1) for _ in range(lm.arch.n_layers)], 0.5, 0.9)
        structure = bench.pruner.structure(rates)
        t0 = time.perf_counter()
        pruned = bench.pruner.structured(structure)
        build_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        perplexity(pruned, ids)
        ppl_s.append(time.perf_counter() - t0)
    peak = since_reset_mib(device)
    dense_before = reset_peak(device)
    t0 = time.perf_counter()
    perplexity(lm.model, ids)
    dense_ppl_s = time.perf_counter() - t0
    dense_forward = since_reset_mib(device) - dense_before  # the forward's own activations and logits

    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    print(f"device {device}, model {args.model} ({lm.arch.n_layers} layers), {args.candidates} candidates at ratio 0.5")
    print(f"statistics capture, {args.samples} x 512 tokens: {capture_s:.2f} s")
    print(f"dense 4x512 perplexity: {dense_ppl_s:.3f} s")
    print(f"materialization per candidate (median): {med(build_s) * 1000:.1f} ms")
    print(f"pruned 4x512 perplexity (median): {med(ppl_s):.3f} s")
    print(f"materialization / dense 4x512 perplexity = {med(build_s) / dense_ppl_s:.2%} (target <= 5%)")
    whole = [(b + f) / f for b, f in zip(build_s, ppl_s)]
    print(f"candidate (materialization + 4x512 forward) / bare forward of the same pruned model = {med(whole):.3f}x (median)")
    print(f"dense weights {dense_mib:.0f} MiB; in use before the candidates {before:.0f} MiB, peak over them "
          f"{peak:.0f} MiB: a candidate adds {peak - before:.0f} MiB ({(peak - before) / dense_mib:.2f}x the dense weights), "
          f"a forward of the dense model {dense_forward:.0f} MiB; the candidate's own share "
          f"{(peak - before - dense_forward) / dense_mib:.2f}x the dense weights")
    print(f"peak memory of the whole run: {peak_memory_mib(device):.0f} MiB")


if __name__ == "__main__":
    main()
