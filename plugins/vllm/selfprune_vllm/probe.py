"""Run one model under vLLM and write what selfprune asks for as JSON: ``python -m selfprune_vllm.probe REQUEST.json``.

selfprune's own environment cannot import vLLM (it pins other torch / transformers versions), so
selfprune writes a request file, runs this module with the vLLM environment's Python, and reads
the answer file back. Two jobs, both greedy:

* ``tokens``: for each prompt (token ids), the generated token ids (EOS does not stop them) and the log-probability vLLM
  gives each prompt token (``prompt_logprobs``), to compare with transformers on the same export.
* ``timing``: one warm-up, then ``repeats`` timed runs of a 1-token generation (prefill: the time
  to first token) and of a ``new_tokens`` generation, plus the peak resident memory of this process
  and its children (vLLM's engine runs in a child) sampled every 5 ms, or on CUDA the device
  memory in use, which vLLM pre-allocates by ``gpu_memory_utilization``.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path


def _rss_tree() -> int:
    import psutil

    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


class PeakMemory:
    """Samples memory in a thread while the timed runs go: process-tree RSS on CPU, device use on CUDA."""

    def __init__(self, device: str):
        self.peak, self.baseline, self._stop = 0, 0, threading.Event()
        self._read = self._cuda_used if device == "cuda" else _rss_tree
        self.method = "cuda-device-used" if device == "cuda" else "rss-tree-sampler"

    @staticmethod
    def _cuda_used() -> int:
        import torch

        free, total = torch.cuda.mem_get_info()
        return total - free

    def __enter__(self) -> PeakMemory:
        self.baseline = self.peak = self._read()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._read())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._read())


def _llm(request: dict):
    import vllm

    return vllm.LLM(model=request["model"], dtype=request.get("dtype", "auto"), seed=0,
                    trust_remote_code=request["trust_remote_code"],
                    max_model_len=request["max_model_len"], enforce_eager=request.get("enforce_eager", False),
                    gpu_memory_utilization=request.get("gpu_memory_utilization", 0.5))


def tokens(llm, request: dict) -> dict:
    import vllm

    params = vllm.SamplingParams(max_tokens=request["max_tokens"], temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in request["prompts"]], params, use_tqdm=False)
    result = []
    for ids, out in zip(request["prompts"], outs):
        # entry t (t >= 1) maps prompt token t to its log-probability given tokens < t; entry 0 is None
        logprobs = [entry[tok].logprob for tok, entry in zip(ids[1:], out.prompt_logprobs[1:])]
        result.append({"generated": list(out.outputs[0].token_ids), "prompt_logprobs": logprobs})
    return {"outputs": result}


def timing(llm, request: dict) -> dict:
    import vllm
    from vllm.platforms import current_platform

    prompts = [{"prompt_token_ids": ids} for ids in request["prompts"]]
    n = request["new_tokens"]
    one = vllm.SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    full = vllm.SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0, ignore_eos=True)

    def timed(params) -> float:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        got = {len(o.outputs[0].token_ids) for o in outs}
        if got != {params.max_tokens}:
            raise RuntimeError(f"vLLM returned {got} new tokens, not {params.max_tokens}")
        return dt

    timed(full)  # warm-up: compilation, graphs, allocator
    device = current_platform.device_type
    with PeakMemory(device) as mem:
        prefill_s = [timed(one) for _ in range(request["repeats"])]
        generate_s = [timed(full) for _ in range(request["repeats"])]
    return {"prefill_s": prefill_s, "generate_s": generate_s, "device": device,
            "peak_memory_bytes": mem.peak, "peak_memory_baseline_bytes": mem.baseline,
            "peak_memory_method": mem.method}


JOBS = {"tokens": tokens, "timing": timing}


def main(argv: list[str]) -> int:
    import vllm

    request_path = Path(argv[1])
    request = json.loads(request_path.read_text())
    t0 = time.perf_counter()
    llm = _llm(request)
    started = time.perf_counter() - t0
    answer = JOBS[request["job"]](llm, request)
    answer.update(vllm_version=vllm.__version__, startup_s=started,
                  dtype=str(llm.llm_engine.model_config.dtype).removeprefix("torch."))
    Path(request["answer"]).write_text(json.dumps(answer))
    return 0


if __name__ == "__main__":  # vLLM spawns worker processes: the entry must be guarded
    sys.exit(main(sys.argv))
