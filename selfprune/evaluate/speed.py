"""Size, memory and speed of a (pruned) model: the numbers a pruning table reports beside accuracy.

:func:`measure` times the model object in this process with transformers (dense and pruned with
identical settings); :func:`vllm_measure` serves a directory (a selfprune export too) with vLLM, in vLLM's own environment.

Definitions (every number travels with the settings that produced it):

* ``params``: distinct parameters (tied embeddings counted once); ``weight_bytes``: their bytes.
* ``kv_cache_bytes_per_token``: bytes one token adds to the KV cache, from the kept K/V widths
  (a removed attention layer adds none).
* ``prefill_tokens_per_s``: ``batch_size * prompt_tokens`` over the median time of one forward
  over the prompt (no cache, logits of the last position only, as a server's prefill).
* ``generate_tokens_per_s``: ``batch_size * new_tokens`` over the median time of
  ``model.generate(min_new_tokens = max_new_tokens = new_tokens, do_sample=False)`` (prefill
  included); ``decode_tokens_per_s``: ``batch_size * (new_tokens - 1)`` over that time minus the
  prefill time, i.e. the per-token decode rate alone (``None`` when that difference is not positive,
  which only timing noise on very small models produces).
* ``peak_memory_bytes``: CUDA: ``torch.cuda.max_memory_allocated`` over the timed runs (weights,
  activations and KV cache; the caching allocator's reserve not included). CPU: the process's peak
  resident set size (VmHWM) over the timed runs, after resetting the kernel's high-water mark by
  writing ``5`` to ``/proc/self/clear_refs``; where that is not permitted a 1 ms sampler thread
  reads the current RSS instead (method ``"rss-sampler"``, which can miss spikes shorter than a
  sample). Before the baseline is read, glibc's ``malloc_trim(0)`` returns freed heap pages to the
  OS, so the warm-up's freed buffers do not hide the runs' growth. No tracemalloc: it does not see
  tensor memory. ``peak_memory_delta_bytes`` is the peak minus the allocation/RSS just before the
  runs (what inference adds on top of the resident weights). CPU RSS includes the Python runtime
  and libraries, so compare CPU peaks only between runs of the same process setup.
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..core.errors import UserError
from ..core.procstatus import status_bytes
from ..export.llamacpp import gguf_params, llamacpp_time
from ..storage.userfiles import read_json
from .zeroshot import check_device


def weight_stats(model: torch.nn.Module) -> tuple[int, int]:
    """(distinct parameters, their bytes); parameters sharing storage are counted once."""
    seen: set[tuple[int, int]] = set()
    params = nbytes = 0
    for p in model.parameters():
        key = (p.untyped_storage().data_ptr(), p.storage_offset()) if p.device.type != "meta" else (id(p), 0)
        if key in seen:
            continue
        seen.add(key)
        params += p.numel()
        nbytes += p.numel() * p.element_size()
    return params, nbytes


def kv_cache_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes one token adds to a full KV cache: sum over attention layers of K and V widths."""
    total = 0
    for layer in model.model.layers:
        attn = layer.self_attn
        k = getattr(attn, "k_proj", None)
        v = getattr(attn, "v_proj", None)
        if k is None or v is None:  # a removed attention layer caches nothing real
            continue
        total += (k.out_features + v.out_features) * k.weight.element_size()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc), so the baseline RSS is live memory only and
    the runs' activations and KV cache show up as growth instead of reusing resident free pages."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextmanager
def _peak_memory(device: torch.device) -> Iterator[dict]:
    """Yields a dict filled on exit with peak, baseline and the method used."""
    out: dict[str, Any] = {}
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield out
        _sync(device)
        out.update(peak=torch.cuda.max_memory_allocated(device), baseline=base, method="cuda-max-allocated")
        return
    _trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:  # 5: reset the peak RSS (Linux >= 4.0)
            f.write("5")
        base = _rss_bytes()
        yield out
        out.update(peak=max(status_bytes("VmHWM"), base), baseline=base, method="vmhwm-reset")
        return
    except OSError:
        pass
    try:
        base = _rss_bytes()
    except OSError:  # not Linux: only the lifetime peak is available
        import resource

        yield out
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if os.uname().sysname == "Darwin" else 1024)
        out.update(peak=peak, baseline=None, method="ru_maxrss-lifetime")
        return
    stop = threading.Event()
    peak = [base]

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
    out.update(peak=max(peak[0], _rss_bytes()), baseline=base, method="rss-sampler")


