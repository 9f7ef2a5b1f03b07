"""What both search flows inject into the library's loop: candidates scored as one batch of cached
tasks, and oracle requests sent through the cached oracle task.

A batch is submitted whole, so the flow's task runner decides how many candidates run side by side.
An oracle reply that came too late is not replayed from the cache: the rerun asks again (with a
longer ``--oracle-timeout``, say); answered replies replay, so a resumed search follows the same path.
"""

from __future__ import annotations

import selfprune.flows  # noqa: F401  (first: selfprune's Prefect settings and quiet logs; flows/__init__.py)

# isort: split

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from logging import Logger
from pathlib import Path

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from selfprune.config import EvolutionConfig, SearchConfig
from selfprune.core.errors import UserError
from selfprune.core.progress import Advance, ignore
from selfprune.engine.candidate import Candidate
from selfprune.engine.models import load_tokenizer, model_fingerprint
from selfprune.evolve import pipeline, runner
from selfprune.evolve.pipeline import Search, Summary, write_summary
from selfprune.flows.run_info import announce_run
from selfprune.llm.chat import ChatRequest, Reply, Transport
from selfprune.model.arch import Arch
from selfprune.seeds import over_seeds
from selfprune.tasks import prefect_env
from selfprune.tasks.caching import kept_result
from selfprune.tasks.evaluation import allocation_rates
from selfprune.tasks.faults import preflight
from selfprune.tasks.oracle import oracle_call
from selfprune.tasks.pruning import capture_statistics, score_candidate


