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


def main() -> None:
    """Entry point: a :class:`UserError` becomes one line on stderr and exit code 2."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # rich draws our own progress; keep stderr readable
    try:
        app()
    except UserError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
