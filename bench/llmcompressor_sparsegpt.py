"""llm-compressor's one-shot SparseGPT on given tokens; run by bench_reconstruct.py in llm-compressor's
own environment (it pins other transformers versions), never imported by selfprune.

Usage: PYTHON_OF_LLMCOMPRESSOR bench/llmcompressor_sparsegpt.py MODEL_DIR TOKENS.safetensors SPARSITY MASK_STRUCTURE
Reads ``calibration`` and ``test`` ([n, seqlen] token ids) from TOKENS, prunes MODEL_DIR with
``SparseGPTModifier`` (every decoder layer, lm_head ignored), and prints one JSON line with the
test perplexity (each window scored alone, float32 log-probabilities) and the seconds it took.
"""

from __future__ import annotations

import json
import math
import sys
import time

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning import SparseGPTModifier
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def test_ppl(model, windows: torch.Tensor) -> float:
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(windows), 4):
            ids = windows[start:start + 4]
            logits = model(input_ids=ids).logits[:, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                     reduction="sum").item()
            count += ids[:, 1:].numel()
    return math.exp(nll / count)


def main() -> None:
    model_dir, tokens, sparsity, structure = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    windows = load_file(tokens)
    calib = windows["calibration"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    recipe = SparseGPTModifier(sparsity=sparsity, mask_structure=structure, targets=[r"re:model.layers.\d+$"],
                               ignore=["re:.*lm_head"])
    start = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=len(calib),
            max_seq_length=calib.shape[1], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - start
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    zeros = sum(int((m.weight == 0).sum()) for m in linears) / sum(m.weight.numel() for m in linears)
    print(json.dumps({"ppl": test_ppl(model.eval(), windows["test"]), "seconds": seconds, "realized": zeros}))


if __name__ == "__main__":
    main()
