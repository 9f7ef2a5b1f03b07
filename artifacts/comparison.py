"""What a comparison report shows: dense vs the allocations vs searched allocations, and pruning metrics.

Pure formatting and plotting (no Prefect): Markdown and self-contained HTML (PNG plots embedded
as base64), table rows for a Prefect table artifact, and the plots (test perplexity and mean
zero-shot accuracy by method and ratio; test perplexity by metric and sparsity).

A row (one evaluated model) is a :class:`selfprune.evaluate.report.Row`, the report a
:class:`~selfprune.evaluate.report.Report` (a ``report.json`` read back with its ``from_json``).
Structured rows and metric rows go in two tables, each under the protocol its rows share
(:func:`selfprune.protocol.common` refuses rows that differ).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import re
from pathlib import Path

from selfprune.artifacts.report import fmt_rates, save_png, short_name
from selfprune.evaluate.report import Report, ReportMeta, Row, SeedRow, sort_rows
from selfprune.protocol import common
from selfprune.protocol import lines as protocol_lines
from selfprune.storage.fileio import atomic_write_text

PLOTS = {"ppl": "ppl.png", "acc": "accuracy.png", "metrics": "ppl-metrics.png"}


def _num(x, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _ratio(x) -> str:
    return "0" if x is None else f"{x:g}"


def _spread(value: float | None, s: dict | None, digits: int) -> str:
    """A figure, and for a search's seeds (``s``: its spread) their mean ± std and every seed's value."""
    if not s:
        return _num(value, digits)
    each = ", ".join(f"{v:.{digits}f}" for v in s["values"].values())
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} (seeds {', '.join(s['values'])}: {each})"


def table(rows: list[Row], tasks: list[str]) -> tuple[list[str], list[list[str]]]:
    """(header, cells) of a comparison table, rows sorted by ratio then method; a search's seeds
    show their mean ± std and each seed's value, and searches the candidates they scored."""
    evals = any(r.candidates is not None for r in rows)
    speed = next((r.llamacpp for r in rows if r.llamacpp), None)
    speed_header = [f"llama.cpp {speed['dtype']} decode tok/s"] if speed else []
    header = ["ratio", "method", "realized", "kept params", "test ppl", *tasks, "mean acc", *(["candidates"] * evals),
              *speed_header]
    cells = []
    for r in sort_rows(rows):
        n = r.candidates
        cells.append([_ratio(r.ratio), r.label, _num(r.realized_ratio), f"{r.kept_params:,}",
                      _spread(r.ppl, r.ppl_spread, 3), *[_num(r.acc.get(t)) for t in tasks],
                      _spread(r.mean_acc, r.mean_acc_spread, 4), *([_num(n, 0) if n is not None else ""] * evals),
                      *([_num(r.llamacpp["decode_tokens_per_s"], 1)] if speed else [])])
    return header, cells


TITLES = {"structured": "Structured pruning (ratio: share of the prunable parameters removed)",
          "metric": "Single-weight pruning by metric (ratio: sparsity)"}


def split_tables(rows: list[Row]) -> list[tuple[str, list[Row]]]:
    """(kind, rows) of each table (titles in ``TITLES``): ``structured`` pruning (dense, allocations,
    searches) and ``metric``, single-weight pruning (its ratio is the sparsity), each with the dense row."""
    dense = [r for r in rows if r.method == "dense"]
    structured = [r for r in rows if r.method != "metric"]
    metric = [r for r in rows if r.method == "metric"]
    return [(kind, part) for kind, part in (("structured", structured), ("metric", dense + metric)) if len(part) > len(dense)]


def artifact_rows(rows: list[Row], tasks: list[str]) -> list[dict]:
    """The table as a list of dicts (a Prefect table artifact)."""
    header, cells = table(rows, tasks)
    return [dict(zip(header, c)) for c in cells]


def protocol_text(rows: list[Row]) -> list[str]:
    """The protocol a table's rows share, as lines printed once above it (refuses mixed rows)."""
    p = common([(r.label, r.protocol) for r in rows])
    return protocol_lines(p) + [f"zero-shot: {p['zero_shot']}; mean acc is the mean over tasks"]


def _counts_line(meta: ReportMeta) -> str:
    return (f"statistics `{meta.stats_key[:12]}`; {meta.test_tokens} predicted test tokens per model; "
            f"evaluations computed {meta.computed}, from cache {meta.cached}")


