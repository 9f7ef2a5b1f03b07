"""The demo model served by vLLM: dense vs uniform and searched structures, with and without alignment.

For each ratio: Wanda-sp uniform, and the best rates of a GA search with README's demo settings;
each exported exact and with ``--align`` channels (the search itself then runs aligned too). Every
export is scored on the test split with transformers (the agreement check shows vLLM computes the
same model) and timed with vLLM in its own environment; speed is printed as a ratio to the dense
model measured in the same run (this machine is noisy: compare ratios, not absolutes).

Run: python bench/vllm_serving.py --vllm-python ~/.venvs/vllm/bin/python [--ratios 0.3,0.5] [--align 128]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--vllm-python", required=True)
    ap.add_argument("--ratios", default="0.3,0.5")
    ap.add_argument("--align", type=int, default=128, help="MLP channel multiple of the aligned exports")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--test-windows", type=int, default=64)
    ap.add_argument("--out", default="runs/bench-vllm")
    args = ap.parse_args()

    from selfprune import perplexity, prune, search
    from selfprune.data.demo import demo_model_dir
    from selfprune.evaluate.speed import vllm_measure
    from selfprune.evaluate.vllm_bridge import vllm_python
    from selfprune.methods.structure import EXACT, Alignment

    python = vllm_python(args.vllm_python)
    out = Path(args.out)
    search_settings = dict(model="demo", data="demo", oracle="ga", population=10, mutations=4, crossovers=4,
                           generations=5, samples=32, fitness_windows=4, device="cpu")
    timing = dict(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, batch_size=args.batch_size, repeats=3)
    rows: list[dict] = []

    def row(name: str, ratio: float | None, directory: Path) -> None:
        ppl = perplexity(str(directory), windows=args.test_windows, device="cpu")["ppl"]
        m = vllm_measure(directory, python, dtype="float32", **timing)
        rows.append({"name": name, "ratio": ratio, "ppl": ppl, **m})
        print(json.dumps(rows[-1]), flush=True)

    row("dense", None, demo_model_dir())
    for ratio in map(float, args.ratios.split(",")):
        for align in (EXACT, Alignment(1, args.align)):
            tag = "" if align == EXACT else f" align {args.align}"
            suffix = tag.replace(" ", "-")
            uniform = out / f"uniform-{ratio}{suffix}"
            if not (uniform / "selfprune.json").is_file():  # a rerun (for quieter timings) reuses exports
                prune("demo", ratio, samples=32, device="cpu", out=uniform, align=align)
            row(f"uniform{tag}", ratio, uniform)
            run, searched = out / f"search-{ratio}{suffix}", out / f"searched-{ratio}{suffix}"
            if not (run / "best.json").is_file():
                search(ratio=ratio, out=str(run), align=align.channels, **search_settings)
            if not (searched / "selfprune.json").is_file():
                prune("demo", ratio, str(run / "best.json"), samples=32, device="cpu", out=searched, align=align)
            row(f"searched{tag}", ratio, searched)

    dense = rows[0]
    print(f"\nvLLM {dense['vllm_version']} on {dense['device']} ({dense['dtype']}), batch {args.batch_size}, prompt "
          f"{args.prompt_tokens}, new {args.new_tokens}, median of 3; test ppl on {args.test_windows} x 512 tokens\n")
    print("| model | ratio | params | test ppl | prefill tok/s | decode tok/s | time to first token | peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        speed = [f"{r[k]:.0f} ({r[k] / dense[k]:.2f}x)" if r is not dense else f"{r[k]:.0f}"
                 for k in ("prefill_tokens_per_s", "decode_tokens_per_s")]
        print(f"| {r['name']} | {r['ratio'] or '-'} | {r['params'] / 1e6:.1f} M | {r['ppl']:.2f} | {speed[0]} | {speed[1]} | "
              f"{r['time_to_first_token_s'] * 1e3:.0f} ms | {r['peak_memory_bytes'] / 2**30:.2f} GiB |")


if __name__ == "__main__":  # vLLM spawns processes
    main()
