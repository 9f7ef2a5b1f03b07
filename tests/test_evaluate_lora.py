"""LoRA recovery on a tiny pruned model: lowers the loss, keeps shapes, never touches the dense model."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import build_tiny, byte_tokenizer, random_windows

from selfprune.core.errors import UserError
from selfprune.data.corpora import token_windows
from selfprune.evaluate.lora import lora_recover, lora_targets
from selfprune.methods import slicing, wanda_sp
from selfprune.methods.structure import LayerKeep
from selfprune.model import stats
from selfprune.model.arch import arch_of

# peft itself calls the deprecated is_gradient_checkpointing of transformers 5
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def text(n_lines: int = 400) -> str:
    rng = random.Random(0)
    words = "to be or not that is the question whether tis nobler in mind suffer slings arrows".split()
    return "\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(n_lines))


def fixed_loss(model, tokenizer, body: str) -> float:
    batch = token_windows(tokenizer, body, 48, 4)
    with torch.no_grad():
        return model(input_ids=batch, labels=batch).loss.item()


def test_lora_lowers_loss_keeps_shapes_and_dense(tmp_path):
    model = build_tiny("llama_gqa")
    arch = arch_of(model.config)
    rankings = wanda_sp.rank(model, arch, stats.capture(model, random_windows(4, 32)))
    # layer 0: attention and MLP removed (no Linear there); layer 2 keeps everything (its
    # projections are the dense model's own tensors); layer 3: MLP removed
    structure = (LayerKeep(0, 0), LayerKeep(1, 48), LayerKeep(2, 96), LayerKeep(2, 0))
    pruned = slicing.materialize(model, arch, rankings, structure)
    assert pruned.model.layers[2].self_attn.q_proj.weight is model.model.layers[2].self_attn.q_proj.weight
    dense_before = {k: v.clone() for k, v in model.state_dict().items()}
    shapes = {k: tuple(v.shape) for k, v in pruned.state_dict().items()}
    tok = byte_tokenizer()
    body = text()
    before = fixed_loss(pruned, tok, body)

    merged, losses = lora_recover(pruned, tok, body, steps=12, lr=5e-3, seqlen=48, batch_size=4, seed=0)

    assert merged is pruned and len(losses) == 12 and all(loss > 0 for loss in losses)
    after = fixed_loss(merged, tok, body)
    assert after < before - 0.05, (before, after)
    assert {k: tuple(v.shape) for k, v in merged.state_dict().items()} == shapes
    assert type(merged.model.layers[0].self_attn).__name__ == "RemovedAttention"
    assert not any("lora" in n for n, _ in merged.named_modules()) and not hasattr(merged, "peft_config")
    assert not any(p.requires_grad for p in merged.parameters()) and not merged.training
    assert merged.config.selfprune_layers == [[0, 0], [1, 48], [2, 96], [2, 0]]
    for k, v in model.state_dict().items():  # the dense model is bit-for-bit unchanged
        assert torch.equal(v, dense_before[k]), k
    q_new = merged.model.layers[2].self_attn.q_proj.weight
    assert q_new is not model.model.layers[2].self_attn.q_proj.weight
    assert not torch.equal(q_new, model.model.layers[2].self_attn.q_proj.weight)
    # embeddings / norms are still shared, not copied
    assert merged.model.embed_tokens.weight is model.model.embed_tokens.weight


def test_lora_deterministic():
    tok = byte_tokenizer()
    runs = []
    for _ in range(2):
        model = build_tiny("qwen2")
        _, losses = lora_recover(model, tok, text(40), steps=2, lr=1e-3, seqlen=32, batch_size=2, seed=3)
        runs.append(losses)
    assert runs[0] == runs[1]


def test_lora_without_targets():
    model = build_tiny("llama_mha")
    arch = arch_of(model.config)
    rankings = wanda_sp.rank(model, arch, stats.capture(model, random_windows(2, 16)))
    empty = slicing.materialize(model, arch, rankings, (LayerKeep(0, 0),) * 4)
    assert lora_targets(empty, ("q_proj", "down_proj")) == []
    with pytest.raises(UserError, match="nothing to adapt"):
        lora_recover(empty, byte_tokenizer(), text(50), steps=1)
