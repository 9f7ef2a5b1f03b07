"""selfprune's pruned models beside llm-compressor's SparseGPT, on the same tokens, in one run.

Run: python bench/bench_reconstruct.py [--llmcompressor-python PY] [--sparsity 0.7] [--metric wanda]
         [--unstructured ALLOCATION:RECONSTRUCT,...] [--nm 2:4] [--nm-reconstruct none,sparsegpt,...]
         [--structured RATIO:ALLOCATION:RECONSTRUCT,...]

Protocol (printed with the table): the demo model (SmolLM2-135M) in float32 on the CPU, calibration
on ``--samples`` windows of 512 tokens of the demo corpus's calibration split, test perplexity on
``--test-windows`` windows of 512 tokens of its test split, each window scored alone. Both tools
get the very same token ids (written to OUT/tokens.safetensors). llm-compressor runs in its own
environment (``--llmcompressor-python``; the default creates OUT/venv-llmcompressor with
``pip install torch==2.13.0 llmcompressor==0.14.0.1``), through bench/llmcompressor_sparsegpt.py,
with ``SparseGPTModifier`` on every decoder layer (uniform sparsity; lm_head ignored).
Reconstruction times are printed as a ratio to one calibration pass measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from selfprune.data.demo import demo_model_dir
from selfprune.engine.models import load_model
from selfprune.engine.settings import Calibration, Scoring
from selfprune.engine.workbench import Workbench
from selfprune.methods.sparsity import parse_pattern
from selfprune.metrics import resolve_metric
from selfprune.model.ppl import perplexity

HERE = Path(__file__).resolve().parent


def llmcompressor_python(out: Path) -> str:
    venv = out / "venv-llmcompressor"
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "torch==2.13.0", "llmcompressor==0.14.0.1"], check=True)
    return str(venv / "bin" / "python")


def llmcompressor(python: str, tokens: Path, sparsity: float, structure: str) -> dict:
    run = subprocess.run([python, str(HERE / "llmcompressor_sparsegpt.py"), str(demo_model_dir()), str(tokens),
                          str(sparsity), structure], check=True, capture_output=True, text=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-reconstruct"))
    ap.add_argument("--llmcompressor-python", default=None, help="python of an environment with llmcompressor; 'skip': none")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--test-windows", type=int, default=64)
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--nm", default="2:4", help="an N:M pattern measured too ('' for none)")
    ap.add_argument("--metric", default="wanda")
    ap.add_argument("--unstructured", default="uniform:none,uniform:sparsegpt,uniform:sparsegpt-adaptive,"
                    "owl:sparsegpt-adaptive,atp:sparsegpt-adaptive", help="ALLOCATION:RECONSTRUCT cases at --sparsity")
    ap.add_argument("--nm-reconstruct", default="none,sparsegpt,sparsegpt-adaptive")
    ap.add_argument("--structured", default="", help="RATIO:ALLOCATION:RECONSTRUCT cases of Wanda-sp (ALLOCATION: a "
                    "registered one or a search's best.json), e.g. 0.3:uniform:none,0.3:atp:lsq,0.5:runs/demo/best.json:lsq")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    bench = Workbench(load_model("demo", "cpu", "float32"), Calibration("demo", args.samples, 512))
    calib = bench.calibrated.windows()
    test = bench.scorer.windows(Scoring("demo", "test", 512, args.test_windows))
    tokens = args.out / "tokens.safetensors"
    save_file({"calibration": calib.contiguous(), "test": test.contiguous()}, str(tokens))
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(calib), 4):
            bench.lm.model(input_ids=calib[i:i + 4])
    one_pass = time.perf_counter() - start

    rows = [("dense", "-", "-", "-", perplexity(bench.lm.model, test).ppl, 0.0, 0.0)]
    cases = [(args.sparsity, "unstructured", *case.split(":")) for case in args.unstructured.split(",") if case]
    if args.nm:
        cases += [(parse_pattern(args.nm).fixed_sparsity, args.nm, "uniform", how) for how in args.nm_reconstruct.split(",")]
    metric = resolve_metric(args.metric)
    for sparsity, pattern, allocation, how in cases:
        start = time.perf_counter()
        _, result = bench.pruner.sparse(metric, allocation, sparsity, parse_pattern(pattern), how)
        seconds = time.perf_counter() - start
        label = "SparseGPT's own" if how == "sparsegpt-adaptive" else args.metric
        rows.append((f"selfprune {label}", allocation, pattern, how, perplexity(result.model, test).ppl,
                     result.realized, seconds))
        print(rows[-1], flush=True)
    for case in filter(None, args.structured.split(",")):
        ratio, allocation, how = case.split(":")
        start = time.perf_counter()
        rates = bench.pruner.allocate(allocation, float(ratio))
        model = bench.pruner.structured(bench.pruner.structure(rates), how)
        seconds = time.perf_counter() - start
        label = "searched" if allocation.endswith(".json") else allocation
        rows.append(("selfprune wanda-sp", label, f"structured {ratio}", how, perplexity(model, test).ppl,
                     float(ratio), seconds))
        print(rows[-1], flush=True)
    if args.llmcompressor_python != "skip":
        python = args.llmcompressor_python or llmcompressor_python(args.out)
        for sparsity, pattern in [(args.sparsity, "0:0")] + ([(parse_pattern(args.nm).fixed_sparsity, args.nm)] if args.nm else []):
            found = llmcompressor(python, tokens, sparsity, pattern)
            rows.append(("llm-compressor SparseGPT", "uniform", "unstructured" if pattern == "0:0" else pattern,
                         "sparsegpt", found["ppl"], found["realized"], found["seconds"]))
            print(rows[-1], flush=True)

    print(f"\nProtocol: demo model (SmolLM2-135M) float32 on the CPU; calibration {args.samples} x 512 tokens "
          f"(demo calibration split); test perplexity on {args.test_windows} x 512 tokens (demo test split), "
          f"the same token ids for both tools; one calibration pass here: {one_pass:.1f} s.")
    print("\n| tool / mask | allocation | pattern | reconstruct | test ppl | realized | prune s | x one pass |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: |")
    for tool, allocation, pattern, how, ppl, realized, seconds in rows:
        print(f"| {tool} | {allocation} | {pattern} | {how} | {ppl:.2f} | {realized:.4f} | {seconds:.0f} | {seconds / one_pass:.1f} |")
    (args.out / "results.json").write_text(json.dumps({"one_pass_s": one_pass, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
