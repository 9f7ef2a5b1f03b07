"""The ``selfprune`` command line: parse, call the library (or a flow), map user errors to exit 2."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)
console = Console(stderr=True)

Model = Annotated[str, typer.Option("--model", help="demo, a local HF directory, a .gguf file, an export dir, or a hub id")]
Data = Annotated[str, typer.Option("--data", help="demo, wikitext2, or a local .txt/.md/.jsonl/.json/.parquet file")]
Device = Annotated[str, typer.Option("--device", help="auto | cpu | cuda")]
DType = Annotated[str, typer.Option("--dtype", help="auto | float32 | bfloat16 | float16")]
Samples = Annotated[int, typer.Option("--samples", help="calibration windows for the activation statistics")]
CalibSeqlen = Annotated[int, typer.Option("--calib-seqlen", help="tokens per calibration window")]


@contextmanager
def rich_progress():
    """A progress factory for the library: (label, total) -> advance(n), drawn with rich."""
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    ) as bar:

        def factory(label: str, total: int):
            task = bar.add_task(label, total=total)
            return lambda n: bar.advance(task, n)

        yield factory


def _read_rates(path: Path) -> list[float]:
    """A rates file: a JSON list, or an object with ``rates`` (a search's best.json, an export record)."""
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"allocation file {path} does not exist; pass uniform, owl, or a RATES.json path") from None
    except json.JSONDecodeError as e:
        raise UserError(f"allocation file {path} is not valid JSON ({e}); it must hold a list of rates") from None
    rates = obj.get("rates") if isinstance(obj, dict) else obj
    if not isinstance(rates, list):
        raise UserError(f"{path} holds no rate list; write [p_1, ..., p_n] or {{\"rates\": [...]}}")
    return rates


@app.command()
def prune(
    model: Model = "demo",
    ratio: Annotated[float, typer.Option("--ratio", help="target mean pruning rate beta, in (0, 1)")] = 0.5,
    allocation: Annotated[str, typer.Option("--allocation", help="uniform | owl | RATES.json")] = "uniform",
    data: Data = "demo",
    out: Annotated[Path, typer.Option("--out", help="export directory")] = Path("runs/pruned"),
    samples: Samples = 128,
    calib_seqlen: CalibSeqlen = 512,
    device: Device = "auto",
    dtype: DType = "auto",
) -> None:
    """Prune MODEL to a mean rate RATIO with Wanda-sp and export it to OUT."""
    from . import allocation as alloc
    from .export import save_pruned
    from .models import load_model
    from .workbench import Calibration, Workbench

    alloc.check_ratio(ratio)
    spec: str | list[float] = allocation if allocation in ("uniform", "owl") else _read_rates(Path(allocation))
    with rich_progress() as progress:
        bench = Workbench(load_model(model, device, dtype), Calibration(data, samples, calib_seqlen), progress)
        rates = bench.allocate(spec, ratio)
        structure = bench.structure(rates)
        pruned = bench.build(structure)
    method = allocation if isinstance(spec, str) else f"file:{allocation}"
    save_pruned(pruned, bench.lm.tokenizer, out, bench.record(rates, structure, f"wanda-sp/{method}"))
    table = Table("layer", "rate", "KV groups kept", "MLP channels kept", title=f"pruned {model} -> {out}")
    for i, (r, k) in enumerate(zip(rates, structure)):
        table.add_row(str(i), f"{r:.3f}", f"{k.groups}/{bench.arch.n_kv_heads}", f"{k.channels}/{bench.arch.intermediate}")
    console.print(table)
    console.print(f"realized ratio {alloc.realized_ratio(bench.arch, structure):.4f} (target {ratio}); "
                  f"load it with selfprune.load_pruned({str(out)!r})")