def task_runner(config: EvolutionConfig) -> TaskRunner:
    """Where candidates (and the calibration pass) run: one at a time in this process, whose loaded
    model they share, or on Dask / Ray worker processes, each of which loads the model once (the
    process-wide shared workbench) and keeps it for every candidate it scores. Results come back in
    submission order, so the search is the same wherever and in whatever order they finish."""
    if config.runner == "local":
        return ThreadPoolTaskRunner(max_workers=1)
    pipeline.check_runner(config)
    if config.address and not os.environ.get("PREFECT_API_URL"):
        raise UserError("--address sends candidates to workers that must reach this run's Prefect server: start one "
                        "(prefect server start) and export PREFECT_API_URL here and on the workers")
    # Workers started from here inherit this URL; without it each would start (and, if killed,
    # leave behind) a temporary server of its own.
    prefect_env.ensure_api_server()
    if config.runner == "dask":
        import dask
        from prefect_dask import DaskTaskRunner

        if config.address:
            return DaskTaskRunner(address=config.address)
        # Dask's nannies set MALLOC_TRIM_THRESHOLD_=65536 in their workers, which pins glibc's mmap
        # threshold: every activation tensor is then a fresh mmap and page faults, and a forward
        # pass runs ~25% slower (bench/bench_runners.py). A worker here keeps one model for its life.
        dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})
        return DaskTaskRunner(cluster_kwargs={"n_workers": config.workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    from prefect_ray import RayTaskRunner

    local = {"num_cpus": config.workers, "include_dashboard": False}  # the dashboard's processes cost CPU, and no one reads it
    return RayTaskRunner(address=config.address, init_kwargs=None if config.address else local)


@contextmanager
def one_gpu_per_task(config: EvolutionConfig, workers: TaskRunner) -> Iterator[None]:
    """Tasks submitted inside ask the engine for one GPU each, where the run uses a GPU
    (``--device auto`` or ``cuda``) and the cluster declares GPUs: a Dask worker started with
    ``--resources GPU=1`` (so candidates skip CPU-only workers), or a Ray node's GPUs.

    On Ray, ``max_calls=0`` keeps a worker process, and its loaded model, for every later task:
    Ray's default for GPU tasks is one task per process. Ray names a task's GPU per task in
    ``CUDA_VISIBLE_DEVICES``, and a kept process may later be given another GPU of its node after
    CUDA has started on the first (tests/test_runners.py saw it): so each Ray node must have one GPU."""
    if config.runner == "local" or config.device not in ("auto", "cuda"):
        yield
        return
    if config.runner == "dask":
        import dask

        declared = [w.get("resources", {}).get("GPU", 0) for w in workers.client.scheduler_info()["workers"].values()]
        with dask.annotate(resources={"GPU": 1}) if any(declared) else nullcontext():
            yield
        return
    import ray
    from prefect_ray.context import remote_options

    gpus = [node["Resources"].get("GPU", 0) for node in ray.nodes() if node["Alive"]]
    if any(gpus) and max(gpus) > 1:
        raise UserError(f"--runner ray on GPUs needs one GPU per Ray node (a node here has {max(gpus):g}): Ray may move "
                        "a worker process to another GPU after its model is loaded. Start one node per GPU "
                        "(CUDA_VISIBLE_DEVICES=i ray start --address HEAD:6379 --num-gpus 1 --num-cpus 1), or use "
                        "--runner dask with one worker per GPU")
    with remote_options(num_gpus=1, max_calls=0) if any(gpus) else nullcontext():
        yield


def batch_scorer(config: EvolutionConfig, setup: pipeline.Setup, ledger: str, workers: TaskRunner,
                 tolerate_invalid: bool = False):
    """``score(candidates, split, windows)``: one cached ``score_candidate`` per candidate (a structure
    or a metric's sparse candidate), submitted to ``workers`` as one batch; each measurement says
    whether a cache answered. ``advance(1)`` runs here, in the flow's process, as each future resolves (a
    worker's own log gets no line per candidate). ``tolerate_invalid``: see ``score_candidate``
    (the metric search)."""

    def score(candidates: list[Candidate], split: str, windows: int | None, advance: Advance = ignore
              ) -> list[pipeline.Measurement]:
        how = pipeline.scoring(config, split, windows)
        with one_gpu_per_task(config, workers):
            futures = [workers.submit(score_candidate, dict(
                spec=setup.spec, stats_key=setup.stats_key, candidate=c, scoring=how, calibration=pipeline.calibration(config),
                ledger=ledger, tolerate_invalid=tolerate_invalid)) for c in candidates]
        for f in futures:
            f.wait()
            advance(1)
        return [pipeline.Measurement.of(kept_result(f.state), cached=f.state.name == "Cached") for f in futures]

    return score


def space_metric(config: SearchConfig) -> str | None:
    """The canonical metric of a sparsity search (whose allocations read its scores), else None."""
    from selfprune.metrics import resolve_metric

    return resolve_metric(config.metric).text if config.pattern else None


def batch_allocator(config: SearchConfig, setup: pipeline.Setup, workers: TaskRunner) -> runner.Allocate:
    """``allocate(names)``: each registered allocation's rates at the search's ratio through the
    cached ``allocation_rates`` task, on ``workers`` (where the model is loaded), as one batch."""

    def allocate(names: list[str]) -> list[list[float]]:
        with one_gpu_per_task(config, workers):
            futures = [workers.submit(allocation_rates, dict(
                spec=setup.spec, stats_key=setup.stats_key, allocation=name, ratio=config.ratio,
                calibration=pipeline.calibration(config), metric=space_metric(config), pattern=config.pattern))
                for name in names]
        for f in futures:
            f.wait()
        return [kept_result(f.state)["rates"] for f in futures]

    return allocate


def cached_transport(config: EvolutionConfig, calls: dict[str, int]) -> Transport:
    """The oracle's transport through the cached ``oracle_call`` task; counts ``oracle_calls`` (sent)
    and ``oracle_replays`` (answered from the cache) in ``calls``. A cached reply without text
    (late, or unreadable: not a success) is asked again."""

    def transport(request: ChatRequest) -> Reply:
        ask = dict(request=request.to_dict(), base_url=config.base_url, timeout=config.oracle_timeout,
                   api_key_env=config.api_key_env)
        state = oracle_call(**ask, return_state=True)
        if state.name == "Cached" and Reply.from_dict(state.result()).text is None:
            state = oracle_call.with_options(refresh_cache=True)(**ask, return_state=True)
        calls["oracle_replays" if state.name == "Cached" else "oracle_calls"] += 1
        return Reply.from_dict(kept_result(state))

    return transport


def artifact_key(config: EvolutionConfig) -> str:
    return "selfprune-" + "".join(c if c.isalnum() else "-" for c in Path(config.out).name.lower())


def publisher(config: EvolutionConfig, logger: Logger, row: Callable[[dict], dict], best: Callable[[int, dict], str],
              fallback: str) -> Callable[[pipeline.GenerationReport], None]:
    """The per-generation hook of a search flow: a table artifact of the generation's new candidates
    (``row`` formats one), the best so far (``best`` writes its Markdown), the progress, and a log
    line with the oracle's reply counts (``fallback`` names what fills in for the LLM)."""
    key = artifact_key(config)
    progress = create_progress_artifact(0.0, key=f"{key}-progress", description="generations done")

    def publish(g: pipeline.GenerationReport) -> None:
        rows = [row(r) | {"origin": "cache" if r["cached"] else config.oracle} for r in g.rows]
        replies = "" if g.oracle is None else "; oracle replies so far: " + ", ".join(
            f"{n} {kind}" for kind, n in g.oracle["replies"].items()) + f", {g.oracle['fallbacks']} {fallback} fallbacks"
        create_table_artifact(rows, key=f"{key}-gen-{g.index}",
                              description=f"generation {g.index}: {len(rows)} candidates{replies}")
        create_markdown_artifact(best(g.index, g.population[0]), key=f"{key}-best")
        update_progress_artifact(progress, 100.0 * (g.index + 1) / (g.generations + 1))
        logger.info(f"generation {g.index}/{g.generations}: best {g.best:.3f}, mean {g.mean:.3f} | "
                    f"{g.evaluated} evaluated, {g.cached} cached{replies}")

    return publish


def prepare(config: EvolutionConfig, logger: Logger, entrypoint: str, check: Callable[[EvolutionConfig], None],
            workers: TaskRunner) -> tuple[Path, pipeline.Setup]:
    """A search flow's start: the run id and retry command, the machine's and the config's checks,
    the windows of each split (the tokenizer only: a cached rerun reads no weights), the run
    directory, and the statistics (cached), captured by one of ``workers`` and read by all.
    Returns (out, setup)."""
    announce_run(logger, entrypoint)
    preflight(config)
    check(config)
    pipeline.check_windows(config, load_tokenizer(config.model))
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = pipeline.model_spec(config, model_fingerprint(config.model))
    with one_gpu_per_task(config, workers):
        capture = workers.submit(capture_statistics, dict(spec=spec, calibration=pipeline.calibration(config)))
    capture.wait()
    stats = kept_result(capture.state)
    return out, pipeline.Setup(Arch(**stats["arch"]), spec, stats["stats_key"])


@dataclass(frozen=True)
class View:
    """How a search's run shows in Prefect: a generation's row in its table artifact (``row``), the
    best so far as Markdown (``best``, given the model's shapes), and what is published at the end
    from the summary (``final``: plots and the closing Markdown artifact)."""

    row: Callable[[dict], dict]
    best: Callable[[Arch], Callable[[int, dict], str]]
    final: Callable[[Summary, EvolutionConfig, Arch, Path, str], None]


def run_flow(search: Search, view: View, config: EvolutionConfig, entrypoint: str,
             one_seed: Callable[[EvolutionConfig], dict]) -> dict:
    """The body of every search flow: ``one_seed`` (the flow itself, as a subflow run) per seed, or
    the search with cached scoring, oracle calls and allocations on the run's task runner, then
    best.json and the view's artifacts. Returns the summary as JSON (a flow's result): best.json's
    dict, whose ``oracle_calls`` are the requests sent and ``oracle_replays`` those the cache answered."""
    if config.seeds:
        return over_seeds(config, lambda one: search.summary.from_json(one_seed(one)), search.figures).to_json()
    logger = get_run_logger()
    with task_runner(config) as workers:
        out, setup = prepare(config, logger, entrypoint, search.check, workers)
        calls = {"oracle_calls": 0, "oracle_replays": 0}
        injected = pipeline.Injected(
            score=batch_scorer(config, setup, str(out / "evaluations.jsonl"), workers, search.tolerate_invalid),
            transport=cached_transport(config, calls),
            on_generation=publisher(config, logger, view.row, view.best(setup.arch), search.fallback),
            allocate=batch_allocator(config, setup, workers) if search.allocator else None)
        summary = search.run(config, setup, injected)
    summary = replace(summary, record=replace(summary.record, oracle_calls=calls["oracle_calls"]),
                      oracle_replays=calls["oracle_replays"])
    write_summary(summary, out)
    view.final(summary, config, setup.arch, out, artifact_key(config))
    return summary.to_json()
