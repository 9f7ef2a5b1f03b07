"""Zero-shot accuracy of an in-memory (pruned) model with lm-evaluation-harness.

The model object is wrapped as it is in lm-eval's ``HFLM`` (no re-save, no reload), so a
candidate built by :meth:`selfprune.engine.pruner.Pruner.model` (per-layer widths,
``RemovedAttention`` / ``RemovedMLP`` stand-ins) is scored exactly as it will be exported.
HFLM only reads ``model.config`` (model type, for the causal backend), ``model.device`` and
calls ``model(input_ids).logits``: all of which a pruned candidate provides.

Reporting convention (LLM-Pruner lineage tables): ``acc_norm`` for hellaswag and openbookqa,
``acc`` elsewhere; both are recorded for every task.
"""

from __future__ import annotations

import copy
import difflib
import os
import random
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import UserError

PAPER_TASKS = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
# Tasks whose reported number is acc_norm in LLM-Pruner-style tables (acc elsewhere).
NORM_TASKS = frozenset({"hellaswag", "openbookqa"})
CONVENTION = "acc_norm for hellaswag and openbookqa, acc elsewhere (LLM-Pruner tables)"

# Exception class names (anywhere in the cause chain) that mean "the dataset hub could not be used".
_HUB_FAILURES = frozenset({
    "LocalEntryNotFoundError", "OfflineModeIsEnabled", "HfHubHTTPError", "RepositoryNotFoundError",
    "GatedRepoError", "DatasetNotFoundError", "ConnectError", "ConnectTimeout", "ReadTimeout",
    "MaxRetryError", "NewConnectionError",
})


def _honouring_tqdm_disable(hflm: type) -> type:
    """lm-eval's model with its request bars off where ``TQDM_DISABLE`` says so (the CLI, Prefect
    flow processes): it passes tqdm's ``disable`` itself, which tqdm's own variable cannot override."""

    def quiet(disable_tqdm: bool) -> bool:
        return disable_tqdm or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true")

    class HonouringTqdmDisable(hflm):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=quiet(disable_tqdm))

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=quiet(disable_tqdm))

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=quiet(disable_tqdm))

    return HonouringTqdmDisable


def evaluate_zero_shot(
    model: torch.nn.Module,
    tokenizer,
    tasks: list[str],
    *,
    include_path: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    max_length: int = 2048,
    device: str | torch.device | None = None,
    bootstrap_iters: int = 100_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on the in-memory ``model`` and summarize accuracy.

    ``include_path``: a directory of local task YAMLs (e.g. from :func:`~selfprune.evaluate.cloze.
    build_cloze_task`). ``limit``: at most this many documents per task (quick checks; the numbers
    are then not comparable with published ones). ``max_length``: the context length HFLM truncates
    to (set it yourself: HFLM would otherwise read it from the config). ``device``: where the model
    must already be (``None``: wherever it is); the model is never moved, because a pruned candidate
    shares tensors with its dense model.

    Returns ``{"tasks": {name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "reported",
    "score", "samples"}}, "mean_acc", "mean_acc_plain", "convention", "lm_eval_version", "limit",
    "max_length", "batch_size", "num_fewshot"}`` where ``score`` is the task's number under the
    LLM-Pruner convention (``reported`` names the metric), ``mean_acc`` is the mean of the scores and
    ``mean_acc_plain`` the mean of plain ``acc``. Metrics a task lacks are ``None``.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    if isinstance(tasks, str) or not tasks:
        raise UserError("give a non-empty list of lm-eval task names, e.g. ['boolq', 'piqa'] "
                        f"(the paper's tasks: {', '.join(PAPER_TASKS)})")
    tasks = list(dict.fromkeys(tasks))
    check_device(model, device)
    manager = _task_manager(include_path, tasks)

    # HFLM may set a pad token on the tokenizer it is given: hand it a copy, so the caller's
    # tokenizer (and anything keyed on it, e.g. memoized token ids) stays exactly as it was.
    tok = copy.deepcopy(tokenizer)
    was_training = model.training
    lm = _honouring_tqdm_disable(HFLM)(pretrained=model, tokenizer=tok, backend="causal", batch_size=batch_size,
                                      max_length=max_length)
    # simple_evaluate reseeds Python's, NumPy's and torch's global generators: keep the caller's.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[d for d in [model_device(model)] if d.type == "cuda"]):
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=tasks,
                task_manager=manager,
                limit=limit,
                bootstrap_iters=bootstrap_iters,
                log_samples=False,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
    except Exception as e:  # noqa: BLE001 - only hub failures are translated; the rest re-raise
        if _is_hub_failure(e):
            raise UserError(
                f"lm-eval could not load the data of {', '.join(tasks)}: the dataset hub is unreachable "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Fix: run on a machine "
                f"with Hugging Face hub access (the datasets are cached after the first run), or evaluate "
                f"a local task YAML via include_path (e.g. selfprune's offline cloze task), or keep "
                f"--limit small where the hub is slow"
            ) from e
        raise
    finally:
        model.train(was_training)
        random.setstate(py_state)
        np.random.set_state(np_state)
    return summarize(out, tasks, limit=limit, max_length=max_length, batch_size=batch_size,
                     lm_eval_version=lm_eval.__version__)


