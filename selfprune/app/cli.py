"""The ``selfprune`` command line: parse, call the library (or a flow), map user errors to exit 2."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, get_origin

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..config import AutopruneConfig, ReportConfig, SearchConfig, build_config, cli_flag
from ..core.errors import EnvironmentFault, UserError
from .inputs import check_inputs

if TYPE_CHECKING:  # imported where used: the library is slow to import
    from ..evaluate.report import Report

HELP = """Prune a causal language model's layers to a target ratio, search the per-layer rates (or a
pruning metric) with an LLM or a genetic oracle, and compare the results. Start with
`selfprune prune` (uniform rates), `selfprune search` (searched rates) and `selfprune report`
(compare them); each runs offline on the demo model by default. COMMAND --help for its options."""

app = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP, pretty_exceptions_enable=False)
console = Console(stderr=True)

Model = Annotated[str, typer.Option("--model", help="demo, a local HF directory, a .gguf file, an export dir, or a hub id")]
Data = Annotated[str, typer.Option("--data", help="demo, wikitext2, or a local .txt/.md/.jsonl/.json/.parquet file")]
Device = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | map (layers spread over every visible GPU)")]
DType = Annotated[str, typer.Option("--dtype", help="auto | float32 | bfloat16 | float16")]
VllmPython = Annotated[str | None, typer.Option(
    "--vllm-python", help="Python of the vLLM environment with selfprune-vllm (default: $SELFPRUNE_VLLM_PYTHON)")]
TrustRemoteCode = Annotated[bool, typer.Option(
    "--trust-remote-code", help="let vLLM run the model directory's own Python; read it first")]


@contextmanager
def rich_progress():
    """A progress factory for the library: (label, total) -> advance(n), drawn with rich; a
    finished step's bar goes (a search's generations would pile up otherwise)."""
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    ) as bar:

        def factory(label: str, total: int):
            task = bar.add_task(label, total=total)
            done = 0

            def advance(n: int) -> None:
                nonlocal done
                done += n
                if done < total:
                    bar.advance(task, n)
                elif done - n < total:
                    bar.remove_task(task)

            return advance

        yield factory


@contextmanager
def shown_progress():
    """This command's long steps (:mod:`selfprune.core.progress`, wherever the library starts them):
    rich bars on a terminal; in a file or a pipe, where redrawn bars would be noise, the steps'
    rate-limited log lines at INFO."""
    import logging

    from ..core import progress

    if console.is_terminal:
        with rich_progress() as bars, progress.reporting(bars):
            yield bars
        return
    level = progress.log.level
    progress.log.setLevel(logging.INFO)
    try:
        yield progress.step
    finally:
        progress.log.setLevel(level)


@app.command()
def prune(
    model: Model = "demo",
    ratio: Annotated[float | None, typer.Option("--ratio", "--sparsity", help="target mean pruning rate beta (with --metric: "
                                                                            "the sparsity), in (0, 1) [default: 0.5, or "
                                                                            "a best.json's]")] = None,
    allocation: Annotated[str, typer.Option("--allocation", help="uniform | owl | sdsa | atp | dlp | alphapruning | "
                                                                    "RATES.json")] = "uniform",
    data: Annotated[str | None, typer.Option("--data", help="demo (default), wikitext2, or a local text file; "
                                                 "unset: a best.json's (as the next options)")] = None,
    out: Annotated[Path, typer.Option("--out", help="export directory")] = Path("runs/pruned"),
    samples: Annotated[int | None, typer.Option("--samples", help="calibration windows [default: 128]")] = None,
    calib_seqlen: Annotated[int | None, typer.Option("--calib-seqlen", help="tokens per calibration window [default: 512]")] = None,
    fmt: Annotated[str, typer.Option("--format", help="hf: a selfprune export | deci: DeciLM for vLLM")] = "hf",
    method: Annotated[str | None, typer.Option("--method", help="a registered structured pruning method [default: wanda-sp]")] = None,
    metric: Annotated[str | None, typer.Option("--metric", help="zero single weights by a metric instead: magnitude | wanda | "
                                                                   "ria | an expression such as 'abs(W) * X_rms'")] = None,
    pattern: Annotated[str | None, typer.Option("--pattern", help="with --metric: unstructured (default) | "
                                                                     "unstructured-layer | 2:4 | 4:8")] = None,
    align: Annotated[int | None, typer.Option("--align", help="kept MLP channels in multiples of this (64, 128 suit "
                                                               "kernels); the ratio is kept")] = None,
    align_heads: Annotated[int | None, typer.Option("--align-heads", help="kept query heads in multiples of this (a multiple "
                                                                           "of heads per KV group)")] = None,
    reconstruct: Annotated[str | None, typer.Option("--reconstruct", help="refit what stays on the calibration windows: "
                                                                        "none | sparsegpt (with --metric) | "
                                                                        "sparsegpt-adaptive | lsq (structured)")] = None,
    device: Device = "auto",
    dtype: Annotated[str | None, typer.Option("--dtype", help="auto (default) | float32 | bfloat16 | float16")] = None,
) -> None:
    """Prune MODEL to a mean rate RATIO (Wanda-sp by default, or single weights by --metric) and export it to OUT.

    With --allocation a search's best.json, the options not given are the search's, the ratio too: the searched model."""
    from ..api import prune as prune_model
    from ..methods.structure import Alignment

    with shown_progress() as progress:
        result = prune_model(model, ratio, allocation, data, samples=samples, calib_seqlen=calib_seqlen, method=method,
                             device=device, dtype=dtype, out=out, format=fmt, metric=metric, pattern=pattern,
                             align=None if align is None and align_heads is None else Alignment(align_heads or 1, align or 1),
                             reconstruct=reconstruct, progress=progress)
    if result.settings_note:
        console.print(result.settings_note, highlight=False, soft_wrap=True)
    if "metric" in result.record:
        record = result.record
        table = Table("layer", "sparsity", title=f"{model} pruned by {record['metric']['text']} ({record['pattern']}) -> {out}")
        for i, r in enumerate(record["layer_sparsity"]):
            table.add_row(str(i), f"{r:.4f}")
        console.print(table)
        console.print(f"realized sparsity {result.realized_ratio:.4f} (target {result.ratio}); "
                      f"load it with selfprune.load_pruned({str(out)!r})")
        return
    arch = result.arch
    table = Table("layer", "rate", "KV groups kept", "MLP channels kept", title=f"pruned {model} -> {out}")
    for i, (r, k) in enumerate(zip(result.rates, result.structure)):
        table.add_row(str(i), f"{r:.3f}", f"{k.groups}/{arch.n_kv_heads}", f"{k.channels}/{arch.intermediate}")
    console.print(table)
    load = (f"serve it with vllm.LLM({str(out)!r}, trust_remote_code=True)" if fmt == "deci"
            else f"load it with selfprune.load_pruned({str(out)!r}), or serve it with vLLM and selfprune-vllm")
    console.print(f"realized ratio {result.realized_ratio:.4f} (target {result.ratio}); {load}")


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
    from ..api import perplexity

    with shown_progress() as progress:
        record = perplexity(model, data, split, seqlen, windows or None, batch_size, device, dtype, progress)
    if as_json:
        print(json.dumps(record))
    else:
        console.print(f"ppl {record['ppl']:.3f} on {record['tokens']} tokens ({record['windows']} x {seqlen}-token windows)")


# The options a first run sets, shown first in a command's help; the rest keep the config's order.
ESSENTIAL = ("model", "data", "ratio", "sparsities", "ratios", "searches", "allocations", "metrics", "oracle", "out",
             "base_url", "api_key_env")


def _essential_rank(name: str) -> int:
    return ESSENTIAL.index(name) if name in ESSENTIAL else len(ESSENTIAL)


def _config_command(model_cls: type[BaseModel], run):
    """A typer command whose options are the fields of ``model_cls`` (one definition of each
    setting: the config's field, with its type, default and help)."""
    params, negated = [], set()
    fields = sorted(model_cls.model_fields.items(), key=lambda item: _essential_rank(item[0]))
    for name, f in fields:
        if (f.json_schema_extra or {}).get("cli") is False:  # a field this command does not use
            continue
        is_list = get_origin(f.annotation) is list
        default = None if is_list else f.get_default(call_default_factory=True)
        kind = list[str] | None if is_list else f.annotation  # a list option repeats, and takes "a,b" too
        flag, help = cli_flag(model_cls, name), f.description + (" (repeatable)" if is_list else "")
        if f.annotation is bool and default:  # a switch that is on by default: only its off form, which
            # keeps one name per option (an on/off pair takes a column of its own, squeezing every help)
            negated.add(name)
            name, flag, help, default = f"no_{name}", f"--no-{flag[2:]}", f"do not {help}", False
        option = typer.Option(flag, help=help, metavar="A,B" if is_list else None, show_default=not is_list)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[kind, option]))

    def command(**values):
        values |= {name: not values.pop(f"no_{name}") for name in negated}
        return run({k: v for k, v in values.items() if v is not None})  # unset: the config's default

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = run.__doc__
    return command


