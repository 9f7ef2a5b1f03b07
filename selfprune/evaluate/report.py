"""The comparison report without Prefect: which models to compare, their rows, and the files.

A report compares dense, the allocations (uniform, OWL, ATP, ...) and searched allocations
(``best.json``, or a ``seeds.json`` whose seeds make one row: mean, spread and every seed) of one
model per ratio, and, with ``metrics``, single-weight pruning by each metric x pattern x allocation
per sparsity, on test-split perplexity and zero-shot accuracy. Every row carries its protocol
(:mod:`selfprune.protocol`), and a table refuses rows measured under different ones. How a model gets evaluated is injected:
``flows/report.py`` passes its cached Prefect tasks (a rerun computes nothing twice), and
:func:`report` (``selfprune.report``) passes plain calls on one :class:`Workbench`, for a
notebook. Either way each model is a :mod:`selfprune.engine.candidate`, and its JSON what the tasks take.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from .. import allocators
from ..config import ReportConfig, build_config
from ..core.errors import UserError
from ..core.progress import step
from ..engine.candidate import Candidate, Dense, Sparse, Structured, from_json
from ..engine.models import load_model
from ..engine.settings import Calibration, Scoring
from ..engine.workbench import Progress, Workbench
from ..methods.sparsity import parse_pattern
from ..metrics import resolve_metric
from ..model.arch import Arch
from ..model.ppl import Perplexity
from ..protocol import common, protocol
from ..seeds import SUMMARY as SEEDS_SUMMARY
from ..seeds import candidates, run_paths, spread
from ..storage.fileio import atomic_write_text
from ..storage.hashing import content_hash
from ..storage.userfiles import read_json
from .cloze import CLOZE_TASK, LASTWORD_TASK, build_cloze_task, build_lastword_task

LOCAL_TASKS = (CLOZE_TASK, LASTWORD_TASK)

# (allocation, ratio, metric, pattern) -> {"rates", "candidate" (its JSON)}
Allocate = Callable[[str, float, str | None, str | None], dict]
EvaluatePpl = Callable[[Candidate], dict]  # candidate -> Perplexity fields
EvaluateZeroShot = Callable[[Candidate], dict]  # candidate -> zero-shot record
EvaluateSpeed = Callable[[Candidate], dict]  # candidate -> llama.cpp measurement (selfprune.export.llamacpp)


@dataclass(frozen=True)
class ReportPlan:
    """What a report compares and how, settled (and checked) before any model is loaded."""

    model: str
    data: str
    method: str
    ratios: list[float]  # targets: the given ratios and every search's
    allocations: list[str]  # of the structured rows
    searches: dict[str, dict]  # path -> its best.json (a seeds.json gives one per seed)
    tasks: list[str]
    include_path: str | None  # where lm-eval finds the tasks (the offline ones are built there)
    limit: int | None
    max_length: int
    eval_batch_size: int
    calibration: Calibration
    scoring: Scoring  # the test split
    device: str
    dtype: str
    sparse: list[tuple[str, str, str, float, str]]  # (metric text, pattern, allocation, sparsity, reconstruction) rows
    metric_names: dict[str, str]  # metric text -> how its rows are labelled
    llamacpp: str | None = None  # a GGUF quantization: each row's speed in llama.cpp


def _read_search(path: str | Path) -> dict:
    p = Path(path)
    best = read_json(p, "search result", "a search run's best.json (selfprune search --out DIR)")
    if not isinstance(best, dict) or not {"rates", "config", "model_fingerprint", "stats_key"} <= set(best):
        raise UserError(f"{p} is not a search's best.json (it needs rates, config, model_fingerprint, stats_key)")
    return best


def read_searches(path: str) -> dict[str, dict]:
    """path -> best.json: the file itself, or every seed's of a ``seeds.json`` (selfprune search --seeds)."""
    if Path(path).name != SEEDS_SUMMARY:
        return {path: _read_search(path)}
    summary = read_json(Path(path), "seeds summary", "the seeds.json of selfprune search --seeds A,B --out DIR")
    if not isinstance(summary, dict) or not isinstance(summary.get("runs"), dict):
        raise UserError(f"{path} is not a seeds.json of selfprune search --seeds (it needs runs)")
    return {str(p): _read_search(p) for p in run_paths(path, summary)}