def summarize(out: dict, tasks: list[str], *, limit, max_length, batch_size, lm_eval_version: str) -> dict:
    """The compact record of an lm-eval result dict (see :func:`evaluate_zero_shot`)."""
    results = out["results"]
    n_samples = out.get("n-samples", {})
    per_task: dict[str, dict] = {}
    for name, metrics in results.items():
        row = {"acc": None, "acc_stderr": None, "acc_norm": None, "acc_norm_stderr": None}
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if filt not in ("none", "") or metric not in row:
                continue
            row[metric] = _float(value)
        reported = "acc_norm" if name in NORM_TASKS and row["acc_norm"] is not None else "acc"
        row["reported"] = reported
        row["score"] = row[reported]
        samples = n_samples.get(name)
        row["samples"] = samples.get("effective") if isinstance(samples, dict) else None
        per_task[name] = row
    scores = [per_task[t]["score"] for t in tasks if t in per_task and per_task[t]["score"] is not None]
    plain = [per_task[t]["acc"] for t in tasks if t in per_task and per_task[t]["acc"] is not None]
    return {
        "tasks": per_task,
        "mean_acc": sum(scores) / len(scores) if scores else None,
        "mean_acc_plain": sum(plain) / len(plain) if plain else None,
        "convention": CONVENTION,
        "lm_eval_version": lm_eval_version,
        "limit": limit,
        "max_length": max_length,
        "batch_size": batch_size,
        "num_fewshot": 0,
    }


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):  # lm-eval writes "N/A" for a missing stderr
        return None


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def check_device(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    """The model's device; a UserError when ``device`` names another one.

    The model is never moved: a pruned candidate shares its embeddings, norms and LM head with the
    dense model, so moving one would leave the other split across devices. ``"cuda"`` matches any
    CUDA device index.
    """
    have = model_device(model)
    if device is None:
        return have
    want = torch.device(device)
    if want.type != have.type or (want.index is not None and have.index is not None and want.index != have.index):
        raise UserError(
            f"the model is on {have} but device={str(device)!r} was asked for; load the model on "
            f"{want} (load_model(..., device=...)) rather than moving a pruned candidate"
        )
    return have


def _is_hub_failure(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__name__ in _HUB_FAILURES:
            return True
        e = e.__cause__ or e.__context__
    return False


@lru_cache(maxsize=8)
def _manager(include: str | None, defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include, include_defaults=defaults)


def _task_manager(include_path: str | Path | None, tasks: list[str]):
    """A TaskManager that knows ``tasks``, or a UserError naming the unknown ones.

    Indexing lm-eval's ~15k builtin task configs takes seconds, so when every task is found in
    ``include_path`` alone the builtins are not indexed. Managers are memoized per process.
    """
    include = None
    if include_path is not None:
        path = Path(include_path).expanduser().resolve()
        if not path.exists():
            raise UserError(f"task include path {path} does not exist; build it first (e.g. build_cloze_task)")
        include = str(path)
        local = _manager(include, False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = _manager(include, True)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        hints = []
        for t in unknown:
            close = difflib.get_close_matches(t, manager.all_tasks, n=3)
            hints.append(f"{t!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise UserError(
            f"unknown lm-eval task {', '.join(hints)}. Use lm-eval task names (the paper's: "
            f"{', '.join(PAPER_TASKS)}), or a task defined in a YAML under the include path"
            + (f" {include}" if include else " (none given)")
        )
    return manager