def _flow_command(model_cls: type[BaseModel], entrypoint: str, show: Callable[[dict, BaseModel, float], None]):
    """The command of a flow (a search, AutoPrune, a report): its options build the config, the
    inputs are checked and Prefect set up before anything starts, the flow at ``entrypoint`` runs
    with progress, then ``show(summary, config, start)`` prints the result (a search over several
    seeds prints its seeds' table). One path for every flow, so each gets the same checks, errors
    and closing line; ``show``'s docstring is the command's help."""

    def run(values: dict) -> None:
        start = time.perf_counter()  # the closing line's wall time: the whole command's
        config = build_config(model_cls, **values)
        check_inputs(config)
        _configure_flows(config)
        module, _, name = entrypoint.rpartition(".")
        flow = getattr(importlib.import_module(module), name)  # imported only now: Prefect is slow to import
        with shown_progress():
            summary = _flow_result(flow(config, return_state=True), entrypoint, config.out)
        if getattr(config, "seeds", None):
            return _print_seeds(summary, config)
        show(summary, config, start)

    run.__doc__ = show.__doc__
    return _config_command(model_cls, run)


def _show_search(result: dict, config: SearchConfig, start: float) -> None:
    """Self-Pruner search as a resumable Prefect flow; run it again to resume after a crash."""
    from selfprune.evolve.runner import RateSummary

    summary = RateSummary.from_json(result)
    record = summary.record
    table = Table("generation", "best fitness", "mean fitness", title=f"search {config.model} at ratio {config.ratio} ({config.oracle})")
    for h in record.history:
        table.add_row(str(h.generation), f"{h.best:.3f}", f"{h.mean:.3f}")
    console.print(table)
    if summary.reconstructed_test_ppl is not None:
        kept = (summary.reconstructed or {}).get("name", "the best")
        console.print(f"{kept} rebuilt with {summary.reconstruct}: test ppl {summary.reconstructed_test_ppl:.3f}"
                      + (f" (the lowest fitness after it of {len(summary.reconstructed_choices)} rebuilt)"
                         if summary.reconstructed_choices is not None else ""))
    if summary.best_baseline is not None:
        b = summary.best_baseline
        console.print(f"best baseline: {b['name']}, fitness {b['fitness']:.3f}; the search's best is "
                      f"{100 * summary.beyond_best_baseline:.1f}% lower")
    console.print(
        f"best: fitness {summary.fitness:.3f}, test ppl {summary.test_ppl:.3f} "
        f"(uniform {summary.uniform_test_ppl:.3f}) | evaluations {record.evaluations}, "
        f"cache hits {record.cache_hits}, oracle calls {record.oracle_calls}, "
        f"fallbacks {record.oracle_fallbacks}, {time.perf_counter() - start:.0f} s in all -> {Path(config.out) / 'best.json'}"
    )
    console.print(f"the searched model: {summary.export['prune']}\nfor llama.cpp / Ollama: {summary.export['gguf']}")


