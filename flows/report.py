"""The comparison report as a Prefect flow: dense, uniform Wanda-sp, OWL and searched allocations.

For one model and a list of ratios (plus the ratio of every search's ``best.json``), each model is
scored for test-split perplexity and zero-shot accuracy through cached tasks (``tasks/``), so a
report run again, or a report over more models or ratios, computes only what it lacks; the
search's own final test scores are hits here when the settings match. Writes ``out/report.md``,
``out/report.html`` (self-contained), ``out/report.json`` and the plots, and publishes a table and
a Markdown artifact.
"""

from __future__ import annotations

import selfprune.flows  # noqa: F401  (first: selfprune's Prefect settings and quiet logs; flows/__init__.py)

import json
import time
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from selfprune.allocation import check_ratio, kept_params, realized_ratio, structure_from_json
from selfprune.arch import Arch
from selfprune.artifacts import comparison
from selfprune.errors import UserError
from selfprune.fileio import atomic_write_text
from selfprune.userfiles import read_json
from selfprune.evaluate.cloze import CLOZE_TASK, LASTWORD_TASK, build_cloze_task, build_lastword_task
from selfprune.hashing import content_hash
from selfprune.models import model_fingerprint
from selfprune.tasks.evaluation import allocation_rates, dense_structure, evaluate_ppl, evaluate_zero_shot
from selfprune.tasks.pruning import capture_statistics

LOCAL_TASKS = (CLOZE_TASK, LASTWORD_TASK)
DEFAULT_TASKS = [CLOZE_TASK]


def _read_search(path: str) -> dict:
    p = Path(path)
    best = read_json(p, "search result", "a search run's best.json (selfprune search --out DIR)")
    if not isinstance(best, dict) or not {"rates", "config", "model_fingerprint", "stats_key"} <= set(best):
        raise UserError(f"{p} is not a search's best.json (it needs rates, config, model_fingerprint, stats_key)")
    return best


def _local_tasks(data: str, tasks: list[str], n_items: int, seed: int = 0) -> str:
    """Build the requested offline tasks of ``data`` into a directory named by their content."""
    from selfprune.data import data_fingerprint
    from selfprune.paths import subdir

    wanted = [t for t in tasks if t in LOCAL_TASKS]
    key = content_hash("local-tasks", data_fingerprint(data, "test"), sorted(wanted), n_items, seed)
    out = subdir("tasks") / key
    if CLOZE_TASK in wanted:
        build_cloze_task(data, out, n_items=n_items, seed=seed)
    if LASTWORD_TASK in wanted:
        build_lastword_task(data, out, n_items=n_items, seed=seed)
    return str(out)


