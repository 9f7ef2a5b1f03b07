"""prefect.yaml as a newcomer uses it: a real `prefect server start`, a process work pool, the
zombie automation, `prefect deploy --all`, the `ls` commands, a real `prefect worker start`, and
deployment runs of the search on the tiny model.

Every Prefect process here runs with a minimal environment (PATH, HOME, PREFECT_API_URL,
SELFPRUNE_HOME, plus two knobs that only make the test faster: the worker's poll interval and one
OpenMP thread), so the cache location, the result format, the heartbeats and the quiet logs must
come from the project (the flows' import and prefect.yaml's job variables), not from the test.
The worker and the CLI share one HOME, so ``SELFPRUNE_HOME`` (``~/.cache/selfprune`` in the
job variables) is the same directory for both.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from fake_openai_server import FakeOpenAI, reply, status
from helpers import PrefectServer

# slow: a real `prefect deploy --all` and process worker running flows (about 3 minutes)
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ZOMBIE_WINDOW_S = 45  # the shipped file says 120; flow-run heartbeats are every 30 s (Prefect's minimum)
TINY = dict(ratio=0.5, oracle="ga", population=6, mutations=2, crossovers=2, generations=2, samples=4,
            calib_seqlen=64, seqlen=64, fitness_windows=4, test_windows=4, device="cpu")
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


class BusyRetry(httpx.HTTPTransport):
    """Retries what the server answers while SQLite is busy (503), as Prefect's own client does
    (``PREFECT_CLIENT_MAX_RETRIES``, ``PREFECT_CLIENT_RETRY_EXTRA_CODES``); the test's raw calls
    would otherwise fail where every Prefect process just waits."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for attempt in range(5):
            response = super().handle_request(request)
            if response.status_code not in (429, 502, 503):
                return response
            response.close()
            time.sleep(2 ** attempt)
        return super().handle_request(request)