def _print_seeds(result: dict, config: SearchConfig | AutopruneConfig) -> None:
    """A search over several seeds: every seed's figures, then their mean and standard deviation."""
    from rich import box
    from rich.table import Column

    from selfprune.seeds import SeedsSummary

    summary = SeedsSummary.from_json(result)
    spread = summary.spread
    table = Table("seed", *(Column(name, overflow="fold") for name in spread), "candidates", box=box.SIMPLE_HEAD,
                  title=f"{config.model}: {len(config.seeds)} seeds ({config.oracle})")
    for seed in map(str, summary.seeds):
        table.add_row(seed, *(f"{s['values'][seed]:.3f}" for s in spread.values()), str(summary.candidates[seed]))
    table.add_row("mean ± std", *(f"{s['mean']:.3f} ± {s['std']:.3f}" for s in spread.values()), "")
    console.print(table)
    console.print(f"-> {Path(config.out) / 'seeds.json'} (each seed's run in {Path(config.out) / 'seed-N'})")


def _flow_result(state, entrypoint: str, out: str):
    """The flow's return value; a failed run's error gains its run id and the exact retry command,
    and a failure the machine caused (a full disk, say) becomes an EnvironmentFault. Bad input
    (a UserError) gets no retry command: the same run would fail the same way."""
    if state.is_completed():
        return state.result()
    from selfprune.flows.run_info import retry_hint
    from selfprune.tasks.faults import explain

    hint = retry_hint(str(state.state_details.flow_run_id), entrypoint, deployed=False)
    try:
        state.result()
    except EnvironmentFault as e:
        raise EnvironmentFault(f"{e}\n{hint}") from None
    except UserError as e:  # bad input: a retry would fail the same way, so the line is the error alone
        raise UserError(str(e)) from None
    except Exception as e:
        fault = explain(e, out)
        if fault is not None:
            raise EnvironmentFault(f"{fault}\n{hint}") from None
        console.print(f"[red]the run failed:[/red] {hint}", highlight=False, soft_wrap=True)
        raise
    raise UserError(f"the flow run ended {state.name}: {state.message}\n{hint}")


