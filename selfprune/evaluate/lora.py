"""LoRA recovery of a pruned model (LLM-Pruner's post-training step), shape-preserving.

LoRA adapters (peft) are put on the pruned model's own sliced ``nn.Linear`` projections; the
``RemovedAttention`` / ``RemovedMLP`` stand-ins hold no Linear and get none. After training, each
adapter's update is merged OUT OF PLACE: the projection receives a new weight tensor ``W + BA``
(``W`` is never written), then the adapters are unloaded. This matters because a pruned candidate
shares tensors with its dense model (every projection of a layer that kept all its units, and the
embeddings, norms and LM head): peft's own ``merge_and_unload`` adds into ``W`` in place and would
change the dense model too. Here the dense model is never modified; the pruned model passed in is
changed in place (its adapted projections get new weights) and returned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..core.errors import UserError
from ..engine.data import token_windows
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