def prompt_ids(vocab_size: int, batch_size: int, prompt_tokens: int, seed: int = 0) -> torch.Tensor:
    """Fixed pseudo-random prompt ids (the content does not matter for speed; the length does)."""
    g = torch.Generator().manual_seed(seed)
    low = min(256, max(vocab_size // 4, 0))  # skip the low ids, where special tokens usually sit
    return torch.randint(low, vocab_size, (batch_size, prompt_tokens), generator=g)


def throughput(t_pre: float, t_gen: float, prompt_tokens: int, new_tokens: int, batch_size: int,
                repeats: int) -> dict[str, Any]:
    """Tokens/s from median prefill and generate times; decode is generate minus prefill."""
    decode_s = t_gen - t_pre
    return {
        "prefill_s": t_pre,
        "prefill_tokens_per_s": batch_size * prompt_tokens / t_pre,
        "generate_s": t_gen,
        "generate_tokens_per_s": batch_size * new_tokens / t_gen,
        "decode_tokens_per_s": batch_size * (new_tokens - 1) / decode_s if new_tokens > 1 and decode_s > 0 else None,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "batch_size": batch_size,
        "repeats": repeats,
    }


def measure(
    model: torch.nn.Module,
    tokenizer=None,
    *,
    prompt_tokens: int = 128,
    new_tokens: int = 64,
    batch_size: int = 1,
    repeats: int = 3,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Parameters, weight bytes, KV-cache bytes per token, peak memory, prefill and decode speed.

    ``device``: where the model must already be (``None``: wherever it is; the model is not moved).
    One untimed warm-up precedes the timed runs; times are medians over ``repeats``. The tokenizer
    is only used for the pad / EOS ids handed to ``generate``. See the module docstring for the
    exact definitions.
    """
    from transformers import GenerationConfig

    if min(prompt_tokens, new_tokens, batch_size, repeats) < 1:
        raise UserError("prompt_tokens, new_tokens, batch_size and repeats must all be at least 1")
    dev = check_device(model, device)
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = prompt_ids(vocab, batch_size, prompt_tokens).to(dev)
    mask = torch.ones_like(ids)
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    eos = eos if eos is not None else getattr(model.config, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    gen = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           num_beams=1, use_cache=True, eos_token_id=eos, pad_token_id=pad)

    def prefill() -> None:
        try:
            model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
        except TypeError:  # a model without logits_to_keep
            model(input_ids=ids, attention_mask=mask, use_cache=False)

    def generate() -> torch.Tensor:
        return model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            prefill()  # warm-up: kernels, allocator, lazy initialisation
            out = generate()
            if out.shape[1] != prompt_tokens + new_tokens:
                raise RuntimeError(f"generate returned {out.shape[1] - prompt_tokens} new tokens, not {new_tokens}")
            prefill_s, generate_s = [], []
            with _peak_memory(dev) as mem:
                for _ in range(repeats):
                    _sync(dev)
                    t0 = time.perf_counter()
                    prefill()
                    _sync(dev)
                    t1 = time.perf_counter()
                    generate()
                    _sync(dev)
                    t2 = time.perf_counter()
                    prefill_s.append(t1 - t0)
                    generate_s.append(t2 - t1)
    finally:
        model.train(was_training)
    params, nbytes = weight_stats(model)
    t_pre, t_gen = statistics.median(prefill_s), statistics.median(generate_s)
    return {
        "backend": "transformers",
        "device": str(dev),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "params": params,
        "weight_bytes": nbytes,
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(model),
        "peak_memory_bytes": mem["peak"],
        "peak_memory_delta_bytes": None if mem["baseline"] is None else mem["peak"] - mem["baseline"],
        "peak_memory_method": mem["method"],
        **throughput(t_pre, t_gen, prompt_tokens, new_tokens, batch_size, repeats),
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads() if dev.type == "cpu" else None,
    }


def format_measurement(m: dict[str, Any]) -> str:
    """One readable line per field group, for logs and the CLI."""
    mib = 1 / 2**20
    delta = m["peak_memory_delta_bytes"]
    decode = m["decode_tokens_per_s"]
    return "\n".join([
        f"{m['backend']} on {m['device']} ({m['dtype']}): {m['params']:,} params, "
        f"{m['weight_bytes'] * mib:.1f} MiB weights, KV cache {m['kv_cache_bytes_per_token']:,} B/token",
        f"peak memory {m['peak_memory_bytes'] * mib:.1f} MiB"
        + (f" (+{delta * mib:.1f} MiB over baseline)" if delta is not None else "") + f" [{m['peak_memory_method']}]",
        f"prefill {m['prefill_tokens_per_s']:.1f} tok/s; generate {m['generate_tokens_per_s']:.1f} tok/s; "
        + (f"decode {decode:.1f} tok/s" if decode is not None else "decode n/a (generate not slower than prefill)"),
        f"(batch {m['batch_size']}, prompt {m['prompt_tokens']}, new {m['new_tokens']}, median of {m['repeats']})",
    ])


_TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # safetensors' names


def _weights_on_disk(model_dir: Path) -> tuple[int, int]:
    """Parameters and bytes of a directory's safetensors, from their headers (nothing is loaded)."""
    from safetensors import safe_open

    params = nbytes = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                t = st.get_slice(name)
                n = math.prod(t.get_shape())
                params += n
                nbytes += n * torch.finfo(getattr(torch, _TORCH_DTYPES[t.get_dtype()])).bits // 8
    return params, nbytes


def _kv_bytes_per_token(config: dict, element_bytes: int) -> int:
    """K and V bytes one token adds: the kept KV heads of every layer (a selfprune export's own)."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or config["num_attention_heads"]
    groups = [g for g, _ in config.get("selfprune_layers") or [[kv, 0]] * config["num_hidden_layers"]]
    return sum(2 * g * head_dim * element_bytes for g in groups)


def vllm_measure(
    model_dir: str | Path,
    python: str,
    *,
    prompt_tokens: int = 128,
    new_tokens: int = 64,
    batch_size: int = 1,
    repeats: int = 3,
    dtype: str = "auto",
    gpu_memory_utilization: float = 0.5,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Serve a model directory with vLLM (``python``: see :mod:`.vllm_bridge`) and time it, with the
    definitions of :func:`measure`; ``time_to_first_token_s`` is the prefill time.
    ``trust_remote_code``: let vLLM run the directory's own Python (:func:`.vllm_bridge.remote_code_allowed`).

    A selfprune export is served as it is, through the selfprune-vllm plugin. Peak memory is the
    vLLM process tree's resident set (sampled) on the CPU, the device memory in use on CUDA (which
    vLLM pre-allocates by ``gpu_memory_utilization``, so it says little about the model).
    """
    from .vllm_bridge import run

    if min(prompt_tokens, new_tokens, batch_size, repeats) < 1:
        raise UserError("prompt_tokens, new_tokens, batch_size and repeats must all be at least 1")
    model_dir = Path(model_dir).expanduser().resolve()
    config = read_json(model_dir / "config.json", "model config", "a model directory or a selfprune export")
    prompts = prompt_ids(config["vocab_size"], batch_size, prompt_tokens).tolist()
    got = run(python, "timing", model_dir, dtype=dtype, prompts=prompts, new_tokens=new_tokens, repeats=repeats,
              max_model_len=prompt_tokens + new_tokens + 16, gpu_memory_utilization=gpu_memory_utilization,
              trust_remote_code=trust_remote_code)
    params, nbytes = _weights_on_disk(model_dir)
    t_pre, t_gen = statistics.median(got["prefill_s"]), statistics.median(got["generate_s"])
    return {
        "backend": "vllm",
        "vllm_version": got["vllm_version"],
        "device": got["device"],
        "dtype": got["dtype"],
        "params": params,
        "weight_bytes": nbytes,
        "kv_cache_bytes_per_token": _kv_bytes_per_token(config, torch.finfo(getattr(torch, got["dtype"])).bits // 8),
        "peak_memory_bytes": got["peak_memory_bytes"],
        "peak_memory_delta_bytes": got["peak_memory_bytes"] - got["peak_memory_baseline_bytes"],
        "peak_memory_method": got["peak_memory_method"],
        "time_to_first_token_s": t_pre,
        "startup_s": got["startup_s"],
        **throughput(t_pre, t_gen, prompt_tokens, new_tokens, batch_size, repeats),
        "gpu_memory_utilization": gpu_memory_utilization if got["device"] == "cuda" else None,
    }


def llamacpp_measure(path: str | Path, quant: str, *, prompt_tokens: int = 128, new_tokens: int = 64, repeats: int = 3,
                     threads: int | None = None) -> dict[str, Any]:
    """Prefill and decode tokens/s, file size and peak memory of the GGUF at ``path`` in llama.cpp."""
    if min(prompt_tokens, new_tokens, repeats) < 1:
        raise UserError("prompt_tokens, new_tokens and repeats must all be at least 1")
    path = Path(path).expanduser().resolve()
    params, read, vocab = gguf_params(path)
    threads = threads or os.cpu_count() or 1
    got = llamacpp_time(path, prompt_ids(vocab, 1, prompt_tokens)[0].tolist(), new_tokens, repeats, threads)
    return {
        "backend": "llama.cpp",
        "llama_cpp_version": got["llama_cpp_version"],
        "device": "cpu",
        "dtype": quant,
        "params": params,
        "params_read_per_token": read,
        "file_bytes": path.stat().st_size,
        "peak_memory_bytes": got["peak_memory_bytes"],
        "threads": threads,
        **throughput(got["prefill_s"], got["generate_s"], prompt_tokens, new_tokens, 1, repeats),
    }