app.command("search")(_flow_command(SearchConfig, "selfprune.flows.search.search", _show_search))


def _show_autoprune(result: dict, config: AutopruneConfig, start: float) -> None:
    """AutoPrune's metric search (gp offline, or an LLM with GCoT prompts) as a resumable Prefect flow."""
    from selfprune.evolve.autoprune import MetricSummary

    summary = MetricSummary.from_json(result)
    record = summary.record
    table = Table("metric", *(f"test ppl @ {s}" for s in config.sparsities),
                  title=f"{config.model}: {config.pattern}, {config.allocation} allocation")
    for name, by_s in summary.test_ppl.items():
        table.add_row(summary.metric if name == "found" else name, *(f"{v:.3f}" for v in by_s.values()))
    console.print(table)
    console.print(f"best metric: {summary.metric} (fitness {summary.fitness:.3f}) | evaluations "
                  f"{record.evaluations}, cache hits {record.cache_hits}, oracle calls {record.oracle_calls}, "
                  f"fallbacks {record.oracle_fallbacks}, {time.perf_counter() - start:.0f} s in all -> "
                  f"{Path(config.out) / 'best.json'}; "
                  f"prune with it: selfprune prune --metric {Path(config.out) / 'best.json'}", soft_wrap=True)


app.command("autoprune")(_flow_command(AutopruneConfig, "selfprune.flows.autoprune.autoprune", _show_autoprune))


def _configure_flows(config: SearchConfig | ReportConfig | AutopruneConfig | None = None) -> None:
    """selfprune's Prefect settings and quiet logs; with a ``config``, the machine's checks
    (:func:`selfprune.tasks.faults.preflight`) before Prefect starts anything."""

    from selfprune.tasks.faults import filter_failure_logs, preflight
    from selfprune.tasks.prefect_env import configure, start_temporary_server

    # Prefect's own setting (it sets up logging per run): flow-run lines (the run id and retry
    # command, a line per generation) at INFO, the rest of Prefect at WARNING.
    os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL", "INFO")
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # --runner dask: a dead worker still shows
    configure(log_level="WARNING")
    filter_failure_logs(drop=True)
    if config is not None:
        preflight(config)
        # The temporary server Prefect would start on first use, started here so that it ends
        # with this process however it ends (prefect_env.stop_with_this_process).
        start_temporary_server()


