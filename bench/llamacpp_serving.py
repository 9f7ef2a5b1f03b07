"""The demo model in llama.cpp: dense vs uniform and searched structures, at each GGUF quantization.

For each ratio: Wanda-sp uniform, and the best rates of a GA search with README's demo settings (the
exports of ``bench/vllm_serving.py`` when they exist). Each model is written as GGUF at each
quantization and timed in llama.cpp (one process per model, batch 1); speed is printed as a ratio
to the dense model at the same quantization measured in the same run (this machine is noisy:
compare ratios, not absolutes), beside the ratio it should reach: dense parameters read per
generated token over pruned ones (the embedding table is read one row per token; SmolLM2's LM
head shares it and reads it whole).

Run: python bench/llamacpp_serving.py [--ratios 0.3,0.5] [--quants f16,q4_k_m] [--out runs/bench-vllm]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ratios", default="0.3,0.5")
    ap.add_argument("--quants", default="f16,q4_k_m")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="runs/bench-vllm", help="where the exports are (made when missing)")
    args = ap.parse_args()

    from selfprune import prune, search
    from selfprune.data.demo import demo_model_dir
    from selfprune.evaluate.speed import llamacpp_measure
    from selfprune.export.gguf import write_gguf

    out = Path(args.out)
    search_settings = dict(model="demo", data="demo", oracle="ga", population=10, mutations=4, crossovers=4,
                           generations=5, samples=32, fitness_windows=4, device="cpu")
    models: list[tuple[str, float | None, Path]] = [("dense", None, demo_model_dir())]
    for ratio in map(float, args.ratios.split(",")):
        uniform, run, searched = out / f"uniform-{ratio}", out / f"search-{ratio}", out / f"searched-{ratio}"
        if not (uniform / "selfprune.json").is_file():
            prune("demo", ratio, samples=32, device="cpu", out=uniform)
        if not (run / "best.json").is_file():
            search(ratio=ratio, out=str(run), **search_settings)
        if not (searched / "selfprune.json").is_file():
            prune("demo", ratio, str(run / "best.json"), samples=32, device="cpu", out=searched)
        models += [("uniform", ratio, uniform), ("searched", ratio, searched)]

    rows: list[dict] = []
    timing = dict(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeats=args.repeats)
    with tempfile.TemporaryDirectory(prefix="selfprune-gguf-") as tmp:
        for quant in args.quants.split(","):
            for name, ratio, directory in models:
                path = write_gguf(directory, Path(tmp) / f"{name}-{ratio}.{quant}.gguf", quant)
                rows.append({"name": name, "ratio": ratio, **llamacpp_measure(path, quant, **timing)})
                path.unlink()
                print(json.dumps(rows[-1]), flush=True)

    first = rows[0]
    print(f"\nllama.cpp (llama-cpp-python {first['llama_cpp_version']}) on this CPU, {first['threads']} threads, batch 1, "
          f"prompt {args.prompt_tokens}, new {args.new_tokens}, median of {args.repeats}\n")
    header = ["model", "ratio", "GGUF", "file", "params read / token", "prefill tok/s", "decode tok/s", "decode bar", "peak RSS"]
    lines = [header, ["---"] * len(header)] + [cells(r, next(d for d in rows if d["name"] == "dense" and d["dtype"] == r["dtype"]))
                                               for r in rows]
    print("\n".join("| " + " | ".join(line) + " |" for line in lines))


def cells(r: dict, dense: dict) -> list[str]:
    """A row of the table: speeds as ratios to the dense model at the same quantization, and the bar
    the decode speed must reach: 0.8 x the ratio of parameters read per generated token."""
    def speed(key: str) -> str:
        return f"{r[key]:.0f}" + ("" if r is dense else f" ({r[key] / dense[key]:.2f}x)")

    bar = 0.8 * dense["params_read_per_token"] / r["params_read_per_token"]
    met = r["decode_tokens_per_s"] / dense["decode_tokens_per_s"] >= bar
    return [r["name"], str(r["ratio"] or "-"), r["dtype"], f"{r['file_bytes'] / 2**20:.0f} MiB",
            f"{r['params_read_per_token'] / 1e6:.1f} M", speed("prefill_tokens_per_s"), speed("decode_tokens_per_s"),
            "-" if r is dense else f"{bar:.2f}x {'met' if met else 'MISSED'}", f"{r['peak_memory_bytes'] / 2**20:.0f} MiB"]

if __name__ == "__main__":
    main()
