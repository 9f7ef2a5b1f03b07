"""What a search shows a person: per-generation tables, best-so-far markdown, and PNG plots.

Pure formatting and plotting (matplotlib, headless); the flows publish the results as Prefect
artifacts and save the plots in the run directory.
"""

from __future__ import annotations

from pathlib import Path


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
    import matplotlib.pyplot as plt

    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