def _show_report(summary: dict, config: ReportConfig, start: float) -> None:
    """Compare dense, allocations (uniform, OWL, ATP, ...), searches and pruning metrics: test perplexity and zero-shot accuracy."""
    from selfprune.evaluate.report import Report

    report = Report.from_json(summary)  # the flow's result is the report's JSON
    for table in report_tables(report):
        console.print(table)
    out = Path(config.out)
    console.print(f"computed {report.meta.computed}, from cache {report.meta.cached}, "
                  f"{time.perf_counter() - start:.0f} s in all -> "
                  f"{out / 'report.md'}, {out / 'report.html'}")


app.command("report")(_flow_command(ReportConfig, "selfprune.flows.report.report", _show_report))


def report_tables(report: Report) -> list[Table]:
    """The report's tables for the terminal: a narrow one folds a long cell onto more lines (rich's
    default would cut it to "…", losing the figure), with borders only under the header for room."""
    from rich import box
    from rich.table import Column

    from selfprune.artifacts.comparison import TITLES, protocol_text, split_tables
    from selfprune.artifacts.comparison import table as comparison_table

    tables = []
    for kind, rows in split_tables(report.rows):
        header, cells = comparison_table(rows, report.meta.tasks)
        table = Table(*(Column(h, overflow="fold") for h in header), title=TITLES[kind], box=box.SIMPLE_HEAD,
                      caption="\n".join(protocol_text(rows)).replace("**", "").replace("`", ""))
        for row in cells:
            table.add_row(*row)
        tables.append(table)
    return tables


BENCH_FIELDS = [  # (label, key, scale, format)
    ("params", "params", 1, "{:,.0f}"),
    ("weight MiB", "weight_bytes", 2**-20, "{:.1f}"),
    ("KV cache B/token", "kv_cache_bytes_per_token", 1, "{:,.0f}"),
    ("peak memory MiB", "peak_memory_bytes", 2**-20, "{:.1f}"),
    ("peak over baseline MiB", "peak_memory_delta_bytes", 2**-20, "{:.1f}"),
    ("prefill tok/s", "prefill_tokens_per_s", 1, "{:.1f}"),
    ("decode tok/s", "decode_tokens_per_s", 1, "{:.1f}"),
    ("generate tok/s", "generate_tokens_per_s", 1, "{:.1f}"),
]

LLAMACPP_FIELDS = [BENCH_FIELDS[0], ("params read / token", "params_read_per_token", 1, "{:,.0f}"),
                   ("file MiB", "file_bytes", 2**-20, "{:.1f}"), BENCH_FIELDS[3], *BENCH_FIELDS[5:]]