def _local_tasks(data: str, tasks: list[str], n_items: int, seed: int = 0) -> str:
    """Build the requested offline tasks of ``data`` into a directory named by their content."""
    from selfprune.data.corpora import data_fingerprint
    from selfprune.storage.paths import subdir

    wanted = [t for t in tasks if t in LOCAL_TASKS]
    key = content_hash("local-tasks", data_fingerprint(data, "test"), sorted(wanted), n_items, seed)
    out = subdir("tasks") / key
    if CLOZE_TASK in wanted:
        build_cloze_task(data, out, n_items=n_items, seed=seed)
    if LASTWORD_TASK in wanted:
        build_lastword_task(data, out, n_items=n_items, seed=seed)
    return str(out)


def plan_report(config: ReportConfig) -> ReportPlan:
    """Read the searches, settle the ratios and calibration, and build the offline tasks.

    ``samples`` / ``calib_seqlen`` default to the searches' calibration, else 128 x 512.
    """
    c = config
    tasks, include_path, data = list(dict.fromkeys(c.tasks)), c.include_path, c.data
    bests = {path: best for search in c.searches for path, best in read_searches(search).items()}
    targets = sorted({*c.ratios, *(b["config"]["ratio"] for b in bests.values())})
    if not targets and not (c.metrics and (c.sparsities or any(parse_pattern(p).fixed_sparsity for p in c.patterns))):
        raise UserError("nothing to compare: give --ratios and/or --search runs/NAME/best.json "
                        "(or --metric with --sparsity)")
    unknown = [a for a in c.allocations if a not in allocators.ALLOCATIONS]
    if unknown:
        raise UserError(f"--allocation {', '.join(unknown)}: not a registered allocation; use "
                        f"{', '.join(allocators.ALLOCATIONS.names())}")
    calib = [(b["config"]["samples"], b["config"]["calib_seqlen"]) for b in bests.values()]
    samples = c.samples or (calib[0][0] if calib else 128)
    calib_seqlen = c.calib_seqlen or (calib[0][1] if calib else 512)
    include = include_path
    if any(t in LOCAL_TASKS for t in tasks):
        if include_path:
            raise UserError(f"{', '.join(LOCAL_TASKS)} are built from --data; give them without --include-path, "
                            "or build them into your include directory yourself")
        include = _local_tasks(data, tasks, c.cloze_items)
    elif include_path and not Path(include_path).expanduser().exists():
        raise UserError(f"task include path {include_path} does not exist")
    names, sparse = _sparse_rows(c, c.sparsities or targets)
    if c.llamacpp:
        check_llamacpp(c.model, c.llamacpp)
    return ReportPlan(
        model=c.model, data=data, method=c.method, ratios=targets, allocations=list(dict.fromkeys(c.allocations)),
        searches=bests, tasks=tasks, include_path=include, sparse=sparse, metric_names=names, device=c.device,
        dtype=c.dtype,
        limit=c.limit or None, max_length=c.max_length, eval_batch_size=c.eval_batch_size,
        calibration=Calibration(data, samples, calib_seqlen, c.batch_size),
        scoring=Scoring(data, "test", c.seqlen, c.test_windows or None, c.batch_size),
        llamacpp=c.llamacpp,
    )


def check_llamacpp(model: str, quant: str) -> None:
    """``--llamacpp QUANT`` can run: llama-cpp-python installed, a local model llama.cpp's GGUF
    expresses (checked on the dense model: its exports share its family, tokenizer and rope)."""
    import importlib.util

    from ..data.demo import demo_model_dir
    from ..export.gguf import check_gguf_export

    if importlib.util.find_spec("llama_cpp") is None:
        raise UserError("--llamacpp times each row in llama.cpp: pip install 'selfprune[llm-server]' (llama-cpp-python)")
    check_gguf_export(demo_model_dir() if model == "demo" else Path(model).expanduser(), quant)


def _sparse_rows(c: ReportConfig, ratios: list[float]) -> tuple[dict[str, str], list[tuple[str, str, str, float, str]]]:
    """The metric rows, every metric, pattern, allocation and reconstruction checked now (before any
    model loads): each metric x pattern x allocation x ratio x reconstruction; an N:M pattern gives
    uniform rows at its sparsity."""
    names = {resolve_metric(m).text: Path(m).parent.name if m.endswith(".json") else m for m in c.metrics}
    for a in c.metric_allocations:
        for how in c.reconstructs:  # a registered allocation and a sparse reconstruction, else a UserError now
            Sparse.of("abs(W)", "unstructured", 0.5, a, reconstruct=how)
    rows = []
    for text in names:
        for p in dict.fromkeys(parse_pattern(p).text for p in c.patterns):
            fixed = parse_pattern(p).fixed_sparsity
            plan = [("uniform", fixed)] if fixed else [(a, r) for a in c.metric_allocations for r in ratios]
            rows += [(text, p, a, r, how) for a, r in plan for how in dict.fromkeys(c.reconstructs)]
    return names, rows