def _per_seed(rows: list[Row]) -> list[tuple[str, Row | SeedRow]]:
    """(name, row or seed) for every model: a search's seeds one by one."""
    out: list[tuple[str, Row | SeedRow]] = []
    for r in sort_rows(rows):
        name = f"{r.label} @ {_ratio(r.ratio)}"
        out += [(f"{name}, seed {s.seed}", s) for s in r.seeds] if r.seeds else [(name, r)]
    return out


def rates_lines(rows: list[Row]) -> list[tuple[str, str]]:
    return [(name, fmt_rates(r.rates)) for name, r in _per_seed([r for r in rows if r.method != "dense"])]


def rates_csv(rows: list[Row]) -> str:
    """Every model's per-layer rates (sparsities for metric rows) as CSV, one line per model and
    seed: numbers to reuse (a structured row's as ``selfprune prune --allocation RATES.json``)."""
    models = _per_seed([r for r in rows if r.method != "dense"])
    width = max((len(r.rates) for _, r in models), default=0)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["model", *(f"layer_{i}" for i in range(width))])
    writer.writerows([name, *(f"{x:.6f}" for x in r.rates)] for name, r in models)
    return text.getvalue()


def oracle_lines(rows: list[Row]) -> list[tuple[str, str]]:
    """How each searched allocation's LLM oracle did: replies by outcome, fallbacks, tokens, cost."""
    lines = []
    for name, r in _per_seed(rows):
        o = r.oracle
        if o:
            replies = ", ".join(f"{n} {kind}" for kind, n in o["replies"].items())
            cost = f", ${o['cost_usd']:.4f}" if "cost_usd" in o else ""
            lines.append((name, f"{o['calls']} requests ({replies}), {o['reasks']} re-asks, {o['fallbacks']} GA fallbacks, "
                          f"{o['prompt_tokens']:,} prompt + {o['completion_tokens']:,} completion tokens{cost}"))
    return lines


def markdown(rows: list[Row], tasks: list[str], meta: ReportMeta, plots: dict[str, str] | None = None) -> str:
    """The report as Markdown; ``plots`` maps a caption to an image path (relative to the file)."""
    out = ["# selfprune comparison report", "", f"- {_counts_line(meta)}"]
    for kind, part in split_tables(rows):
        header, cells = table(part, tasks)
        out += ["", f"## {TITLES[kind]}", ""] + [f"- {line}" for line in protocol_text(part)] + [""]
        out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(c) + " |" for c in cells]
    out += ["", "## Per-layer rates", ""]
    out += [f"- {name}: `{rates}`" for name, rates in rates_lines(rows)]
    if oracle_lines(rows):
        out += ["", "## LLM oracle replies", ""] + [f"- {name}: {text}" for name, text in oracle_lines(rows)]
    for caption, path in (plots or {}).items():
        out += ["", f"![{caption}]({path})"]
    return "\n".join(out) + "\n"


_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "th{background:#f3f3f3}td:nth-child(2){text-align:left}code{font-size:90%}img{max-width:100%}")


def _inline(escaped: str) -> str:
    """Markdown's inline code and bold, in already-escaped text."""
    return re.sub(r"\*\*([^*]*)\*\*", r"<b>\1</b>", re.sub(r"`([^`]*)`", r"<code>\1</code>", escaped))