@app.command("bench-model")
def bench_model(
    model: Model = "demo",
    pruned: Annotated[list[Path] | None, typer.Option("--pruned", metavar="DIR", help="a selfprune export to compare (repeatable)")] = None,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens")] = 128,
    new_tokens: Annotated[int, typer.Option("--new-tokens")] = 64,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 1,
    repeats: Annotated[int, typer.Option("--repeats", help="timed runs; the median is reported")] = 3,
    use_vllm: Annotated[bool, typer.Option(
        "--vllm", help="serve each model with vLLM instead (docs/evaluation.md: Serving with vLLM)")] = False,
    vllm_python: VllmPython = None,
    use_llamacpp: Annotated[bool, typer.Option(
        "--llamacpp", help="run each model in llama.cpp as GGUF at each --quant (docs/evaluation.md: llama.cpp)")] = False,
    quants: Annotated[str, typer.Option("--quant", help="with --llamacpp: comma-separated GGUF types")] = "f16,q4_k_m",
    trust_remote_code: TrustRemoteCode = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON list of measurements")] = False,
    device: Device = "auto",
    dtype: DType = "auto",
) -> None:
    """Parameters, weight bytes, peak memory, prefill and decode tokens/s of MODEL and each --pruned export.

    The models are measured one after another under identical settings."""
    import gc

    from ..engine.models import load_model
    from ..evaluate.speed import format_measurement, measure, vllm_measure
    from ..evaluate.vllm_bridge import vllm_python as vllm_python_of

    settings = dict(prompt_tokens=prompt_tokens, new_tokens=new_tokens, batch_size=batch_size, repeats=repeats)
    if min(settings.values()) < 1:
        raise UserError("--prompt-tokens, --new-tokens, --batch-size and --repeats must all be at least 1")
    names = [model, *[str(p) for p in pruned or []]]
    for p in pruned or []:
        if not (p / "selfprune.json").is_file():
            raise UserError(f"--pruned {p} is not a selfprune export (no selfprune.json); make one with selfprune prune --out DIR")
    if use_llamacpp:
        if use_vllm or batch_size != 1:
            raise UserError("--llamacpp measures batch 1 on its own: drop --vllm and --batch-size")
        return _bench_llamacpp(names, [q.strip() for q in quants.split(",") if q.strip()], as_json, prompt_tokens,
                               new_tokens, repeats)
    if use_vllm:
        _refuse_model_code(names, trust_remote_code)
    python = vllm_python_of(vllm_python) if use_vllm else None
    results = []
    for name in names:
        if use_vllm:
            m = vllm_measure(_model_dir(name), python, dtype=dtype, trust_remote_code=trust_remote_code, **settings)
        else:
            lm = load_model(name, device, dtype)
            m = measure(lm.model, lm.tokenizer, **settings)
            del lm
            gc.collect()
        m["model"] = name
        results.append(m)
        if not as_json:
            console.print(f"[bold]{name}[/bold]\n" + format_measurement(m))
    if as_json:
        print(json.dumps(results))
        return
    console.print(_bench_table(results, BENCH_FIELDS,
                               f"{results[0]['backend']} on {results[0]['device']} ({results[0]['dtype']}), "
                               f"batch {batch_size}, prompt {prompt_tokens}, new {new_tokens}, median of {repeats}"))


def _bench_table(results: list[dict], fields: list[tuple], title: str) -> Table:
    """One column per model, ratios to the first (the dense model)."""
    base = results[0]
    table = Table("", *[f"{'dense' if i == 0 else 'pruned'}: {Path(r['model']).name}" for i, r in enumerate(results)],
                  title=title)
    for label, key, scale, fmt in fields:
        cells = []
        for r in results:
            v = r.get(key)
            if v is None:
                cells.append("n/a")
                continue
            cell = fmt.format(v * scale)
            if r is not base and base.get(key):
                cell += f" ({v / base[key]:.2f}x)"
            cells.append(cell)
        table.add_row(label, *cells)
    return table


def _bench_llamacpp(names: list[str], quants: list[str], as_json: bool, prompt_tokens: int, new_tokens: int,
                    repeats: int) -> None:
    """Each model written as GGUF at each quantization (in a temporary directory) and timed in
    llama.cpp, one process per model; one table per quantization."""
    import tempfile

    from ..evaluate.speed import llamacpp_measure
    from ..export.gguf import check_gguf_export, write_gguf

    dirs = [Path(_model_dir(name)) for name in names]
    for d in dirs:  # every refusal before the first file is written
        for q in quants:
            check_gguf_export(d, q)
    results: dict[str, list[dict]] = {q: [] for q in quants}
    with tempfile.TemporaryDirectory(prefix="selfprune-gguf-") as tmp:
        for q in quants:
            for i, (name, d) in enumerate(zip(names, dirs)):
                path = write_gguf(d, Path(tmp) / f"{i}.{q}.gguf", q)
                m = llamacpp_measure(path, q, prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=repeats)
                results[q].append(m | {"model": name})
                path.unlink()
    if as_json:
        print(json.dumps([m for q in quants for m in results[q]]))
        return
    for q in quants:
        first = results[q][0]
        console.print(_bench_table(results[q], LLAMACPP_FIELDS, f"llama.cpp {first['llama_cpp_version']} on this CPU ({first['threads']} "
                                               f"threads), {q}, prompt {prompt_tokens}, new {new_tokens}, median of {repeats}"))


def _refuse_model_code(names: list[str], trust_remote_code: bool) -> None:
    """A model directory that asks to run Python of its own, without --trust-remote-code, is refused
    before any model is served (:func:`selfprune.evaluate.vllm_bridge.remote_code_allowed`); the
    demo model brings none, and is not fetched for this."""
    from ..evaluate.vllm_bridge import remote_code_allowed

    for name in names:
        if name != "demo":
            remote_code_allowed(name, trust_remote_code)