@app.command()
def ppl(
    model: Model = "demo",
    data: Data = "demo",
    split: Annotated[str, typer.Option("--split", help="calibration | fitness | test")] = "test",
    seqlen: Annotated[int, typer.Option("--seqlen", help="tokens per window")] = 512,
    windows: Annotated[int, typer.Option("--windows", help="windows to score (0: every full window)")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 4,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    device: Device = "auto",
    dtype: DType = "auto",
) -> None:
    """Token-level perplexity of MODEL (dense or an export) on a split, in non-overlapping windows."""
    from .data import split_windows
    from .models import load_model
    from .perplexity import perplexity

    lm = load_model(model, device, dtype)
    ids = split_windows(lm.tokenizer, data, split, seqlen, windows or None)
    with rich_progress() as progress:
        result = perplexity(lm.model, ids, batch_size, progress("perplexity", len(ids)))
    record = result.to_dict() | {"model": model, "fingerprint": lm.fingerprint, "data": data, "split": split}
    if as_json:
        print(json.dumps(record))
    else:
        console.print(f"ppl {result.ppl:.3f} on {result.tokens} tokens ({result.windows} x {seqlen}-token windows)")


@app.command()
def search(
    model: Model = "demo",
    ratio: Annotated[float, typer.Option("--ratio", help="target mean pruning rate beta")] = 0.5,
    oracle: Annotated[str, typer.Option("--oracle", help="openai:MODEL | ga | random")] = "ga",
    base_url: Annotated[str | None, typer.Option("--base-url", help="OpenAI-compatible server (vLLM, Ollama)")] = None,
    data: Data = "demo",
    population: Annotated[int, typer.Option("--population", help="K: population size")] = 30,
    mutations: Annotated[int, typer.Option("--mutations", help="M: mutants per generation")] = 10,
    crossovers: Annotated[int, typer.Option("--crossovers", help="S: crossovers per generation")] = 10,
    generations: Annotated[int, typer.Option("--generations", help="N: generations")] = 20,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    p_max: Annotated[float, typer.Option("--p-max", help="upper bound of any layer's rate")] = 0.9,
    samples: Samples = 128,
    calib_seqlen: CalibSeqlen = 512,
    seqlen: Annotated[int, typer.Option("--seqlen", help="tokens per perplexity window")] = 512,
    fitness_windows: Annotated[int, typer.Option("--fitness-windows", help="windows of the fitness split per candidate")] = 8,
    test_windows: Annotated[int, typer.Option("--test-windows", help="windows of the test split for the final score (0: all)")] = 64,
    random_init: Annotated[bool, typer.Option("--random-init", help="ablation: random initial population")] = False,
    no_mutation: Annotated[bool, typer.Option("--no-mutation", help="ablation: no mutation")] = False,
    no_crossover: Annotated[bool, typer.Option("--no-crossover", help="ablation: no crossover")] = False,
    out: Annotated[Path, typer.Option("--out", help="run directory (best.json, plots)")] = Path("runs/search"),
    device: Device = "auto",
    dtype: DType = "auto",
) -> None:
    """Self-Pruner search as a resumable Prefect flow; run it again to resume after a crash."""
    from .prefect_env import configure

    configure(log_level="WARNING")
    from selfprune.flows.search import search as search_flow

    summary = search_flow(
        model=model, ratio=ratio, oracle=oracle, base_url=base_url, data=data, population=population,
        mutations=mutations, crossovers=crossovers, generations=generations, seed=seed, p_max=p_max,
        samples=samples, calib_seqlen=calib_seqlen, seqlen=seqlen, fitness_windows=fitness_windows,
        test_windows=test_windows, random_init=random_init, no_mutation=no_mutation,
        no_crossover=no_crossover, out=str(out), device=device, dtype=dtype,
    )
    table = Table("generation", "best fitness", "mean fitness", title=f"search {model} at ratio {ratio} ({oracle})")
    for h in summary["history"]:
        table.add_row(str(h["generation"]), f"{h['best']:.3f}", f"{h['mean']:.3f}")
    console.print(table)
    console.print(
        f"best: fitness {summary['fitness']:.3f}, test ppl {summary['test_ppl']:.3f} "
        f"(uniform {summary['uniform_test_ppl']:.3f}) | evaluations {summary['evaluations']}, "
        f"cache hits {summary['cache_hits']}, oracle calls {summary['oracle_calls']}, "
        f"fallbacks {summary['oracle_fallbacks']}, {summary['wall_s']:.0f} s -> {out / 'best.json'}"
    )


def main() -> None:
    """Entry point: a :class:`UserError` becomes one line on stderr and exit code 2."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # rich draws our own progress; keep stderr readable
    try:
        app()
    except UserError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