def check_searches(plan: ReportPlan, model_fp: str, stats_key: str) -> None:
    """Every search must be of this model, with these statistics (else its rates mean something else)."""
    for path, best in plan.searches.items():
        if best["model_fingerprint"] != model_fp:
            raise UserError(f"{path} is a search on another model (fingerprint {best['model_fingerprint'][:12]}, "
                            f"--model {plan.model} is {model_fp[:12]}); report each model with its own searches")
        if best["stats_key"] != stats_key:
            c = best["config"]
            raise UserError(f"{path} was searched with other calibration statistics (data {c['data']}, "
                            f"{c['samples']} x {c['calib_seqlen']}); pass --data {c['data']} --samples "
                            f"{c['samples']} --calib-seqlen {c['calib_seqlen']}")


@dataclass(frozen=True)
class Entry:
    """One model of the report."""

    label: str
    method: str  # dense | an allocation's name | search | metric
    ratio: float | None
    rates: list[float] | None
    candidate: Candidate
    oracle: dict | None = None  # a search's LLM-oracle accounting (best.json), if it had one
    seed: int | None = None  # a search's seed
    candidates: int | None = None  # the candidates a search scored (computed or from the cache)


def _seedless(best: dict) -> str:
    """A search's settings without its seed and run directory: seeds of one search share them."""
    return json.dumps({k: v for k, v in best["config"].items() if k not in ("seed", "seeds", "out")}, sort_keys=True)


def _search_entries(searches: dict[str, dict]) -> list[Entry]:
    """Searches labelled ``search (ORACLE)``, plus their run's name where one ratio has several
    searches with that oracle; the seeds of one search share a label (and become one row). A seed
    given twice (one search in two run directories) counts once."""
    groups: dict[str, dict[int, tuple[str, dict]]] = {}
    for path, best in searches.items():
        groups.setdefault(_seedless(best), {}).setdefault(best["config"]["seed"], (path, best))
    per_label: dict[tuple, int] = {}
    for by_seed in groups.values():
        c = next(iter(by_seed.values()))[1]["config"]
        per_label[(c["ratio"], c["oracle"])] = per_label.get((c["ratio"], c["oracle"]), 0) + 1
    out = []
    for members in (list(by_seed.values()) for by_seed in groups.values()):
        c = members[0][1]["config"]
        run = Path(members[0][0]).parent
        name = run.parent.name if len(members) > 1 or run.name.startswith("seed-") else run.name
        label = f"search ({c['oracle']})" + (f", {name}" if per_label[(c["ratio"], c["oracle"])] > 1 else "")
        out += [Entry(label, "search", c["ratio"], best["rates"], from_json(best["structure"]), best.get("oracle"),
                      seed=best["config"]["seed"], candidates=candidates(best)) for _, best in members]
    return out


def entries(plan: ReportPlan, allocate: Allocate) -> list[Entry]:
    """Dense; each allocation at every ratio; every metric row (labelled ``METRIC ALLOCATION``, plus
    the pattern when not unstructured); every search (its seeds under one label)."""
    out = [Entry("dense", "dense", None, None, Dense())]
    for r in plan.ratios:
        for method in plan.allocations:
            a = allocate(method, r, None, None)
            out.append(Entry(method, method, r, a["rates"], from_json(a["candidate"])))
    for text, pattern, allocation, r, how in plan.sparse:
        a = allocate(allocation, r, text, pattern)
        label = (f"{plan.metric_names[text]} {allocation}" + ("" if pattern == "unstructured" else f" {pattern}")
                 + ("" if how == "none" else f" + {how}"))
        out.append(Entry(label, "metric", r, a["rates"], replace(from_json(a["candidate"]), reconstruct=how)))
    return out + _search_entries(plan.searches)


@dataclass(frozen=True)
class SeedRow:
    """One seed of a merged search row: what its seed alone measured and searched."""

    seed: int
    ppl: float
    mean_acc: float | None
    rates: list[float]
    candidates: int | None
    oracle: dict | None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> SeedRow:
        return cls(**data)