def _model_dir(name: str) -> str:
    """A model's directory for vLLM: the demo model's, or the path given."""
    from ..data.demo import demo_model_dir

    return str(demo_model_dir()) if name == "demo" else name


@app.command("vllm-check")
def vllm_check(
    model: Annotated[str, typer.Argument(help="a selfprune export (prune --out DIR), a model directory, or demo")],
    vllm_python: VllmPython = None,
    trust_remote_code: TrustRemoteCode = False,
    new_tokens: Annotated[int, typer.Option("--new-tokens", help="greedy tokens per prompt")] = 16,
    as_json: Annotated[bool, typer.Option("--json", help="print the whole comparison as JSON")] = False,
) -> None:
    """Serve MODEL with vLLM and check it against transformers; exit 1 when they disagree.

    They agree on equal greedy tokens and prompt log-probabilities within tolerance (float32)."""
    from ..evaluate.vllm_bridge import agreement
    from ..evaluate.vllm_bridge import vllm_python as vllm_python_of

    if new_tokens < 1:
        raise UserError("--new-tokens must be at least 1")
    _refuse_model_code([model], trust_remote_code)
    python = vllm_python_of(vllm_python)
    result = agreement(_model_dir(model), python, new_tokens, trust_remote_code=trust_remote_code)
    if as_json:
        print(json.dumps(result))
    else:
        console.print(f"vLLM {result['vllm_version']} vs transformers on {result['model']}: greedy tokens equal on "
                      f"{result['prompts_equal']} prompts ({result['tokens_compared']} tokens); largest prompt "
                      f"log-probability gap {result['max_logprob_gap']:.2e} (tolerance {result['tolerance']:.0e}): "
                      + ("[green]agree[/green]" if result["ok"] else "[red]DISAGREE[/red]"))
    if not result["ok"]:
        raise typer.Exit(1)


@app.command("export-deci")
def export_deci_cmd(
    export_dir: Annotated[Path, typer.Argument(help="a selfprune export (prune --out DIR)")],
    out: Annotated[Path, typer.Argument(help="the DeciLM / nemotron-nas directory to write")],
) -> None:
    """Convert a selfprune export to DeciLM (nemotron-nas), which vLLM serves natively."""
    from ..export.deci import export_deci

    path = export_deci(export_dir, out)
    console.print(f"DeciLM checkpoint -> {path}; serve it with vllm.LLM({str(path)!r}, trust_remote_code=True)")


@app.command("export-gguf")
def export_gguf_cmd(
    export_dir: Annotated[Path, typer.Argument(help="a selfprune export (prune --out DIR), or a dense model directory")],
    out: Annotated[Path, typer.Argument(help="the .gguf file to write")],
    quant: Annotated[str, typer.Option("--quant", help="f32 | f16 | q8_0 | q4_k_m (quantized by llama.cpp)")] = "f16",
    tokenizer_pre: Annotated[str | None, typer.Option(
        "--tokenizer-pre", help="llama.cpp's pre-tokenizer name (default: the base GGUF's, else 'default')")] = None,
) -> None:
    """Write a selfprune export as one GGUF file for llama.cpp, Ollama and LM Studio (per-layer widths)."""
    from ..export.gguf import write_gguf

    path = write_gguf(export_dir, out, quant, tokenizer_pre)
    console.print(f"GGUF ({quant}, {path.stat().st_size / 2**20:.1f} MiB) -> {path}\n"
                  f"serve it: python -m llama_cpp.server --model {path}\n"
                  f"Ollama: a Modelfile with the line 'FROM {path.resolve()}', then ollama create NAME -f Modelfile")


