"""LoRA recovery of a pruned export as a Prefect flow (optional post-training step).

Thin around :func:`selfprune.evaluate.lora.lora_recover`: load the export, measure test-split
perplexity, fine-tune LoRA adapters on the calibration split (merged back, pruned shapes kept),
measure again, and save the recovered export with its record extended by ``recovery``.
"""

from __future__ import annotations

import selfprune.flows  # noqa: F401  (first: selfprune's Prefect settings and quiet logs; flows/__init__.py)

# isort: split

import json
import time
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from selfprune.core.errors import UserError


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
    from selfprune.engine.data import data_fingerprint, load_split, split_windows
    from selfprune.engine.export import RECORD, save_pruned
    from selfprune.engine.models import load_model
    from selfprune.engine.ppl import perplexity
    from selfprune.evaluate.lora import lora_recover

    start = time.perf_counter()
    src = Path(model).expanduser()
    if not (src / RECORD).is_file():
        raise UserError(f"{model} is not a selfprune export (no {RECORD}); prune first: selfprune prune --out DIR")
    if Path(out).expanduser().resolve() == src.resolve():
        raise UserError("--out must differ from the export being recovered; it is kept as it is")
    record = json.loads((src / RECORD).read_text())
    lm = load_model(str(src), device, dtype)
    shapes = {name: tuple(p.shape) for name, p in lm.model.named_parameters()}
    test = split_windows(lm.tokenizer, data, "test", test_seqlen, test_windows or None)
    before = perplexity(lm.model, test, batch_size)
    text = load_split(data, "calibration")
    recovered, losses = lora_recover(lm.model, lm.tokenizer, text, steps=steps, lr=lr, r=rank, alpha=alpha,
                                     seqlen=seqlen, batch_size=batch_size, seed=seed)
    after_shapes = {name: tuple(p.shape) for name, p in recovered.named_parameters()}
    if after_shapes != shapes:
        raise RuntimeError("LoRA recovery changed the pruned model's shapes")
    after = perplexity(recovered, test, batch_size)
    recovery = {
        "method": "lora", "steps": steps, "lr": lr, "r": rank, "alpha": alpha, "seqlen": seqlen,
        "batch_size": batch_size, "seed": seed, "data": data,
        "data_fingerprint": data_fingerprint(data, "calibration"), "source": str(src),
        "source_fingerprint": lm.fingerprint, "loss_first": losses[0], "loss_last": losses[-1],
        "test_before": before.to_dict(), "test_after": after.to_dict(),
    }
    new_record = record | {"method": f"{record.get('method', 'wanda-sp')}+lora", "recovery": recovery}
    save_pruned(recovered, lm.tokenizer, Path(out), new_record)
    summary = {"ppl_before": before.ppl, "ppl_after": after.ppl, "tokens": after.tokens, "test_seqlen": test_seqlen,
               "losses": losses, "loss_first": losses[0], "loss_last": losses[-1], "steps": steps,
               "params": sum(p.numel() for p in recovered.parameters()), "out": str(out),
               "wall_s": round(time.perf_counter() - start, 2)}
    create_markdown_artifact(
        f"### LoRA recovery of `{src.name}`\n\n"
        f"- test perplexity ({after.tokens} tokens in {test_seqlen}-token windows): "
        f"**{before.ppl:.4f} -> {after.ppl:.4f}**\n"
        f"- training loss {losses[0]:.4f} -> {losses[-1]:.4f} over {steps} steps (r={rank}, lr={lr}, "
        f"{batch_size} x {seqlen} tokens per step, calibration split of `{data}`)\n- saved to `{out}`\n",
        key="selfprune-recover-" + "".join(c if c.isalnum() else "-" for c in Path(out).name.lower()),
    )
    return summary