MERGED = ("ppl_spread", "mean_acc_spread", "seeds")  # the fields only a merged search row has


@dataclass(frozen=True)
class Row:
    """One model of the report, as measured; a search's seeds merged into one row add ``MERGED``.

    The fields are ``report.json``'s keys, in its order: ``to_json`` writes the row exactly as
    the report always has, so a report written before reads back the same."""

    label: str
    method: str  # dense | an allocation's name | search | metric
    ratio: float | None  # None: dense
    rates: list[float] | None  # None: dense, and a merged row (each seed's are in seeds)
    structure: list | dict | None  # the candidate's JSON (Candidate.to_json); None: dense or merged
    oracle: dict | None
    seed: int | None
    candidates: float | None  # a search's scored candidates (a merged row: their mean over seeds)
    realized_ratio: float
    kept_params: int
    ppl: float
    tokens: int
    seqlen: int
    windows: int
    acc: dict[str, float | None]  # task -> score
    mean_acc: float | None
    zero_shot: dict | None  # the zero-shot record (None: merged)
    protocol: dict
    llamacpp: dict | None
    ppl_spread: dict | None = None  # mean, std and every seed's value (selfprune.seeds.spread)
    mean_acc_spread: dict | None = None
    seeds: list[SeedRow] | None = None  # set on merged rows only

    def to_json(self) -> dict:
        out = asdict(self)
        return out if self.seeds is not None else {k: v for k, v in out.items() if k not in MERGED}

    @classmethod
    def from_json(cls, data: dict) -> Row:
        seeds = data.get("seeds")
        return cls(**data | {"seeds": None if seeds is None else [SeedRow.from_json(s) for s in seeds]})


@dataclass(frozen=True)
class ReportMeta:
    """The report's settings, identities, evaluation counts and wall time."""

    model: str
    model_fingerprint: str
    data: str
    method: str
    seqlen: int
    test_windows: int
    test_tokens: int
    tasks: list[str]
    limit: int | None
    max_length: int
    lm_eval_version: str
    convention: str
    include_path: str | None
    samples: int
    calib_seqlen: int
    stats_key: str
    ratios: list[float]
    allocations: list[str]
    searches: list[str]
    computed: int  # evaluations computed
    cached: int  # evaluations taken from a cached result
    wall_s: float

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ReportMeta:
        return cls(**data)


@dataclass(frozen=True)
class Report:
    """A comparison report: its ``meta`` and sorted ``rows``; the flow adds the ``files`` it rendered.

    ``to_json`` is ``report.json`` and the flow's result; ``from_json`` the one place either is read."""

    meta: ReportMeta
    rows: list[Row]
    files: dict[str, str] | None = None  # name -> path of report.md, report.html, rates.csv and the plots

    def to_json(self) -> dict:
        out: dict[str, Any] = {"meta": self.meta.to_json(), "rows": [r.to_json() for r in self.rows]}
        return out if self.files is None else out | {"files": self.files}

    @classmethod
    def from_json(cls, data: dict) -> Report:
        return cls(ReportMeta.from_json(data["meta"]), [Row.from_json(r) for r in data["rows"]], data.get("files"))


def build_rows(plan: ReportPlan, arch: Arch, model_fp: str, allocate: Allocate, evaluate_ppl: EvaluatePpl,
               evaluate_zero_shot: EvaluateZeroShot, evaluate_speed: EvaluateSpeed | None = None) -> list[Row]:
    """One row per entry: its perplexity and zero-shot scores, realized ratio, kept parameters and
    protocol; then the seeds of each search merged into one row (:func:`merge_seeds`). Each row is a
    unit of the "report rows" progress step. The evaluations' results are JSON (cached tasks'),
    read here once."""
    rows = []
    todo = entries(plan, allocate)
    advance = step("report rows", len(todo))
    for e in todo:
        record = evaluate_ppl(e.candidate)
        ppl = Perplexity(*(record[f.name] for f in fields(Perplexity)))
        zs = evaluate_zero_shot(e.candidate)
        realized, kept = e.candidate.size(arch, e.rates)
        accuracy = (f"lm-eval {zs['lm_eval_version']}, tasks {', '.join(plan.tasks)}, limit {plan.limit or 'none'}, "
                    f"max length {plan.max_length}; {zs['convention']}")
        rows.append(Row(
            label=e.label, method=e.method, ratio=e.ratio, rates=e.rates, structure=e.candidate.to_json(),
            oracle=e.oracle, seed=e.seed, candidates=e.candidates, realized_ratio=realized, kept_params=kept,
            ppl=ppl.ppl, tokens=ppl.tokens, seqlen=ppl.seqlen, windows=ppl.windows,
            acc={t: (zs["tasks"].get(t) or {}).get("score") for t in plan.tasks}, mean_acc=zs["mean_acc"], zero_shot=zs,
            protocol=protocol(plan.model, model_fp, vars(plan.scoring), ppl.to_dict(), vars(plan.calibration),
                              plan.device, plan.dtype, e.seed) | {"zero_shot": accuracy},
            llamacpp=evaluate_speed(e.candidate) if evaluate_speed else None,
        ))
        advance(1)
    return merge_seeds(rows)


