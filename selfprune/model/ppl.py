"""Token-level perplexity over non-overlapping windows, batched: the loop over token ids.

:func:`selfprune.perplexity` (in :mod:`selfprune.api`) is the user-level call on a model spec and
a corpus; this module is named ``ppl`` so that name stays free on the package.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Perplexity:
    """A perplexity always travels with the window length and token count it was measured on."""

    ppl: float
    nll: float  # summed negative log-likelihood (nats)
    tokens: int  # predicted tokens: windows * (seqlen - 1)
    seqlen: int
    windows: int

    def to_dict(self) -> dict:
        return asdict(self)


def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    on_batch: Callable[[int], None] | None = None,
) -> Perplexity:
    """exp(mean NLL) of every next token inside each window ([n, seqlen] ids).

    Each window is scored independently (no context carried across windows), the convention of
    Wanda/FLAP/LLM-Pruner. Log-probabilities are taken in float32 whatever the model dtype.
    """
    device = next(model.parameters()).device
    nll, tokens = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
            targets = batch[:, 1:].to(logits.device)  # the last layer's device, under --device map
            nll += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum").item()
            tokens += targets.numel()
            if on_batch:
                on_batch(len(batch))
    return Perplexity(math.exp(nll / tokens), nll, tokens, windows.shape[1], len(windows))
