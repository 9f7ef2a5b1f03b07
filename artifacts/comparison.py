"""What a comparison report shows: dense vs uniform Wanda-sp vs OWL vs searched allocations.

Pure formatting and plotting (no Prefect): Markdown and self-contained HTML (PNG plots embedded
as base64), table rows for a Prefect table artifact, and the two plots (test perplexity and mean
zero-shot accuracy by method and ratio).

A row (one evaluated model) is a dict with ``label``, ``method`` (``dense``, ``uniform``, ``owl``,
``search``), ``ratio`` (``None`` for dense), ``realized_ratio``, ``kept_params``, ``rates``,
``ppl``, ``tokens``, ``seqlen``, ``windows``, ``acc`` (task -> score or ``None``), ``mean_acc``.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from selfprune.artifacts.report import fmt_rates
from selfprune.evaluate.report import sort_rows
from selfprune.fileio import atomic_write_text

PLOTS = {"ppl": "ppl.png", "acc": "accuracy.png"}


def _num(x, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _ratio(x) -> str:
    return "0" if x is None else f"{x:g}"


def table(rows: list[dict], tasks: list[str]) -> tuple[list[str], list[list[str]]]:
    """(header, cells) of the comparison table, rows sorted by ratio then method."""
    header = ["ratio", "method", "realized", "kept params", "test ppl", *tasks, "mean acc"]
    cells = []
    for r in sort_rows(rows):
        acc = r.get("acc") or {}
        cells.append([_ratio(r["ratio"]), r["label"], _num(r["realized_ratio"]), f"{r['kept_params']:,}",
                      _num(r["ppl"], 3), *[_num(acc.get(t)) for t in tasks], _num(r.get("mean_acc"))])
    return header, cells


def artifact_rows(rows: list[dict], tasks: list[str]) -> list[dict]:
    """The table as a list of dicts (a Prefect table artifact)."""
    header, cells = table(rows, tasks)
    return [dict(zip(header, c)) for c in cells]


def _settings_lines(meta: dict) -> list[str]:
    return [
        f"model `{meta['model']}` (fingerprint `{meta['model_fingerprint'][:12]}`), data `{meta['data']}`",
        f"perplexity: token-level on the **test** split, {meta['test_windows'] or 'all'} non-overlapping windows of "
        f"{meta['seqlen']} tokens ({meta['test_tokens']} predicted tokens per model)",
        f"zero-shot: lm-eval {meta['lm_eval_version']}, tasks {', '.join(meta['tasks'])}, "
        f"limit {meta['limit'] if meta['limit'] is not None else 'none'}, max length {meta['max_length']}; "
        f"{meta['convention']}; mean acc is the mean over tasks",
        f"calibration: {meta['samples']} windows of {meta['calib_seqlen']} tokens (statistics `{meta['stats_key'][:12]}`)",
        f"evaluations computed {meta['computed']}, from cache {meta['cached']}",
    ]


def rates_lines(rows: list[dict]) -> list[tuple[str, str]]:
    return [(f"{r['label']} @ {_ratio(r['ratio'])}", fmt_rates(r["rates"])) for r in sort_rows(rows)
            if r["method"] != "dense"]


def oracle_lines(rows: list[dict]) -> list[tuple[str, str]]:
    """How each searched allocation's LLM oracle did: replies by outcome, fallbacks, tokens, cost."""
    lines = []
    for r in sort_rows(rows):
        o = r.get("oracle")
        if o:
            replies = ", ".join(f"{n} {kind}" for kind, n in o["replies"].items())
            cost = f", ${o['cost_usd']:.4f}" if "cost_usd" in o else ""
            lines.append((f"{r['label']} @ {_ratio(r['ratio'])}",
                          f"{o['calls']} requests ({replies}), {o['reasks']} re-asks, {o['fallbacks']} GA fallbacks, "
                          f"{o['prompt_tokens']:,} prompt + {o['completion_tokens']:,} completion tokens{cost}"))
    return lines


def markdown(rows: list[dict], tasks: list[str], meta: dict, plots: dict[str, str] | None = None) -> str:
    """The report as Markdown; ``plots`` maps a caption to an image path (relative to the file)."""
    header, cells = table(rows, tasks)
    out = ["# selfprune comparison report", ""]
    out += [f"- {line}" for line in _settings_lines(meta)] + [""]
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


def html_report(rows: list[dict], tasks: list[str], meta: dict, pngs: dict[str, bytes]) -> str:
    """The report as one self-contained HTML page: ``pngs`` (caption -> PNG bytes) are embedded."""
    e = html.escape
    header, cells = table(rows, tasks)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>selfprune report: {e(meta['model'])}</title>"
             f"<style>{_CSS}</style></head><body><h1>selfprune comparison report</h1><ul>"]
    parts += [f"<li>{_inline(e(line))}</li>" for line in _settings_lines(meta)]
    parts.append("</ul><table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead><tbody>")
    parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in cells]
    parts.append("</tbody></table><h2>Per-layer rates</h2><ul>")
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


def _series(rows: list[dict], key: str) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = {}
    for r in sort_rows(rows):
        if r["method"] != "dense" and r.get(key) is not None:
            series.setdefault(r["label"], []).append((r["ratio"], r[key]))
    return series


def _plot(rows: list[dict], key: str, ylabel: str, path: Path, log: bool) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _series(rows, key)
    many = len(series) > 8  # metric rows: the legend goes beside the axes, the styles cycle further
    fig, ax = plt.subplots(figsize=(9.5, 4.8) if many else (6, 3.8))
    styles = ["-", "--", ":", "-."]
    for i, (label, points) in enumerate(series.items()):
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label=label, linestyle=styles[i // 10 % len(styles)] if many else "-")
    dense = [r for r in rows if r["method"] == "dense" and r.get(key) is not None]
    if dense:
        ax.axhline(dense[0][key], color="black", linestyle="--", label="dense")
    ax.set_xlabel("target pruning ratio")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), ncol=2 if len(series) > 16 else 1) if many \
        else ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ppl(rows: list[dict], path: Path) -> Path:
    """Test perplexity by method (one line each) against the ratio; dense as a dashed line."""
    return _plot(rows, "ppl", "test perplexity (lower is better)", path, log=True)


def plot_accuracy(rows: list[dict], path: Path) -> Path:
    """Mean zero-shot accuracy by method against the ratio; dense as a dashed line."""
    return _plot(rows, "mean_acc", "mean zero-shot accuracy", path, log=False)


def render(summary: dict, out_dir: Path) -> dict[str, str]:
    """Write ``report.md``, a self-contained ``report.html`` and the plots of a report summary
    (:func:`selfprune.evaluate.report.summarize`) into ``out_dir``; returns name -> path."""
    rows, meta, tasks = summary["rows"], summary["meta"], summary["meta"]["tasks"]
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {"test perplexity by method and ratio": plot_ppl(rows, out_dir / PLOTS["ppl"]),
             "mean zero-shot accuracy by method and ratio": plot_accuracy(rows, out_dir / PLOTS["acc"])}
    atomic_write_text(out_dir / "report.md", markdown(rows, tasks, meta, {k: p.name for k, p in plots.items()}))
    atomic_write_text(out_dir / "report.html", html_report(rows, tasks, meta, {k: p.read_bytes() for k, p in plots.items()}))
    return {name: str(out_dir / name) for name in ("report.md", "report.html", *PLOTS.values())}