def html_report(rows: list[Row], tasks: list[str], meta: ReportMeta, pngs: dict[str, bytes]) -> str:
    """The report as one self-contained HTML page: ``pngs`` (caption -> PNG bytes) are embedded."""
    e = html.escape
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>selfprune report: {e(meta.model)}</title>"
             f"<style>{_CSS}</style></head><body><h1>selfprune comparison report</h1><p>{_inline(e(_counts_line(meta)))}</p>"]
    for kind, part in split_tables(rows):
        header, cells = table(part, tasks)
        parts.append(f"<h2>{e(TITLES[kind])}</h2><ul>")
        parts += [f"<li>{_inline(e(line))}</li>" for line in protocol_text(part)]
        parts.append("</ul><table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead><tbody>")
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in cells]
        parts.append("</tbody></table>")
    parts.append("<h2>Per-layer rates</h2><ul>")
    parts += [f"<li>{e(name)}: <code>{e(rates)}</code></li>" for name, rates in rates_lines(rows)]
    parts.append("</ul>")
    if oracle_lines(rows):
        parts.append("<h2>LLM oracle replies</h2><ul>")
        parts += [f"<li>{e(name)}: {e(text)}</li>" for name, text in oracle_lines(rows)]
        parts.append("</ul>")
    for caption, png in pngs.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(f"<figure><img alt='{e(caption)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{e(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _figure(r: Row, key: str) -> tuple[float | None, dict | None]:
    """A row's figure ``key`` (``ppl`` or ``mean_acc``) and its spread over seeds."""
    return (r.ppl, r.ppl_spread) if key == "ppl" else (r.mean_acc, r.mean_acc_spread)


def _series(rows: list[Row], key: str) -> dict[str, list[tuple[float, float, float]]]:
    """label -> (ratio, value, std over seeds or 0) points."""
    series: dict[str, list[tuple[float, float, float]]] = {}
    for r in sort_rows(rows):
        value, s = _figure(r, key)
        if r.method != "dense" and value is not None:
            series.setdefault(r.label, []).append((r.ratio, value, (s or {}).get("std", 0.0)))
    return series


def _plot(rows: list[Row], key: str, ylabel: str, xlabel: str, path: Path, log: bool, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _series(rows, key)
    many = len(series) > 8  # metric rows: the legend goes beside the axes, the styles cycle further
    fig, ax = plt.subplots(figsize=(9.5, 4.8) if many else (6, 3.8))
    styles = ["-", "--", ":", "-."]
    for i, (label, points) in enumerate(series.items()):
        xs, ys, errs = zip(*points)
        ax.errorbar(xs, ys, yerr=errs if any(errs) else None, marker="o", capsize=3, label=label,
                    linestyle=styles[i // 10 % len(styles)] if many else "-")
    dense = [_figure(r, key)[0] for r in rows if r.method == "dense" and _figure(r, key)[0] is not None]
    if dense:
        ax.axhline(dense[0], color="black", linestyle="--", label="dense")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), ncol=2 if len(series) > 16 else 1) if many \
        else ax.legend(fontsize=8)
    return save_png(fig, path, dpi=110, title=title)


PPL = "test perplexity (lower is better)"


def render(summary: Report, out_dir: Path) -> dict[str, str]:
    """Write ``report.md``, a self-contained ``report.html`` and the plots of a report summary
    (:func:`selfprune.evaluate.report.summarize`) into ``out_dir``: test perplexity and mean
    zero-shot accuracy of the structured rows against the ratio (a search's seeds as mean with a
    std bar), the metric rows' test perplexity against the sparsity, and ``rates.csv``. Returns
    name -> path."""
    rows, meta, tasks = summary.rows, summary.meta, summary.meta.tasks
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {}

    def title(figure: str) -> str:  # which model, data and split a plot shows
        return (f"{short_name(meta.model)}: {figure}\n{short_name(meta.data)}, test split "
                f"({meta.test_tokens} predicted tokens in {meta.seqlen}-token windows)")

    for kind, part in split_tables(rows):
        if kind == "metric":
            figure = "test perplexity by metric, allocation and sparsity"
            plots[figure] = _plot(part, "ppl", PPL, "sparsity", out_dir / PLOTS["metrics"], log=True, title=title(figure))
            continue
        figure = "test perplexity by method and ratio"
        plots[figure] = _plot(part, "ppl", PPL, "target pruning ratio", out_dir / PLOTS["ppl"], log=True, title=title(figure))
        figure = "mean zero-shot accuracy by method and ratio"
        plots[figure] = _plot(part, "mean_acc", "mean zero-shot accuracy", "target pruning ratio", out_dir / PLOTS["acc"],
                              log=False, title=title(figure) + f"; tasks {', '.join(tasks)}")
    atomic_write_text(out_dir / "rates.csv", rates_csv(rows))
    atomic_write_text(out_dir / "report.md", markdown(rows, tasks, meta, {k: p.name for k, p in plots.items()}))
    atomic_write_text(out_dir / "report.html", html_report(rows, tasks, meta, {k: p.read_bytes() for k, p in plots.items()}))
    return {name: str(out_dir / name) for name in ("report.md", "report.html", "rates.csv", *(p.name for p in plots.values()))}
