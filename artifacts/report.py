"""What a search shows a person: per-generation tables, best-so-far markdown, and PNG plots.

Pure formatting and plotting (matplotlib, headless); the flows publish the results as Prefect
artifacts and save the plots in the run directory.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

from selfprune.storage.fileio import atomic_write_bytes

if TYPE_CHECKING:
    from selfprune.evolve.autoprune import MetricSummary
    from selfprune.evolve.runner import RateSummary


def fmt_rates(rates: list[float]) -> str:
    return "[" + ", ".join(f"{r:.2f}" for r in rates) + "]"


def best_markdown(generation: int, best: dict, n_layers: int) -> str:
    return (
        f"### Best after generation {generation}\n\n"
        f"- fitness (perplexity on the fitness split): **{best['fitness']:.4f}**\n"
        f"- kept parameters: {best['kept_params']:,}\n"
        f"- rates ({n_layers} layers): `{fmt_rates(best['rates'])}`\n"
    )


def new_axes():
    """A headless matplotlib figure of the size every plot here uses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6, 3.5))


def save(fig, ax, path: Path, title: str) -> Path:
    ax.legend()
    return save_png(fig, path, dpi=120, title=title)


def save_png(fig, path: Path, dpi: int, title: str) -> Path:
    """Write ``fig`` to ``path`` as PNG by atomic replace, and close it: ``savefig(path)`` would
    leave half a plot on a kill and write through a link planted at ``path`` in the run directory.
    ``title`` (what the plot shows, of which run) heads the figure and is the PNG's Title field,
    so a plot copied out of its run directory still says what it is."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=dpi, metadata={"Title": title})
    plt.close(fig)
    return atomic_write_bytes(path, png.getvalue())


def short_name(path: str) -> str:
    """A model or data file by its name (a directory's full path would crowd the title)."""
    return Path(path).expanduser().name if Path(path).expanduser().exists() else path


def search_title(config, summary: RateSummary | MetricSummary, figure: str) -> str:
    """A search plot's title: the model and its target, the figure, the data and split the
    fitness was scored on, and the best's test perplexity."""
    if hasattr(config, "sparsities"):  # AutoPrune: a metric judged at these sparsities
        target, test = f"sparsity {', '.join(map(str, config.sparsities))}", summary.test_ppl["found"].values()
    else:
        target, test = f"{'sparsity' if config.pattern else 'ratio'} {config.ratio}", [summary.test_ppl]
    return (f"{short_name(config.model)} at {target}: {figure}\n{short_name(config.data)}, fitness split "
            f"({config.fitness_windows} x {config.seqlen} tokens); best's test ppl {', '.join(f'{p:.1f}' for p in test)}")


def plot_history(summary: RateSummary | MetricSummary, config, path: Path) -> Path:
    """Best and mean fitness per generation."""
    history = summary.record.history
    gens = [h.generation for h in history]
    fig, ax = new_axes()
    ax.plot(gens, [h.best for h in history], marker="o", label="best")
    ax.plot(gens, [h.mean for h in history], marker=".", label="population mean")
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness perplexity (lower is better)")
    ax.set_yscale("log")
    return save(fig, ax, path, search_title(config, summary, "best and mean fitness per generation"))


def plot_rates(summary: RateSummary, config, path: Path) -> Path:
    """The best per-layer pruning rates against the uniform target."""
    rates, beta = summary.rates, config.ratio
    fig, ax = new_axes()
    ax.bar(range(len(rates)), rates, color="tab:blue")
    ax.axhline(beta, color="tab:red", linestyle="--", label=f"uniform {beta}")
    ax.set_xlabel("layer")
    ax.set_ylabel("pruning rate")
    return save(fig, ax, path, search_title(config, summary, "the best's rate per layer"))


def metric_markdown(generation: int, best: dict) -> str:
    """The best metric so far, for the AutoPrune search's best-so-far artifact."""
    return (
        f"### Best metric after generation {generation}\n\n"
        f"- `{best['metric']}`\n"
        f"- fitness (perplexity on the fitness split): **{best['fitness']:.4f}**\n"
        f"- from: {best['source']}" + (f", edit `{best['edit']}`" if best.get("edit") else "") + "\n"
    )


def plot_metric_graph(summary: MetricSummary, config, path: Path) -> Path:
    """The metrics of an AutoPrune search: one point per metric at (generation, fitness), an arrow
    from each parent to its child, the best metric's lineage in red."""
    graph, best = summary.graph, summary.metric
    fig, ax = new_axes()
    where = {n["text"]: (n["generation"], n["fitness"]) for n in graph if n.get("fitness") is not None}
    on_path, key = set(), best
    by_text = {n["text"]: n for n in graph}
    while key in by_text and key not in on_path:
        on_path.add(key)
        key = by_text[key]["parents"][0] if by_text[key]["parents"] else ""
    for n in graph:
        for parent in n["parents"]:
            if n["text"] in where and parent in where:
                red = n["text"] in on_path and parent in on_path
                (x0, y0), (x1, y1) = where[parent], where[n["text"]]
                ax.annotate("", (x1, y1), (x0, y0), arrowprops={"arrowstyle": "->", "lw": 1.6 if red else 0.5,
                                                                 "color": "tab:red" if red else "0.7"})
    for source, color in (("built-in", "tab:green"), ("random", "0.5"), ("gp", "tab:blue"), ("llm", "tab:purple")):
        points = [where[n["text"]] for n in graph if n["source"] == source and n["text"] in where]
        if points:
            ax.scatter([p[0] for p in points], [p[1] for p in points], s=14, color=color, label=source, zorder=3)
    if best in where:
        ax.scatter([where[best][0]], [where[best][1]], s=60, marker="*", color="tab:red", label="best", zorder=4)
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness perplexity (lower is better)")
    ax.set_yscale("log")
    return save(fig, ax, path, search_title(config, summary, "each metric's fitness and parents"))
