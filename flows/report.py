"""The comparison report as a Prefect flow: dense, uniform Wanda-sp, OWL and searched allocations.

The report's logic is the library's (:mod:`selfprune.evaluate.report`, also ``selfprune.report``
without Prefect); this flow evaluates each model through cached tasks (``tasks/``), so a report
run again, or a report over more models or ratios, computes only what it lacks, and the search's
own final test scores are hits here when the settings match. It writes ``out/report.md``,
``out/report.html`` (self-contained), ``out/report.json`` and the plots, and publishes a table
and a Markdown artifact.
"""

from __future__ import annotations

import selfprune.flows  # noqa: F401  (first: selfprune's Prefect settings and quiet logs; flows/__init__.py)

# isort: split

import time
from dataclasses import replace
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from selfprune.artifacts import comparison
from selfprune.config import ReportConfig
from selfprune.engine.candidate import Candidate
from selfprune.engine.models import model_fingerprint
from selfprune.engine.settings import ModelSpec
from selfprune.evaluate.report import build_rows, check_searches, plan_report, summarize, write_summary
from selfprune.flows.run_info import announce_run
from selfprune.model.arch import Arch
from selfprune.tasks.caching import kept_result
from selfprune.tasks.evaluation import allocation_rates, evaluate_ppl, evaluate_zero_shot, llamacpp_speed
from selfprune.tasks.faults import preflight
from selfprune.tasks.pruning import capture_statistics


@flow(name="selfprune-report")
def report(config: ReportConfig) -> dict:
    """Compare dense, uniform Wanda-sp, OWL and searched allocations of ``config.model``.

    ``ratios``: targets for uniform and OWL (every search's ratio is added). ``searches``: paths
    to ``best.json`` files of searches on this model and calibration. ``tasks``: lm-eval task names;
    ``selfprune_cloze`` / ``selfprune_lastword`` are built offline from the test split of ``data``.
    Returns the report's JSON (:meth:`selfprune.evaluate.report.Report.to_json`, as ``report.json``
    holds it): a flow's result.
    """
    start = time.perf_counter()
    announce_run(get_run_logger(), "selfprune.flows.report.report")
    preflight(config)
    c = config
    plan = plan_report(c)
    model_fp = model_fingerprint(c.model)
    spec = ModelSpec(c.model, model_fp, c.device, c.dtype, c.method)
    setup = capture_statistics(spec, plan.calibration)
    stats_key, arch = setup["stats_key"], Arch(**setup["arch"])
    check_searches(plan, model_fp, stats_key)

    out_dir = Path(c.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    ledger = str(out_dir / "evaluations.jsonl")
    counts = {"computed": 0, "cached": 0}
    common = (spec, stats_key)

    def run(task, *args, **kwargs) -> dict:
        state = task(*args, return_state=True, **kwargs)
        counts["cached" if state.name == "Cached" else "computed"] += 1
        return kept_result(state)

    def ppl(candidate: Candidate) -> dict:
        return run(evaluate_ppl, *common, candidate, plan.scoring, plan.calibration, ledger=ledger)

    def zero_shot(candidate: Candidate) -> dict:
        return run(evaluate_zero_shot, *common, candidate, plan.tasks, plan.calibration, plan.include_path, plan.limit,
                   plan.max_length, plan.eval_batch_size)

    def allocate(allocation: str, r: float, metric: str | None, pattern: str | None) -> dict:
        return allocation_rates(*common, allocation, r, plan.calibration, metric=metric, pattern=pattern)

    def speed(candidate: Candidate) -> dict:
        return llamacpp_speed(*common, candidate, plan.calibration, plan.llamacpp)

    rows = build_rows(plan, arch, model_fp, allocate, ppl, zero_shot, speed if plan.llamacpp else None)
    summary = summarize(plan, rows, model_fp, stats_key, counts, start)
    summary = replace(summary, files=comparison.render(summary, out_dir))
    write_summary(summary, out_dir)
    key = "selfprune-report-" + "".join(ch if ch.isalnum() else "-" for ch in out_dir.name.lower())
    create_table_artifact(comparison.artifact_rows(rows, plan.tasks), key=f"{key}-table",
                          description=f"{c.model}: test ppl ({c.seqlen}-token windows) and zero-shot accuracy")
    create_markdown_artifact((out_dir / "report.md").read_text(), key=key, description=f"comparison report of {c.model}")
    return summary.to_json()
