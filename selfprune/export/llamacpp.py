"""Running a GGUF in llama.cpp (llama-cpp-python) on this CPU: its speed, and its log-probabilities.

Every model runs in a fresh Python process (``python -m selfprune.export.llamacpp``, a JSON job
on stdin): its peak resident memory is its own, no model's pages or threads linger into the next,
and a crash inside llama.cpp ends that process with a one-line error, never the caller.

llama.cpp is run without its extra CPU buffer types (AMX tiles, weight repacking): on virtual
machines with AMX-capable CPUs they crash the first decode of every quantized model (seen here with
llama-cpp-python 0.3.36, the SmolLM2 Q4_1 GGUF from PyPI included). Every model compared runs
the same way, so the ratios hold; absolute quantized speeds may be higher where they work.

Timing (:func:`selfprune.evaluate.speed.llamacpp_measure`) follows
:func:`selfprune.evaluate.speed.measure`: prefill is one evaluation of the prompt, generate the
prompt and ``new_tokens`` greedy tokens, decode the generate time minus prefill; medians over
``repeats`` after one untimed warm-up.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import UserError
from ..core.procstatus import status_bytes


@contextmanager
def without_extra_buffer_types() -> Iterator[None]:
    """Every ``llama_cpp.Llama`` made inside loads without llama.cpp's extra CPU buffer types (the
    module docstring says why): the class takes no such option, so its default parameters are
    wrapped while inside."""
    import llama_cpp.llama as llama_module

    defaults = llama_module.llama_cpp.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = False
        return p

    llama_module.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        llama_module.llama_cpp.llama_model_default_params = defaults


def _load(path: str, n_ctx: int, threads: int, **kwargs):
    import llama_cpp

    with without_extra_buffer_types():
        return llama_cpp.Llama(path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False, seed=0,
                               **kwargs)


def _greedy(llm, tokens: list[int], new_tokens: int) -> list[int]:
    llm.reset()
    llm.eval(tokens)
    out = []
    for _ in range(new_tokens):
        out.append(int(llm.sample(temp=0.0, top_k=1)))
        llm.eval(out[-1:])
    return out


def _score(job: dict) -> dict:
    """In the child: the log-probability of each prompt token after its prefix, and greedy tokens,
    with an f32 KV cache (what is compared is the file, not llama.cpp's cache precision)."""
    tokens = job["tokens"]
    f32 = 0  # GGML_TYPE_F32: llama.cpp's default f16 KV cache alone moves the demo's log-probs by up to 0.09
    llm = _load(job["path"], len(tokens) + job["new_tokens"] + 8, job["threads"], logits_all=True, type_k=f32, type_v=f32)
    llm.eval(tokens)
    logits = np.asarray(llm.scores[: len(tokens) - 1], dtype=np.float64)
    top = logits.max(axis=1, keepdims=True)
    logsumexp = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    logprobs = (logits[np.arange(len(tokens) - 1), tokens[1:]] - logsumexp).tolist()
    return {"logprobs": logprobs, "greedy": _greedy(llm, tokens, job["new_tokens"])}


def _time(job: dict) -> dict:
    """In the child: load, warm up, time prefill and generation; the process's peak memory."""
    import llama_cpp

    prompt, new_tokens = job["prompt"], job["new_tokens"]
    llm = _load(job["path"], len(prompt) + new_tokens + 8, job["threads"], n_batch=len(prompt))

    def prefill() -> None:
        llm.reset()
        llm.eval(prompt)

    prefill()
    _greedy(llm, prompt, new_tokens)
    prefill_s, generate_s = [], []
    for _ in range(job["repeats"]):
        t0 = time.perf_counter()
        prefill()
        t1 = time.perf_counter()
        _greedy(llm, prompt, new_tokens)
        t2 = time.perf_counter()
        prefill_s.append(t1 - t0)
        generate_s.append(t2 - t1)
    return {"prefill_s": statistics.median(prefill_s), "generate_s": statistics.median(generate_s),
            "peak_memory_bytes": status_bytes("VmHWM"),  # since exec: not the parent's, as ru_maxrss would be
            "llama_cpp_version": llama_cpp.__version__}


def _quantize(job: dict) -> dict:
    """In the child: llama.cpp's quantizer, ``src`` (f32 GGUF) to ``out`` at ``quant``."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[job["quant"]]
    params.nthread = job["threads"]
    if llama_cpp.llama_model_quantize(job["src"].encode(), job["out"].encode(), params) != 0:
        raise RuntimeError(f"llama.cpp's quantizer failed on {job['src']}")
    return {}


def _child(job: dict) -> dict:
    """``job`` run by a fresh process; a failure (a crash included) is one UserError line."""
    proc = subprocess.run([sys.executable, "-m", __name__], input=json.dumps(job), capture_output=True, text=True)
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or [f"killed by signal {-proc.returncode}"])[-1]
        raise UserError(f"llama.cpp could not {job['kind']} {job.get('path') or job['src']}: {why}")
    return json.loads(proc.stdout.strip().splitlines()[-1]) | {"log": proc.stderr}


def gguf_params(path: Path) -> tuple[int, int, int]:
    """Parameters of a GGUF, those read per generated token (all but the embedding table, of which
    one row is read, unless the LM head shares it and reads it whole), and its vocabulary size."""
    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    total = sum(int(t.n_elements) for t in tensors.values())
    hidden, vocab = (int(n) for n in tensors["token_embd.weight"].shape)
    read = total - hidden * vocab + hidden if "output.weight" in tensors else total
    return total, read, vocab


def llamacpp_quantize(src: Path, out: Path, quant: str) -> str:
    """``src`` (an f32 GGUF) quantized by llama.cpp to ``quant`` (``q8_0``, ``q4_k_m``) at ``out``; its
    line on tensors whose width the quantization cannot take (those fall back to another type), or ''."""
    got = _child({"kind": "quantize", "src": str(src), "out": str(out), "quant": quant, "threads": os.cpu_count() or 1})
    return next((line.split(": ", 1)[-1].strip() for line in got["log"].splitlines() if "fallback quantization" in line), "")


def llamacpp_score(path: str | Path, tokens: list[int], new_tokens: int = 8, threads: int = 1) -> dict:
    """``{"logprobs": [log p(token i+1 | tokens up to i)], "greedy": [new_tokens greedy ids]}`` in llama.cpp."""
    return _child({"kind": "score", "path": str(Path(path).resolve()), "tokens": list(tokens), "new_tokens": new_tokens,
                   "threads": threads})


def llamacpp_time(path: Path, prompt: list[int], new_tokens: int, repeats: int, threads: int) -> dict[str, Any]:
    """Median prefill and generate seconds of the GGUF at ``path`` (after one untimed warm-up), the
    process's peak memory and llama.cpp's version, measured by a fresh process."""
    return _child({"kind": "time", "path": str(path), "prompt": prompt, "new_tokens": new_tokens, "repeats": repeats,
                   "threads": threads})


if __name__ == "__main__":
    job = json.loads(sys.stdin.read())
    print(json.dumps({"score": _score, "time": _time, "quantize": _quantize}[job["kind"]](job)))
