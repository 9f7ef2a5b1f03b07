"""The comparison report as a Prefect flow: dense, uniform Wanda-sp, OWL and searched allocations.

The report's logic is the library's (:mod:`selfprune.evaluate.report`, also ``selfprune.report``
without Prefect); this flow evaluates each model through cached tasks (``tasks/``), so a report
run again, or a report over more models or ratios, computes only what it lacks, and the search's
own final test scores are hits here when the settings match. It writes ``out/report.md``,
``out/report.html`` (self-contained), ``out/report.json`` and the plots, and publishes a table
and a Markdown artifact.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from selfprune.allocation import dense_structure, structure_to_json
from selfprune.arch import Arch
from selfprune.artifacts import comparison
from selfprune.evaluate.report import build_rows, check_searches, plan_report, write_report
from selfprune.models import model_fingerprint
from selfprune.tasks.evaluation import allocation_rates, evaluate_ppl, evaluate_zero_shot
from selfprune.tasks.pruning import capture_statistics


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
    plan = plan_report(model, data, ratios, searches, tasks, include_path, limit, cloze_items, seqlen, test_windows,
                       samples, calib_seqlen, batch_size, eval_batch_size, max_length)
    model_fp = model_fingerprint(model)
    setup = capture_statistics(model, model_fp, plan.calibration, device, dtype)
    stats_key, arch = setup["stats_key"], Arch(**setup["arch"])
    check_searches(plan, model_fp, stats_key)

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    ledger = str(out_dir / "evaluations.jsonl")
    counts = {"computed": 0, "cached": 0}
    common = (model, model_fp, stats_key)

    def run(task, *args) -> dict:
        state = task(*args, return_state=True)
        counts["cached" if state.name == "Cached" else "computed"] += 1
        return state.result()

    def ppl(structure: list | None) -> dict:
        full = structure if structure is not None else structure_to_json(dense_structure(arch))
        return run(evaluate_ppl, *common, full, plan.scoring, plan.calibration, device, dtype, ledger)

    def zero_shot(structure: list | None) -> dict:
        return run(evaluate_zero_shot, *common, structure, plan.tasks, plan.calibration, plan.include_path, plan.limit,
                   plan.max_length, plan.eval_batch_size, device, dtype)

    rows = build_rows(plan, arch, lambda method, r: allocation_rates(*common, method, r, plan.calibration, device, dtype),
                      ppl, zero_shot)
    summary = write_report(plan, rows, model_fp, stats_key, counts, out_dir, start)
    key = "selfprune-report-" + "".join(c if c.isalnum() else "-" for c in out_dir.name.lower())
    create_table_artifact(comparison.artifact_rows(rows, plan.tasks), key=f"{key}-table",
                          description=f"{model}: test ppl ({seqlen}-token windows) and zero-shot accuracy")
    create_markdown_artifact((out_dir / "report.md").read_text(), key=key, description=f"comparison report of {model}")
    return summary
