"""LoRA recovery of a pruned model (LLM-Pruner's post-training step), shape-preserving.

LoRA adapters (peft) are put on the pruned model's own sliced ``nn.Linear`` projections; the
``RemovedAttention`` / ``RemovedMLP`` stand-ins hold no Linear and get none. After training, each
adapter's update is merged OUT OF PLACE: the projection receives a new weight tensor ``W + BA``
(``W`` is never written), then the adapters are unloaded. This matters because a pruned candidate
shares tensors with its dense model (every projection of a layer that kept all its units, and the
embeddings, norms and LM head): peft's own ``merge_and_unload`` adds into ``W`` in place and would
change the dense model too. Here the dense model is never modified; the pruned model passed in is
changed in place (its adapted projections get new weights) and returned.

:func:`recover` is the whole step on an export (``selfprune.recover``; the CLI's ``recover`` and
the ``selfprune-recover`` flow run it): load it, measure, train, measure again, save it elsewhere
with its record extended by ``recovery``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.errors import UserError
from ..data.corpora import data_fingerprint, load_split, split_windows, token_windows
from ..engine.models import load_model
from ..export.hf import RECORD, save_pruned
from ..model.ppl import Perplexity, perplexity
from ..storage.userfiles import read_json
from .zeroshot import check_device

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER = "default"


def lora_targets(model: nn.Module, target_modules: Sequence[str]) -> list[str]:
    """Full names of the decoder-layer ``nn.Linear`` modules whose last name is in ``target_modules``."""
    wanted = set(target_modules)
    return [name for name, mod in model.model.layers.named_modules(prefix="model.layers")
            if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in wanted]


def lora_recover(
    model: nn.Module,
    tokenizer,
    text: str,
    *,
    steps: int = 50,
    lr: float = 1e-4,
    r: int = 8,
    alpha: int = 16,
    seqlen: int = 256,
    batch_size: int = 2,
    seed: int = 0,
    target_modules: Sequence[str] = DEFAULT_TARGETS,
    device: str | torch.device | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[nn.Module, list[float]]:
    """Train LoRA adapters on ``text`` (causal LM loss) and merge them into ``model``.

    ``text`` is cut into non-overlapping windows of ``seqlen`` tokens (no special tokens); each of
    ``steps`` AdamW steps takes ``batch_size`` windows, cycling through a seeded permutation. Returns
    ``(model, losses)``: the same module object with merged weights (eval mode, no grads) and the
    training loss of every step. ``on_step(step, loss)`` is called after each step.
    """
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    if min(steps, r, seqlen, batch_size) < 1 or lr <= 0:
        raise UserError("LoRA needs steps, r, seqlen, batch_size >= 1 and lr > 0")
    dev = check_device(model, device)
    targets = lora_targets(model, target_modules)
    if not targets:
        raise UserError(f"no Linear modules named {', '.join(target_modules)} are left in the pruned model; "
                        "nothing to adapt (every targeted sub-layer was removed)")
    windows = token_windows(tokenizer, text, seqlen, label="the LoRA training text")
    present = sorted({t.rsplit(".", 1)[-1] for t in targets})
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=present)

    devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    losses: list[float] = []
    try:
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
        peft_model.train()
        for step in range(steps):
            idx = torch.tensor([order[(step * batch_size + j) % len(order)] for j in range(batch_size)])
            batch = windows[idx].to(dev)
            loss = peft_model(input_ids=batch, labels=batch, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if on_step:
                on_step(step, losses[-1])
        merged: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, module in peft_model.base_model.model.named_modules():
                if isinstance(module, LoraLayer) and ADAPTER in getattr(module, "lora_A", {}):
                    base = module.get_base_layer()
                    delta = module.get_delta_weight(ADAPTER)
                    merged[name] = (base.weight.float() + delta.float()).to(base.weight.dtype)
    finally:
        restored = peft_model.unload()  # adapters out, the original Linear modules back in place
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in restored.__dict__:
            delattr(restored, attr)
    for name, weight in merged.items():
        restored.get_submodule(name).weight = nn.Parameter(weight, requires_grad=False)
    restored.eval().requires_grad_(False)
    return restored, losses


@dataclass(frozen=True)
class Recovery:
    """A recovered export: where it came from and went, its test perplexity before and after, and
    the training loss of every step."""

    source: Path
    out: Path
    before: Perplexity
    after: Perplexity
    losses: tuple[float, ...]
    params: int
    wall_s: float

    def to_dict(self) -> dict:
        """The summary the ``selfprune-recover`` flow returns (deployments' callers read these keys)."""
        return {"ppl_before": self.before.ppl, "ppl_after": self.after.ppl, "tokens": self.after.tokens,
                "test_seqlen": self.after.seqlen, "losses": list(self.losses), "loss_first": self.losses[0],
                "loss_last": self.losses[-1], "steps": len(self.losses), "params": self.params, "out": str(self.out),
                "wall_s": self.wall_s}


def check_recovery(model: str | Path, out: str | Path, test_windows: int) -> Path:
    """The export ``model`` names, or a UserError before anything loads (the CLI calls it before
    Prefect starts): it must be an export, ``out`` another directory, ``test_windows`` not negative."""
    src = Path(model).expanduser()
    if not (src / RECORD).is_file():
        raise UserError(f"{model} is not a selfprune export (no {RECORD}); make one with selfprune prune --out DIR")
    if Path(out).expanduser().resolve() == src.resolve():
        raise UserError("--out must differ from the export being recovered; it is kept as it is")
    if test_windows < 0:
        raise UserError("--test-windows must be >= 0 (0: every window of the test split)")
    return src


def recover(
    model: str | Path,
    out: str | Path,
    data: str = "demo",
    *,
    steps: int = 100,
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
) -> Recovery:
    """Fine-tune the export ``model`` with LoRA (:func:`lora_recover`) on ``data``'s calibration
    split for ``steps`` steps of ``batch_size`` windows of ``seqlen`` tokens, and save it to ``out``
    (pruned shapes kept; its record gains ``recovery``, its method ``+lora``). Test perplexity on
    ``test_windows`` (0: all) windows of ``test_seqlen`` tokens, before and after: the measure of
    what the training recovered, on text it never saw."""
    start = time.perf_counter()
    src = check_recovery(model, out, test_windows)
    record = read_json(src / RECORD, "export record", "a selfprune export")
    lm = load_model(str(src), device, dtype)
    shapes = _shapes(lm.model)
    test = split_windows(lm.tokenizer, data, "test", test_seqlen, test_windows or None)
    before = perplexity(lm.model, test, batch_size)
    recovered, losses = lora_recover(lm.model, lm.tokenizer, load_split(data, "calibration"), steps=steps, lr=lr, r=rank,
                                     alpha=alpha, seqlen=seqlen, batch_size=batch_size, seed=seed)
    if _shapes(recovered) != shapes:
        raise RuntimeError("LoRA recovery changed the pruned model's shapes")
    after = perplexity(recovered, test, batch_size)
    recovery = {
        "method": "lora", "steps": steps, "lr": lr, "r": rank, "alpha": alpha, "seqlen": seqlen,
        "batch_size": batch_size, "seed": seed, "data": data,
        "data_fingerprint": data_fingerprint(data, "calibration"), "source": str(src),
        "source_fingerprint": lm.fingerprint, "loss_first": losses[0], "loss_last": losses[-1],
        "test_before": before.to_dict(), "test_after": after.to_dict(),
    }
    save_pruned(recovered, lm.tokenizer, Path(out), record | {"method": f"{record.get('method', 'wanda-sp')}+lora",
                                                              "recovery": recovery})
    return Recovery(src, Path(out), before, after, tuple(losses), sum(p.numel() for p in recovered.parameters()),
                    round(time.perf_counter() - start, 2))


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}
