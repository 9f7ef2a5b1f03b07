"""LoRA recovery of a pruned export as a Prefect flow (optional post-training step).

Thin around :func:`selfprune.evaluate.lora.recover` (``selfprune.recover``), which loads the export,
measures, trains, measures again and saves the recovered export; the flow publishes what it did as
a Markdown artifact and returns its summary.
"""

from __future__ import annotations

import selfprune.flows  # noqa: F401  (first: selfprune's Prefect settings and quiet logs; flows/__init__.py)

# isort: split

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from selfprune.evaluate.lora import Recovery
from selfprune.evaluate.lora import recover as recover_export


@flow(name="selfprune-recover", validate_parameters=True)
def recover(
    model: str,
    data: str = "demo",
    steps: int = 100,
    out: str = "runs/recovered",
    lr: float = 1e-4,
    rank: int = 8,
    alpha: int = 16,
    seqlen: int = 256,
    batch_size: int = 2,
    test_seqlen: int = 512,
    test_windows: int = 16,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "auto",
) -> dict:
    """Fine-tune the pruned export ``model`` with LoRA on ``data``'s calibration split for ``steps``
    steps (``batch_size`` windows of ``seqlen`` tokens each) and save it to ``out``; perplexity on
    ``test_windows`` (0: all) windows of ``test_seqlen`` tokens of the test split, before and after."""
    result = recover_export(model, out, data, steps=steps, lr=lr, rank=rank, alpha=alpha, seqlen=seqlen,
                            batch_size=batch_size, test_seqlen=test_seqlen, test_windows=test_windows, seed=seed,
                            device=device, dtype=dtype)
    training = f"r={rank}, lr={lr}, {batch_size} x {seqlen} tokens per step, calibration split of `{data}`"
    create_markdown_artifact(_markdown(result, training),
                             key="selfprune-recover-" + "".join(c if c.isalnum() else "-" for c in Path(out).name.lower()))
    return result.to_dict()


def _markdown(result: Recovery, training: str) -> str:
    """What the run's page shows: perplexity before and after, the loss, where the export went."""
    before, after, losses = result.before, result.after, result.losses
    return (f"### LoRA recovery of `{result.source.name}`\n\n"
            f"- test perplexity ({after.tokens} tokens in {after.seqlen}-token windows): "
            f"**{before.ppl:.4f} -> {after.ppl:.4f}**\n"
            f"- training loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps ({training})\n"
            f"- saved to `{result.out}`\n")