class Stack:
    """The server, its URL and the minimal environments of the processes that talk to it."""

    def __init__(self, tmp: Path, url: str) -> None:
        self.tmp, self.url = tmp, url
        self.home = tmp / "user"  # HOME of the worker and the CLI
        self.selfprune_home = self.home / ".cache" / "selfprune"  # prefect.yaml's SELFPRUNE_HOME
        self.api = httpx.Client(base_url=url, timeout=30, transport=BusyRetry())
        self.worker: subprocess.Popen | None = None
        self.worker_logs: list[Path] = []

    def env(self, **extra: str) -> dict[str, str]:
        return {"PATH": os.environ["PATH"], "HOME": str(self.home), "PREFECT_API_URL": self.url,
                "SELFPRUNE_HOME": str(self.selfprune_home), **extra}

    def prefect(self, *args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([PY, "-m", "prefect", "--no-prompt", *args], env=self.env(), capture_output=True,
                              text=True, timeout=timeout, **kw)

    def start_worker(self) -> Path:
        log = self.tmp / f"worker-{len(self.worker_logs)}.log"
        self.worker_logs.append(log)
        with open(log, "w") as fh:
            self.worker = subprocess.Popen(
                [PY, "-m", "prefect", "worker", "start", "--pool", "selfprune-process", "--type", "process"],
                env=self.env(PREFECT_WORKER_QUERY_SECONDS="2", OMP_NUM_THREADS="1"), cwd=self.tmp,
                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
            )
        return log

    def kill_worker_and_children(self) -> None:
        """What a lost node looks like: the worker and its flow-run processes die at once (the
        flow-run process runs in a session of its own, so a process-group kill would miss it)."""
        proc = psutil.Process(self.worker.pid)
        victims = [proc, *proc.children(recursive=True)]
        for p in victims:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        self.worker.wait()
        psutil.wait_procs(victims, timeout=10)

    def stop_worker(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            self.kill_worker_and_children()

    def run_deployment(self, name: str, parameters: dict) -> str:
        dep = self.api.get(f"/deployments/name/{name}").raise_for_status().json()
        run = self.api.post(f"/deployments/{dep['id']}/create_flow_run", json={"parameters": parameters})
        return run.raise_for_status().json()["id"]

    def flow_run(self, run_id: str) -> dict:
        return self.api.get(f"/flow_runs/{run_id}").raise_for_status().json()

    def wait(self, run_id: str, types: set[str] = TERMINAL, timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.flow_run(run_id)
            if run["state_type"] in types:
                return run
            time.sleep(1)
        raise AssertionError(f"flow run {run_id} still {run['state_name']} after {timeout} s; worker log:\n"
                             + self.worker_logs[-1].read_text()[-4000:])


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deployments")
    server = PrefectServer(tmp).start()
    s = Stack(tmp, server.url)
    try:
        yield s
    finally:
        s.stop_worker()
        server.stop()


@pytest.fixture(scope="module")
def deployed(stack):
    """What a newcomer runs, from the Deployments section of docs/prefect.md; every command exits 0."""
    t0 = time.monotonic()
    zombies = yaml.safe_load((ROOT / "automations" / "zombies.yaml").read_text())
    assert zombies["trigger"]["posture"] == "Proactive" and zombies["trigger"]["within"] == 120
    zombies["trigger"]["within"] = ZOMBIE_WINDOW_S
    (stack.tmp / "zombies.yaml").write_text(yaml.safe_dump(zombies))
    for said in ("created", "updated"):  # `selfprune prefect-setup` is safe to run again
        done = subprocess.run([PY, "-m", "selfprune.app.cli", "prefect-setup", "--automation", str(stack.tmp / "zombies.yaml")],
                              env=stack.env(), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and f"{said} automation" in done.stdout + done.stderr, done.stdout + done.stderr
    automations = stack.api.post("/automations/filter", json={}).raise_for_status().json()
    assert [a["name"] for a in automations] == [zombies["name"]] and automations[0]["trigger"]["within"] == ZOMBIE_WINDOW_S
    assert stack.api.get("/work_pools/selfprune-process").raise_for_status().json()["type"] == "process"
    done = stack.prefect("deploy", "--all", "--prefect-file", str(ROOT / "prefect.yaml"), cwd=stack.tmp)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for cmd in (("deployment", "ls"), ("flow-run", "ls"), ("artifact", "ls"), ("work-pool", "ls"),
                ("automation", "ls")):
        done = stack.prefect(*cmd)
        assert done.returncode == 0, f"prefect {' '.join(cmd)}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    print(f"\npool, automation, deploy and ls in {time.monotonic() - t0:.1f} s")
    stack.start_worker()
    return stack


def test_deploy_stores_no_machine_path_and_no_secret(deployed):
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    for d in spec["deployments"]:
        flow_name = "selfprune-" + d["entrypoint"].rsplit(".", 1)[1]  # selfprune.flows.search.search -> selfprune-search
        dep = deployed.api.get(f"/deployments/name/{flow_name}/{d['name']}").raise_for_status().json()
        text = json.dumps(dep)
        assert str(ROOT) not in text and str(deployed.tmp) not in text, d["name"]
        assert dep["entrypoint"].startswith("selfprune.flows.")  # the installed package, no checkout
        assert dep["concurrency_limit"] == 1 or dep["global_concurrency_limit"]["limit"] == 1
        env = dep["job_variables"]["env"]
        assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30" and env["SELFPRUNE_HOME"] == "~/.cache/selfprune"
    gpu = deployed.api.get("/deployments/name/selfprune-search/llama3-8b-gpt4o-weekly").json()
    assert gpu["job_variables"]["env"]["CUDA_VISIBLE_DEVICES"] == "0" and "OPENAI_API_KEY" not in gpu["job_variables"]["env"]
    assert {"selfprune.ops.env_from_secrets": {"OPENAI_API_KEY": "openai-api-key"}} in gpu["pull_steps"]  # read at run time


def test_user_errors_log_one_line_and_a_traceback_only_at_debug_and_the_cli_drops_them():
    import logging

    from selfprune.llm.chat import OracleUnavailable
    from selfprune.tasks.faults import FailureLogs

    def record(exc: Exception) -> logging.LogRecord:
        try:
            raise exc
        except Exception:
            return logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1,
                                     "Task run failed with exception: %r", (exc,), sys.exc_info())

    logger, level = logging.getLogger("prefect.task_runs"), logging.getLogger("prefect.task_runs").level
    try:
        logger.setLevel(logging.INFO)
        quiet = record(OracleUnavailable("oracle answered HTTP 500"))
        assert FailureLogs(drop=False).filter(quiet) and quiet.exc_info is None
        assert "OracleUnavailable('oracle answered HTTP 500')" in quiet.getMessage()
        bug = record(KeyError("x"))  # not a user error: a bug keeps its traceback
        assert FailureLogs(drop=False).filter(bug) and bug.exc_info is not None
        logger.setLevel(logging.DEBUG)
        verbose = record(OracleUnavailable("down"))
        assert FailureLogs(drop=False).filter(verbose) and verbose.exc_info is not None
        # the CLI's filter drops a user's failure (it prints the one line itself) and keeps a bug's
        assert not FailureLogs(drop=True).filter(record(OracleUnavailable("down")))
        assert FailureLogs(drop=True).filter(record(KeyError("x")))
    finally:
        logger.setLevel(level)


def test_failed_cached_task_exception_is_persisted_as_json():
    """Prefect persists a failed task's exception with the task's serializer: it must encode it
    (this was the "Failed to serialize object of type 'OracleUnavailable'" warning)."""
    from selfprune.llm.chat import OracleUnavailable
    from selfprune.tasks.caching import JSON_RESULTS

    data = JSON_RESULTS.dumps(OracleUnavailable("down"))
    assert json.loads(data) == {"__exc_type__": "selfprune.llm.chat.OracleUnavailable", "message": "down"}
    assert JSON_RESULTS.loads(data) == json.loads(data)  # read back as a plain dict: nothing imported
    with pytest.raises(TypeError):
        JSON_RESULTS.dumps(object())


def _search_params(ws: Path, out: str, **overrides) -> dict:
    """The search flow's one parameter, ``config`` (a SearchConfig), for the tiny workspace."""
    return {"config": {"model": str(ws / "model"), "data": str(ws / "corpus.txt"), "out": out, **TINY, **overrides}}


def _cli_args(parameters: dict) -> list[str]:
    args = []
    for k, v in parameters.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            args += [flag] if v else []
        elif v is not None:
            args += [flag, str(v)]
    return args


def _ledger(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_worker_run_and_cli_run_share_one_cache(deployed, tiny_workspace):
    """A deployment run through the worker computes; the CLI with exactly its parameters (same
    SELFPRUNE_HOME, same API) then evaluates nothing, and all results are JSON in one place."""
    t0 = time.monotonic()
    run_id = deployed.run_deployment("selfprune-search/demo", _search_params(tiny_workspace, "runs/shared", seed=11))
    run = deployed.wait(run_id)
    assert run["state_type"] == "COMPLETED", deployed.worker_logs[-1].read_text()[-4000:]
    t_worker = time.monotonic() - t0
    out = deployed.selfprune_home / "runs" / "shared"  # relative out: under SELFPRUNE_HOME (the pull step)
    first = json.loads((out / "best.json").read_text())
    assert first["evaluations"] > 0

    results = deployed.selfprune_home / "results"
    files = [p for p in results.iterdir() if p.is_file()]
    assert files and not (deployed.home / ".prefect" / "storage").exists()  # not Prefect's default storage
    for p in files:
        record = json.loads(p.read_text())  # every result is JSON (none pickled)
        if "metadata" in record:  # a cached task's record; subflow and flow results are the bare value
            assert record["metadata"]["serializer"]["type"] == "json", p

    t1 = time.monotonic()
    cli = subprocess.run([PY, "-m", "selfprune.app.cli", "search", *_cli_args(run["parameters"]["config"])],
                         env=deployed.env(OMP_NUM_THREADS="1"), cwd=deployed.selfprune_home,
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stdout[-3000:] + cli.stderr[-3000:]
    again = json.loads((out / "best.json").read_text())
    assert again["evaluations"] == 0 and again["cache_hits"] == first["evaluations"] + first["cache_hits"]
    assert (again["rates"], again["fitness"]) == (first["rates"], first["fitness"])
    print(f"\nworker run {t_worker:.1f} s, CLI rerun {time.monotonic() - t1:.1f} s")

    log = deployed.worker_logs[-1].read_text()
    assert "it/s]" not in log and "%|" not in log, log[-3000:]  # no progress bars in the worker's log


def test_dead_oracle_fails_the_run_with_one_line_and_the_ui_retry_finishes_it(deployed, tiny_workspace):
    """An oracle that stays down: the run fails, and the worker's log names the cause in one line
    per failed run, without a traceback and without "Failed to serialize". Once the oracle is back,
    the UI's Retry button (the exact call Prefect's UI makes: force the state to Scheduled /
    AwaitingRetry) has a worker run it again to completion."""
    from test_search_flow import _llm_reply

    log_path = deployed.worker_logs[-1]
    start = len(log_path.read_text())
    with FakeOpenAI([status(500)]) as server:
        run_id = deployed.run_deployment("selfprune-search/demo", _search_params(
            tiny_workspace, "runs/dead-oracle", seed=12, oracle="openai:fake-gpt", base_url=server.base_url,
            oracle_timeout=2.0))
        run = deployed.wait(run_id)
        time.sleep(2)  # the worker streams the flow run's output
        failed_log = log_path.read_text()[start:]
        server.script = [reply(_llm_reply(8, 400))]  # the oracle is back
        retried = deployed.api.post(f"/flow_runs/{run_id}/set_state", json={
            "state": {"type": "SCHEDULED", "name": "AwaitingRetry", "message": "Retry from the UI"}, "force": True})
        assert retried.raise_for_status().json()["status"] == "ACCEPT"
        after = deployed.wait(run_id, types={"COMPLETED", "FAILED", "CRASHED"}, timeout=240)
    assert after["state_type"] == "COMPLETED" and after["run_count"] >= 2, log_path.read_text()[-4000:]
    assert json.loads((deployed.selfprune_home / "runs" / "dead-oracle" / "best.json").read_text())["test_ppl"] > 0
    assert run["state_type"] == "FAILED" and "OracleUnavailable" in run["state"]["message"]
    log = failed_log
    assert "Traceback" not in log and "Failed to serialize" not in log, log[-5000:]
    cause = [line for line in log.splitlines() if "OracleUnavailable" in line]
    assert cause and all("500" in line for line in cause if "encountered an exception" in line), log[-5000:]
    assert len(cause) <= 6, "\n".join(cause)  # one per failed run (task, generation, search), not a trace


def test_preempted_run_crashes_and_retry_resumes_from_the_cache(deployed, tiny_workspace):
    """SIGKILL the worker and its flow run together: the zombie automation marks the run Crashed
    within the heartbeat window; `prefect flow-run retry` on a new worker finishes it, evaluating
    nothing twice but what was in flight."""
    out = deployed.selfprune_home / "runs" / "preempted"
    run_id = deployed.run_deployment("selfprune-search/demo", _search_params(
        tiny_workspace, "runs/preempted", seed=13, generations=3))
    deadline = time.monotonic() + 180
    while len(_ledger(out / "evaluations.jsonl")) < 8:
        assert time.monotonic() < deadline and deployed.flow_run(run_id)["state_type"] not in TERMINAL, \
            deployed.worker_logs[-1].read_text()[-4000:]
        time.sleep(0.2)
    deployed.kill_worker_and_children()
    killed_at = time.monotonic()
    before = len(_ledger(out / "evaluations.jsonl"))
    assert deployed.flow_run(run_id)["state_type"] == "RUNNING"

    run = deployed.wait(run_id, types=TERMINAL, timeout=ZOMBIE_WINDOW_S + 60)
    to_crash = time.monotonic() - killed_at
    assert run["state_type"] == "CRASHED", run["state"]
    assert to_crash <= ZOMBIE_WINDOW_S + 15
    print(f"\nkilled -> Crashed in {to_crash:.1f} s (heartbeat 30 s, window {ZOMBIE_WINDOW_S} s)")

    deployed.start_worker()  # the node is back
    retry = deployed.prefect("flow-run", "retry", run_id)
    assert retry.returncode == 0, retry.stdout + retry.stderr
    run = deployed.wait(run_id, timeout=240)
    assert run["state_type"] == "COMPLETED" and run["run_count"] >= 2, deployed.worker_logs[-1].read_text()[-4000:]
    best = json.loads((out / "best.json").read_text())
    ledger = _ledger(out / "evaluations.jsonl")
    counts = Counter((json.dumps(e["structure"]), e["split"]) for e in ledger)
    repeated = [k for k, n in counts.items() if n > 1]
    assert len(repeated) <= 1, repeated  # only the evaluation in flight at the kill
    assert len(ledger) > before and best["rates"] and best["test_ppl"] > 0


def test_cli_run_retried_with_module_entrypoint_uses_the_same_cache(deployed, tiny_workspace):
    """A CLI run has no deployment: `prefect flow-run retry ID --entrypoint
    selfprune.flows.search.search` runs it in the retrying process, which gets selfprune's
    settings from importing the flow (its environment has none), so it finds the same cache."""
    from fake_openai_server import reply
    from test_search_flow import _llm_reply

    out = deployed.tmp / "cli-retry"
    params = {"model": str(tiny_workspace / "model"), "data": str(tiny_workspace / "corpus.txt"), "out": str(out),
              **TINY, "generations": 3, "seed": 14, "oracle": "openai:fake-gpt"}
    with FakeOpenAI([*(reply(_llm_reply(8, 200 + s)) for s in range(3)), status(500)]) as server:
        failed = subprocess.run([PY, "-m", "selfprune.app.cli", "search", *_cli_args(params), "--base-url", server.base_url],
                                env=deployed.env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
        assert failed.returncode == 3 and "500" in failed.stderr, failed.stdout[-2000:] + failed.stderr[-2000:]  # the server: exit 3
        evaluated = len(_ledger(out / "evaluations.jsonl"))
        runs = deployed.api.post("/flow_runs/filter", json={
            "flow_runs": {"deployment_id": {"is_null_": True}, "parent_task_run_id": {"is_null_": True},
                          "state": {"type": {"any_": ["FAILED"]}}},
            "sort": "START_TIME_DESC", "limit": 1}).raise_for_status().json()
        assert runs and runs[0]["parameters"]["config"]["out"] == str(out)
        server.script = [reply(_llm_reply(8, 300))]  # the oracle is back
        retry = subprocess.run([PY, "-m", "prefect", "flow-run", "retry", runs[0]["id"], "--entrypoint",
                                "selfprune.flows.search.search"], env=deployed.env(OMP_NUM_THREADS="1"),
                               cwd=deployed.tmp, capture_output=True, text=True, timeout=300)
    assert retry.returncode == 0, retry.stdout[-3000:] + retry.stderr[-3000:]
    assert deployed.flow_run(runs[0]["id"])["state_type"] == "COMPLETED"
    counts = Counter((json.dumps(e["structure"]), e["split"]) for e in _ledger(out / "evaluations.jsonl"))
    assert max(counts.values()) == 1 and sum(counts.values()) > evaluated  # nothing completed ran again
    assert (out / "best.json").is_file() and not (deployed.home / ".prefect" / "storage").exists()
