"""--runner dask and ray: a generation's candidates on worker processes, the same search as the local runner.

Real runs of the CLI in subprocesses (as a user runs them), each with a cold cache, against the
session's Prefect server; the Dask cluster is a real LocalCluster of two single-threaded worker
processes started by the run itself, and the Ray cluster a real local Ray of two CPUs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import environ, free_port, run_cli

# slow: real Dask and Ray clusters of worker processes (about 3 minutes)
pytestmark = pytest.mark.slow

SMALL = dict(ratio=0.4, samples=4, calib_seqlen=64, seqlen=64, fitness_windows=2, test_windows=2, population=4,
             mutations=2, crossovers=2, generations=2, device="cpu")
SAME = ("rates", "structure", "fitness", "test_ppl", "uniform_test_ppl")


def _command(ws: Path, out: Path, *extra: str, **settings) -> list[str]:
    cmd = [sys.executable, "-m", "selfprune.app.cli", "search", "--model", str(ws / "model"), "--data", str(ws / "corpus.txt"),
           "--out", str(out), *extra]
    for k, v in (SMALL | settings).items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    return cmd


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "PREFECT_LOCAL_STORAGE_PATH")}
    return env | {"SELFPRUNE_HOME": str(home)}  # a cold cache; the API server is shared


def _ledger(out: Path) -> list[dict]:
    path = out / "evaluations.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.fixture(scope="module")
def local_best(tiny_workspace, prefect_api, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("local")
    done = subprocess.run(_command(tiny_workspace, root / "run"), env=_env(root / "home"), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((root / "run" / "best.json").read_text())


def _servers_of(home: Path) -> list[int]:
    """PIDs of Prefect API servers (uvicorn) running with ``home`` as their SELFPRUNE_HOME."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if b"uvicorn" in (proc / "cmdline").read_bytes() and f"SELFPRUNE_HOME={home}\0".encode() in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except (OSError, ValueError):
            pass
    return found