@flow(name="selfprune-report", validate_parameters=True)
def report(
    model: str = "demo",
    data: str = "demo",
    ratios: list[float] | None = None,
    searches: list[str] | None = None,
    tasks: list[str] | None = None,
    include_path: str | None = None,
    limit: int | None = None,
    cloze_items: int = 200,
    seqlen: int = 512,
    test_windows: int = 64,
    samples: int | None = None,
    calib_seqlen: int | None = None,
    batch_size: int = 4,
    eval_batch_size: int = 8,
    max_length: int = 2048,
    out: str = "runs/report",
    device: str = "auto",
    dtype: str = "auto",
) -> dict:
    """Compare dense, uniform Wanda-sp, OWL and searched allocations of ``model``.

    ``ratios``: targets for uniform and OWL (every search's ratio is added). ``searches``: paths
    to ``best.json`` files of searches on this model and calibration. ``tasks``: lm-eval task names;
    ``selfprune_cloze`` / ``selfprune_lastword`` are built offline from the test split of ``data``
    (``cloze_items`` items), others come from lm-eval or the YAMLs under ``include_path``.
    ``samples`` / ``calib_seqlen``: the calibration (default: the searches', else 128 x 512).
    Perplexity: ``test_windows`` (0: all) windows of ``seqlen`` tokens of the test split.
    """
    start = time.perf_counter()
    tasks = list(dict.fromkeys(tasks or DEFAULT_TASKS))
    bests = {path: _read_search(path) for path in (searches or [])}
    targets = sorted({*(check_ratio(r) for r in (ratios or [])), *(b["config"]["ratio"] for b in bests.values())})
    if not targets:
        raise UserError("nothing to compare: give --ratios and/or --search runs/NAME/best.json")
    calib = [(b["config"]["samples"], b["config"]["calib_seqlen"]) for b in bests.values()]
    samples = samples or (calib[0][0] if calib else 128)
    calib_seqlen = calib_seqlen or (calib[0][1] if calib else 512)
    calibration = {"data": data, "samples": samples, "seqlen": calib_seqlen, "batch_size": batch_size}
    scoring = {"data": data, "split": "test", "seqlen": seqlen, "windows": test_windows or None, "batch_size": batch_size}

    model_fp = model_fingerprint(model)
    setup = capture_statistics(model, model_fp, calibration, device, dtype)
    stats_key, arch = setup["stats_key"], Arch(**setup["arch"])
    for path, best in bests.items():
        if best["model_fingerprint"] != model_fp:
            raise UserError(f"{path} is a search on another model (fingerprint {best['model_fingerprint'][:12]}, "
                            f"--model {model} is {model_fp[:12]}); report each model with its own searches")
        if best["stats_key"] != stats_key:
            c = best["config"]
            raise UserError(f"{path} was searched with other calibration statistics (data {c['data']}, "
                            f"{c['samples']} x {c['calib_seqlen']}); pass --data {c['data']} --samples "
                            f"{c['samples']} --calib-seqlen {c['calib_seqlen']}")
    include = include_path
    if any(t in LOCAL_TASKS for t in tasks):
        if include_path:
            raise UserError(f"{', '.join(LOCAL_TASKS)} are built from --data; give them without --include-path, "
                            "or build them into your include directory yourself")
        include = _local_tasks(data, tasks, cloze_items)
    elif include_path and not Path(include_path).expanduser().exists():
        raise UserError(f"task include path {include_path} does not exist")

    entries: list[tuple[str, str, float | None, list[float] | None, list | None]] = [
        ("dense", "dense", None, None, None)]
    for r in targets:
        for method in ("uniform", "owl"):
            a = allocation_rates(model, model_fp, stats_key, method, r, calibration, device, dtype)
            entries.append((method, method, r, a["rates"], a["structure"]))
    per_ratio = {r: sum(1 for b in bests.values() if b["config"]["ratio"] == r) for r in targets}
    for path, best in bests.items():
        r = best["config"]["ratio"]
        label = "search" if per_ratio[r] == 1 else f"search ({Path(path).parent.name})"
        entries.append((label, "search", r, best["rates"], best["structure"]))

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    ledger = str(out_dir / "evaluations.jsonl")
    counts = {"computed": 0, "cached": 0}
    rows, lm_eval_version, convention = [], "?", ""

    def count(state) -> dict:
        counts["cached" if state.name == "Cached" else "computed"] += 1
        return state.result()

    for label, method, r, rates, structure in entries:
        full = structure if structure is not None else dense_structure(arch)
        ppl = count(evaluate_ppl(model, model_fp, stats_key, full, scoring, calibration, device, dtype, ledger,
                                 return_state=True))
        zs = count(evaluate_zero_shot(model, model_fp, stats_key, structure, tasks, calibration, include, limit,
                                      max_length, eval_batch_size, device, dtype, return_state=True))
        lm_eval_version, convention = zs["lm_eval_version"], zs["convention"]
        keep = structure_from_json(full)
        rows.append({
            "label": label, "method": method, "ratio": r, "rates": rates, "structure": structure,
            "realized_ratio": realized_ratio(arch, keep), "kept_params": kept_params(arch, keep),
            "ppl": ppl["ppl"], "tokens": ppl["tokens"], "seqlen": ppl["seqlen"], "windows": ppl["windows"],
            "acc": {t: (zs["tasks"].get(t) or {}).get("score") for t in tasks}, "mean_acc": zs["mean_acc"],
            "zero_shot": zs,
        })

    meta = {"model": model, "model_fingerprint": model_fp, "data": data, "seqlen": seqlen,
            "test_windows": test_windows, "test_tokens": rows[0]["tokens"], "tasks": tasks, "limit": limit,
            "max_length": max_length, "lm_eval_version": lm_eval_version, "convention": convention,
            "include_path": include, "samples": samples, "calib_seqlen": calib_seqlen, "stats_key": stats_key,
            "ratios": targets, "searches": list(bests), **counts}
    plots = {"test perplexity by method and ratio": comparison.plot_ppl(rows, out_dir / comparison.PLOTS["ppl"]),
             "mean zero-shot accuracy by method and ratio": comparison.plot_accuracy(rows, out_dir / comparison.PLOTS["acc"])}
    md = comparison.markdown(rows, tasks, meta, {k: p.name for k, p in plots.items()})
    atomic_write_text(out_dir / "report.md", md)
    atomic_write_text(out_dir / "report.html", comparison.html_report(rows, tasks, meta, {k: p.read_bytes() for k, p in plots.items()}))
    meta["wall_s"] = round(time.perf_counter() - start, 2)
    summary = {"meta": meta, "rows": comparison.sort_rows(rows),
               "files": {name: str(out_dir / name) for name in ("report.md", "report.html", *comparison.PLOTS.values())}}
    atomic_write_text(out_dir / "report.json", json.dumps(summary, indent=2))
    key = "selfprune-report-" + "".join(c if c.isalnum() else "-" for c in out_dir.name.lower())
    create_table_artifact(comparison.artifact_rows(rows, tasks), key=f"{key}-table",
                          description=f"{model}: test ppl ({seqlen}-token windows) and zero-shot accuracy")
    create_markdown_artifact(md, key=key, description=f"comparison report of {model}")
    return summary