@app.command()
def recover(
    model: Annotated[str, typer.Option("--model", help="a selfprune export directory (prune --out DIR)")],
    data: Data = "demo",
    steps: Annotated[int, typer.Option("--steps", help="LoRA training steps")] = 100,
    out: Annotated[Path, typer.Option("--out", help="directory of the recovered export")] = Path("runs/recovered"),
    lr: Annotated[float, typer.Option("--lr")] = 1e-4,
    rank: Annotated[int, typer.Option("--rank", help="LoRA rank r")] = 8,
    alpha: Annotated[int, typer.Option("--alpha", help="LoRA alpha")] = 16,
    seqlen: Annotated[int, typer.Option("--seqlen", help="tokens per training window")] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", help="training windows per step")] = 2,
    test_seqlen: Annotated[int, typer.Option("--test-seqlen", help="tokens per test perplexity window")] = 512,
    test_windows: Annotated[int, typer.Option("--test-windows", help="windows of the test split (0: all)")] = 16,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    device: Device = "auto",
    dtype: DType = "auto",
) -> None:
    """Fine-tune a pruned export with LoRA on the calibration split (shapes kept); perplexity before and after."""
    from ..evaluate.lora import check_recovery

    check_recovery(model, out, test_windows)  # before Prefect starts: bad input fails in a second
    _configure_flows()
    from selfprune.flows.recover import recover as recover_flow

    s = recover_flow(model=model, data=data, steps=steps, out=str(out), lr=lr, rank=rank, alpha=alpha, seqlen=seqlen,
                     batch_size=batch_size, test_seqlen=test_seqlen, test_windows=test_windows, seed=seed,
                     device=device, dtype=dtype)
    console.print(f"test ppl {s['ppl_before']:.3f} -> {s['ppl_after']:.3f} ({s['tokens']} tokens in {test_seqlen}-token "
                  f"windows); loss {s['loss_first']:.4f} -> {s['loss_last']:.4f} over {steps} steps; "
                  f"{s['params']:,} params -> {out}")


@app.command("demo-gguf")
def demo_gguf() -> None:
    """Print the path of the demo model's GGUF (fetched once), to serve as a local LLM oracle.

    python -m llama_cpp.server --model "$(selfprune demo-gguf)" --n_ctx 8192 --model_alias smollm2"""
    from ..data.demo import demo_gguf_path

    print(demo_gguf_path())


@app.command("prefect-setup")
def prefect_setup(
    pool: Annotated[str, typer.Option("--pool", help="process work pool for the deployments")] = "selfprune-process",
    automation: Annotated[Path, typer.Option("--automation", help="the zombie-run automation file")] = Path("automations/zombies.yaml"),
) -> None:
    """Create the work pool and the zombie-run automation on the server at PREFECT_API_URL.

    The automation crashes runs whose node died. Safe to run again: what exists is kept (the
    automation is updated)."""
    if not os.environ.get("PREFECT_API_URL"):
        raise UserError("PREFECT_API_URL is not set: start `prefect server start` and export "
                        "PREFECT_API_URL=http://127.0.0.1:4200/api (a temporary server would forget the setup)")
    from ..ops import ensure_work_pool, install_automation

    console.print(ensure_work_pool(pool))
    console.print(install_automation(automation))


def _fail(e: UserError) -> None:
    console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)  # "selfprune[dask]" is no markup
    sys.exit(3 if isinstance(e, EnvironmentFault) else 2)


def _exit_on_sigterm(signum: int, _frame) -> None:
    """SIGTERM (a preempted job, a scheduler's stop, ``kill``) ends the CLI as an exit does: the
    exit hooks run, so a temporary Prefect server still starting (before its watchdog exists) is
    stopped too instead of being left behind. During a flow run Prefect's own handler comes first
    and marks the run Crashed, which a rerun resumes."""
    raise SystemExit(128 + signum)


def main() -> None:
    """Entry point: one line on stderr, and exit code 2 for bad input (:class:`UserError`), 3 for
    the machine (:class:`EnvironmentFault`: disk, permissions, the Prefect server), 143 on SIGTERM."""
    from selfprune.tasks.prefect_env import quiet_progress_bars

    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    quiet_progress_bars()  # selfprune shows its own progress; keep stderr readable
    try:
        app()
    except UserError as e:
        _fail(e)
    except Exception as e:
        if "prefect" not in sys.modules:  # no flow ran: nothing of the machine's to name
            raise
        from selfprune.tasks.faults import explain

        fault = explain(e)
        if fault is None:
            raise
        _fail(fault)


if __name__ == "__main__":
    main()