def _mean(values: list) -> float | None:
    return None if any(v is None for v in values) else statistics.fmean(values)


def merge_seeds(rows: list[Row]) -> list[Row]:
    """The seeds of one search (rows with one label and ratio) as one row: the mean of each figure,
    ``ppl_spread`` / ``mean_acc_spread`` (mean, std, every seed's value) and each seed's rates,
    candidates and oracle accounting under ``seeds``. Their protocols must agree, seed aside."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.label, r.ratio) if r.method == "search" else (id(r),), []).append(r)
    merged = []
    for members in groups.values():
        if len(members) == 1:
            merged.append(members[0])
            continue
        common([(m.label, m.protocol) for m in members])
        first, by_seed = members[0], {m.seed: m for m in members}
        merged.append(replace(
            first, seed=None, rates=None, structure=None, oracle=None,
            acc={t: _mean([m.acc[t] for m in members]) for t in first.acc},
            ppl=statistics.fmean(m.ppl for m in members), mean_acc=_mean([m.mean_acc for m in members]),
            ppl_spread=spread({s: m.ppl for s, m in by_seed.items()}),
            mean_acc_spread=None if first.mean_acc is None else spread({s: m.mean_acc for s, m in by_seed.items()}),
            realized_ratio=statistics.fmean(m.realized_ratio for m in members),
            kept_params=round(statistics.fmean(m.kept_params for m in members)),
            candidates=_mean([m.candidates for m in members]),
            llamacpp=None if first.llamacpp is None else first.llamacpp | {
                k: statistics.fmean(m.llamacpp[k] for m in members) for k in ("prefill_tokens_per_s", "decode_tokens_per_s")},
            seeds=[SeedRow(m.seed, m.ppl, m.mean_acc, m.rates, m.candidates, m.oracle) for m in members],
            protocol=first.protocol | {"seed": sorted(by_seed)},
            zero_shot=None,
        ))
    return merged


METHOD_ORDER = {"dense": 0, "uniform": 1, "owl": 2, "search": 8, "metric": 9}  # other allocations: 3


def sort_rows(rows: list[Row]) -> list[Row]:
    """By ratio (dense first), then dense, uniform, OWL, the other allocations, search."""
    return sorted(rows, key=lambda r: (r.ratio or 0.0, METHOD_ORDER.get(r.method, 3), r.label))


def summarize(plan: ReportPlan, rows: list[Row], model_fp: str, stats_key: str, counts: dict[str, int],
              start: float) -> Report:
    """The report as data: ``meta`` (settings, identities, counts, wall time) and the sorted ``rows``.

    ``counts``: evaluations ``computed`` and taken from a ``cached`` result; ``start``: the
    ``time.perf_counter()`` the report began at. Rendering it (Markdown, HTML, plots) is the
    application's job: ``selfprune.artifacts.comparison.render``.
    """
    zs = next(r.zero_shot for r in rows if r.zero_shot)
    meta = ReportMeta(
        model=plan.model, model_fingerprint=model_fp, data=plan.data, method=plan.method, seqlen=plan.scoring.seqlen,
        test_windows=plan.scoring.windows or 0, test_tokens=rows[0].tokens, tasks=plan.tasks, limit=plan.limit,
        max_length=plan.max_length, lm_eval_version=zs["lm_eval_version"], convention=zs["convention"],
        include_path=plan.include_path, samples=plan.calibration.samples, calib_seqlen=plan.calibration.seqlen,
        stats_key=stats_key, ratios=plan.ratios, allocations=plan.allocations, searches=list(plan.searches),
        computed=counts["computed"], cached=counts["cached"], wall_s=round(time.perf_counter() - start, 2))
    return Report(meta, sort_rows(rows))


def write_summary(summary: Report, out_dir: Path) -> Path:
    """``out_dir/report.json`` (:meth:`Report.to_json`), written atomically."""
    return atomic_write_text(Path(out_dir) / "report.json", json.dumps(summary.to_json(), indent=2))


def allocation_entry(bench: Workbench, allocation: str, ratio: float, metric: str | None = None,
                     pattern: str | None = None) -> dict:
    """The rates of a named allocation at ``ratio`` and the candidate they give, as JSON values:
    a structure, or with ``metric`` a sparse candidate (OWL, SDSA and DLP then read the metric's
    scores, and ATP tunes on its sparse candidates)."""
    if metric is None:
        rates = bench.pruner.allocate(allocation, ratio)
        return {"rates": rates, "candidate": Structured(bench.pruner.structure(rates)).to_json()}
    candidate = Sparse.of(metric, pattern or "unstructured", ratio, allocation)
    rates = bench.pruner.sparse_rates(resolve_metric(metric), allocation, ratio, parse_pattern(candidate.pattern))
    return {"rates": rates, "candidate": candidate.to_json()}


def zero_shot(bench: Workbench, candidate: Candidate, tasks: list[str], include_path: str | None = None,
              limit: int | None = None, max_length: int = 2048, batch_size: int = 8) -> dict:
    """lm-eval accuracy of a candidate (``None``: the dense model), built in memory (see
    :func:`selfprune.evaluate.zeroshot.evaluate_zero_shot` for the returned record)."""
    from .zeroshot import evaluate_zero_shot

    return evaluate_zero_shot(bench.pruner.model(candidate), bench.lm.tokenizer, list(tasks), include_path=include_path,
                              limit=limit, max_length=max_length, batch_size=batch_size)


def llamacpp_speed(bench: Workbench, candidate: Candidate, quant: str) -> dict:
    """The candidate's speed in llama.cpp: exported, written as GGUF at ``quant`` and timed (batch 1,
    128-token prompt, 64 new tokens, median of 3), in a temporary directory."""
    import tempfile

    from ..export.gguf import write_gguf
    from ..export.hf import save_pruned
    from .speed import llamacpp_measure

    with tempfile.TemporaryDirectory(prefix="selfprune-report-gguf-") as tmp:
        export = save_pruned(bench.pruner.model(candidate), bench.lm.tokenizer, Path(tmp) / "model",
                             {"base_model": {"source": bench.lm.source}})
        return llamacpp_measure(write_gguf(export, Path(tmp) / f"model.{quant}.gguf", quant), quant)


def report(config: ReportConfig | None = None, progress: Progress | None = None, **overrides) -> Report:
    """The report of ``selfprune report``, computed in this process without Prefect or its cache
    (statistics still come from the store): a :class:`ReportConfig` or its fields as keywords.
    Writes ``out/report.json`` and returns the :class:`Report` (render it with
    ``selfprune.artifacts.comparison.render(summary, out)``). ``progress``: ``(label, total) ->
    advance(n)`` for every pass; without it, the long steps are logged (:mod:`selfprune.core.progress`)."""
    start = time.perf_counter()
    config = build_config(ReportConfig, **((config.model_dump() if config else {}) | overrides))
    plan = plan_report(config)
    bench = Workbench(load_model(config.model, config.device, config.dtype), plan.calibration,
                      progress, method=config.method)
    check_searches(plan, bench.lm.fingerprint, bench.stats_key)
    rows = build_rows(
        plan, bench.arch, bench.lm.fingerprint,
        allocate=lambda allocation, ratio, metric, pattern: allocation_entry(bench, allocation, ratio, metric, pattern),
        evaluate_ppl=lambda candidate: bench.score(candidate, plan.scoring).to_dict(),
        evaluate_zero_shot=lambda s: zero_shot(bench, s, plan.tasks, plan.include_path, plan.limit, plan.max_length,
                                               plan.eval_batch_size),
        evaluate_speed=(lambda c: llamacpp_speed(bench, c, plan.llamacpp)) if plan.llamacpp else None,
    )
    summary = summarize(plan, rows, bench.lm.fingerprint, bench.stats_key, {"computed": 2 * len(rows), "cached": 0}, start)
    write_summary(summary, config.out)
    return summary
