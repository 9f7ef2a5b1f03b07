"""What a search shows a person: per-generation tables, best-so-far markdown, and PNG plots.

Pure formatting and plotting (matplotlib, headless); the flows publish the results as Prefect
artifacts and save the plots in the run directory.
"""

from __future__ import annotations

import io
from pathlib import Path

from selfprune.fileio import atomic_write_bytes


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


def save(fig, ax, path: Path) -> Path:
    ax.legend()
    fig.tight_layout()
    return save_png(fig, path, dpi=120)


def save_png(fig, path: Path, dpi: int) -> Path:
    """Write ``fig`` to ``path`` as PNG by atomic replace, and close it: ``savefig(path)`` would
    leave half a plot on a kill and write through a link planted at ``path`` in the run directory."""
    import matplotlib.pyplot as plt

    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=dpi)
    plt.close(fig)
    return atomic_write_bytes(path, png.getvalue())


def plot_history(history: list[dict], path: Path) -> Path:
    """Best and mean fitness per generation."""
    gens = [h["generation"] for h in history]
    fig, ax = new_axes()
    ax.plot(gens, [h["best"] for h in history], marker="o", label="best")
    ax.plot(gens, [h["mean"] for h in history], marker=".", label="population mean")
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness perplexity (lower is better)")
    ax.set_yscale("log")
    return save(fig, ax, path)


def plot_rates(rates: list[float], beta: float, path: Path) -> Path:
    """The best per-layer pruning rates against the uniform target."""
    fig, ax = new_axes()
    ax.bar(range(len(rates)), rates, color="tab:blue")
    ax.axhline(beta, color="tab:red", linestyle="--", label=f"uniform {beta}")
    ax.set_xlabel("layer")
    ax.set_ylabel("pruning rate")
    return save(fig, ax, path)


def metric_markdown(generation: int, best: dict) -> str:
    """The best metric so far, for the AutoPrune search's best-so-far artifact."""
    return (
        f"### Best metric after generation {generation}\n\n"
        f"- `{best['metric']}`\n"
        f"- fitness (perplexity on the fitness split): **{best['fitness']:.4f}**\n"
        f"- from: {best['source']}" + (f", edit `{best['edit']}`" if best.get("edit") else "") + "\n"
    )


def plot_metric_graph(graph: list[dict], best: str, path: Path) -> Path:
    """The metrics of an AutoPrune search: one point per metric at (generation, fitness), an arrow
    from each parent to its child, the best metric's lineage in red."""
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
    return save(fig, ax, path)