def test_dask_workers_find_the_local_best_and_survive_a_killed_worker(local_best, tiny_workspace, tmp_path):
    """As from a user's shell, without PREFECT_API_URL: the run's temporary server is the one its
    workers use (they start none of their own, which a killed worker would leave behind)."""
    out, home = tmp_path / "dask", tmp_path / "home"
    env = {k: v for k, v in _env(home).items() if k != "PREFECT_API_URL"}
    proc = subprocess.Popen(_command(tiny_workspace, out, "--runner", "dask", "--workers", "2"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not _ledger(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    victim = _ledger(out)[0]["pid"]  # a worker that has scored a candidate and is scoring the next
    # Dask's default malloc trimming would slow every forward pass in the worker (flows/evolution.py)
    assert b"MALLOC_TRIM_THRESHOLD_=" not in Path(f"/proc/{victim}/environ").read_bytes()
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    best = json.loads((out / "best.json").read_text())
    assert {k: best[k] for k in SAME} == {k: local_best[k] for k in SAME}
    pids = {e["pid"] for e in _ledger(out)}
    assert victim in pids and len(pids) >= 2 and os.getpid() not in pids  # scored on workers, side by side
    # Only the killed worker's candidate can be scored twice; everything else once.
    assert best["evaluations"] + best["cache_hits"] == local_best["evaluations"] + local_best["cache_hits"]
    assert _servers_of(home) == []


def test_dask_sends_a_gpu_run_to_the_workers_that_declare_a_gpu(local_best, tiny_workspace, tmp_path):
    """A cluster of `dask scheduler`, one `dask worker --resources GPU=1` and one CPU-only worker:
    a run on a GPU (`--device auto`; Dask's resources are labels, so this runs on a CPU) sends the
    calibration and every candidate to the GPU worker, and gives the local runner's best."""
    from distributed import Client

    home, dask = tmp_path / "home", str(Path(sys.executable).parent / "dask")
    address = f"tcp://127.0.0.1:{free_port()}"
    env = _env(home)
    started = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
                                 "--no-dashboard"], env=env, stderr=subprocess.DEVNULL)]
    try:
        for resources in (["--resources", "GPU=1"], []):
            started.append(subprocess.Popen([dask, "worker", address, "--nthreads", "1", "--no-nanny",
                                             "--no-dashboard", *resources], env=env, stderr=subprocess.DEVNULL))
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        out = tmp_path / "dask-gpu"
        done = subprocess.run(_command(tiny_workspace, out, "--runner", "dask", "--address", address, device="auto"),
                              env=env, capture_output=True, text=True, timeout=600)
    finally:
        for proc in reversed(started):
            proc.terminate()
            proc.wait(timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    best = json.loads((out / "best.json").read_text())
    assert {k: best[k] for k in SAME} == {k: local_best[k] for k in SAME}
    assert {e["pid"] for e in _ledger(out)} == {started[1].pid} and best["evaluations"] == local_best["evaluations"]


@pytest.mark.parametrize("args, message", [
    (["--runner", "spark"], "--runner 'spark' is not known; use one of local, dask, ray"),
    (["--address", "tcp://127.0.0.1:8786"], "--address names a Dask or Ray cluster: add --runner dask"),
])
def test_bad_runner_settings_exit_2(args, message, capsys, monkeypatch):
    code, _, err = run_cli(capsys, monkeypatch, "search", *args)
    assert code == 2 and message in err and "Traceback" not in err


def test_the_library_search_says_where_a_cluster_runner_runs(tiny_workspace):
    from selfprune import search
    from selfprune.core.errors import UserError

    with pytest.raises(UserError, match="--runner dask runs through the flow: selfprune search"):
        search(model=str(tiny_workspace / "model"), runner="dask")


def test_a_runner_whose_integration_is_missing_names_the_extra(monkeypatch):
    from selfprune.config import SearchConfig
    from selfprune.core.errors import UserError
    from selfprune.evolve.pipeline import check_runner

    monkeypatch.setitem(sys.modules, "prefect_ray", None)  # Python's own way to make a module unimportable
    with pytest.raises(UserError, match=r"--runner ray needs prefect-ray: pip install 'selfprune\[ray\]'"):
        check_runner(SearchConfig(runner="ray"))


def test_ray_workers_find_the_local_best(local_best, tiny_workspace, tmp_path):
    """A local Ray of two CPUs started by the run (prefect-ray's RayTaskRunner): candidates scored
    in Ray's worker processes, side by side, give the local runner's best."""
    out = tmp_path / "ray"
    done = subprocess.run(_command(tiny_workspace, out, "--runner", "ray", "--workers", "2"), env=_env(tmp_path / "home"),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    best = json.loads((out / "best.json").read_text())
    assert {k: best[k] for k in SAME} == {k: local_best[k] for k in SAME}
    pids = {e["pid"] for e in _ledger(out)}
    assert len(pids) >= 2 and os.getpid() not in pids and best["evaluations"] == local_best["evaluations"]


def test_ray_gives_each_worker_process_one_gpu_for_its_life(local_best, tiny_workspace, tmp_path):
    """A Ray cluster of two nodes with one GPU each, as `ray start --num-gpus 1` per GPU gives (Ray's
    GPUs are resource counts, so this runs on a CPU; `--device auto` then scores on it): each
    candidate asks for one GPU, and a worker process keeps its GPU and its loaded model for every
    candidate it scores, where Ray's default would start a process per candidate. A node with two
    GPUs is refused before any work: Ray moved a kept process between them (seen here)."""
    from ray.cluster_utils import Cluster  # Ray's own multi-process test cluster; it ends what it starts

    home, results = tmp_path / "home", []
    for name, nodes in (("one-each", [1, 1]), ("two-on-one", [2])):
        with environ(SELFPRUNE_HOME=str(home), PREFECT_LOCAL_STORAGE_PATH=None):  # the workers' environment
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": nodes[0],
                                                                    "include_dashboard": False})
            for gpus in nodes[1:]:
                cluster.add_node(num_cpus=1, num_gpus=gpus)
        try:
            command = _command(tiny_workspace, tmp_path / name, "--runner", "ray", "--address", cluster.address, device="auto")
            results.append(subprocess.run(command, env=_env(home), capture_output=True, text=True, timeout=600))
        finally:
            cluster.shutdown()
    one_each, two_on_one = results
    assert one_each.returncode == 0, one_each.stderr[-3000:]
    best = json.loads((tmp_path / "one-each" / "best.json").read_text())
    assert {k: best[k] for k in SAME} == {k: local_best[k] for k in SAME}
    gpus_of: dict[int, set] = {}
    for e in _ledger(tmp_path / "one-each"):
        gpus_of.setdefault(e["pid"], set()).add(e["visible_gpus"])
    assert 1 <= len(gpus_of) <= 2 and all(g == {"0"} for g in gpus_of.values()), gpus_of
    assert best["evaluations"] == local_best["evaluations"]
    assert _ledger(tmp_path / "two-on-one") == []  # refused before any candidate was scored
    assert two_on_one.returncode == 2 and "needs one GPU per Ray node (a node here has 2)" in two_on_one.stderr
