"""The caching/orchestration infrastructure, proven with trivial payloads and real Prefect runs.

One local Prefect API server for the whole file (``prefect_env.ensure_api_server``: 10-20 s
once); subprocesses reuse it through ``PREFECT_API_URL`` instead of starting their own.
Prefect is imported only after ``prefect_env.configure`` has pointed it at a temporary home.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import environ, stop_api_server

from selfprune.core.errors import CorruptFile, UserError
from selfprune.storage.store import ArtifactStore

HELPER = Path(__file__).with_name("prefect_resume_flow.py")
_MANAGED = (
    "PREFECT_HOME", "PREFECT_PROFILES_PATH", "PREFECT_PROFILE", "PREFECT_API_URL",
    "PREFECT_LOCAL_STORAGE_PATH", "PREFECT_RESULTS_LOCAL_STORAGE_PATH",
    "PREFECT_RESULTS_PERSIST_BY_DEFAULT", "PREFECT_RESULTS_DEFAULT_SERIALIZER",
    "PREFECT_SERVER_ANALYTICS_ENABLED", "PREFECT_SERVER_EPHEMERAL_ENABLED",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "PREFECT_LOGGING_LEVEL",
)


# ---------------------------------------------------------------------------------------------
# Artifact store (no Prefect)
# ---------------------------------------------------------------------------------------------
def test_store_roundtrip(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {
        "w": base,
        "row": base[1],  # a view sharing storage with "w"
        "t": base.t(),  # non-contiguous
        "h": torch.randn(5).to(torch.bfloat16),
        "i": torch.tensor([1, -2, 3], dtype=torch.int64),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
    }
    key = "a1b2c3d4e5f6"
    assert not store.has(key)
    path = store.put_tensors(key, tensors, {"model": "tiny", "n": "3"})
    assert path == tmp_path / "store" / "tensors" / "a1" / f"{key}.safetensors"
    assert store.has(key)
    got = store.get_tensors(key)
    assert set(got) == set(tensors)
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    with pytest.raises(KeyError):
        store.get_tensors("ffff00")
    with pytest.raises(ValueError):
        store.tensor_path("../etc/passwd")
    assert not list((tmp_path / "store").rglob("*.tmp"))


def test_store_default_root_follows_selfprune_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFPRUNE_HOME", str(tmp_path / "h"))
    assert ArtifactStore().tensor_path("abcd") == tmp_path / "h" / "store" / "tensors" / "ab" / "abcd.safetensors"


def test_store_write_is_atomic(tmp_path, monkeypatch):
    """A writer that dies mid-file leaves the previous complete file and no readable garbage."""
    import safetensors.torch

    store = ArtifactStore(tmp_path)
    key = "deadbeef01"
    store.put_tensors(key, {"x": torch.ones(4)})
    before = store.tensor_path(key).read_bytes()

    def dying_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00garbage, half a header")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", dying_save)
    with pytest.raises(OSError, match="disk full"):
        store.put_tensors(key, {"x": torch.zeros(4)})
    assert store.tensor_path(key).read_bytes() == before
    assert torch.equal(store.get_tensors(key)["x"], torch.ones(4))
    assert not list(tmp_path.rglob("*.tmp"))

    monkeypatch.undo()
    store.put_tensors(key, {"x": torch.zeros(4)})  # a later good write replaces it whole
    assert torch.equal(store.get_tensors(key)["x"], torch.zeros(4))


def test_store_corrupt_file_is_a_clear_user_error(tmp_path):
    store = ArtifactStore(tmp_path)
    key = "cafe0123"
    path = store.put_tensors(key, {"x": torch.arange(64, dtype=torch.float32)})
    good = path.read_bytes()

    path.write_bytes(good[: len(good) // 2])  # truncated (killed copy, full disk)
    with pytest.raises(UserError) as err:
        store.get_tensors(key)
    assert str(path) in str(err.value) and "elete" in str(err.value)
    assert path.read_bytes() == good[: len(good) // 2]  # left for the user, not rewritten

    flipped = bytearray(good)
    flipped[-5] ^= 0xFF  # one flipped bit in the data section: the header still parses
    path.write_bytes(bytes(flipped))
    with pytest.raises(CorruptFile, match="digest mismatch") as err:
        store.get_tensors(key)
    assert err.value.path == path

    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(UserError, match=str(path)):
        store.get_tensors(key)

    aside = store.set_aside(key)
    assert not store.has(key) and aside.read_bytes() == b"not a safetensors file at all"
    assert aside.parent == path.parent and aside.name.startswith(path.name + ".corrupt-")


# ---------------------------------------------------------------------------------------------
# Cache keys (no Prefect run)
# ---------------------------------------------------------------------------------------------
def test_cache_key_is_content_only(prefect_session):
    from selfprune.tasks import caching

    policy = caching.content_cache(lambda fp, units, **_: {"fp": fp, "units": units})
    k1 = policy.key_for("ns", {"fp": "abc", "units": {"0": [1, 2]}, "model": object()})
    assert k1 == policy.key_for("ns", {"units": {"0": [1, 2]}, "fp": "abc", "model": object()})
    assert k1.startswith("ns-") and len(k1) == 3 + 32
    assert k1 != policy.key_for("ns", {"fp": "abd", "units": {"0": [1, 2]}})
    assert k1 != policy.key_for("other", {"fp": "abc", "units": {"0": [1, 2]}})
    assert k1 != caching.content_cache(policy.key_fn, version="2").key_for("ns", {"fp": "abc", "units": {"0": [1, 2]}})
    assert policy.isolation_level == "READ_COMMITTED" and policy.lock_manager is None

    inc = caching.content_cache(include=["a"])
    assert inc.key_for("ns", {"a": 1, "b": torch.ones(2)}) == inc.key_for("ns", {"a": 1, "b": 7})
    with pytest.raises(TypeError, match="Tensor"):
        caching.content_cache().key_for("ns", {"a": torch.ones(2)})


def test_configure_keeps_explicit_settings(tmp_path, monkeypatch):
    from selfprune.tasks import prefect_env

    env = {"PREFECT_RESULTS_LOCAL_STORAGE_PATH": "/mine", "PREFECT_SERVER_ANALYTICS_ENABLED": "true"}
    applied = prefect_env.configure(tmp_path, env=env, user_profiles=False)
    assert env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] == "/mine" and "PREFECT_LOCAL_STORAGE_PATH" not in env
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "true"
    assert env["PREFECT_HOME"] == str(tmp_path.resolve() / "prefect") and applied["PREFECT_HOME"] == env["PREFECT_HOME"]
    assert env["PREFECT_RESULTS_PERSIST_BY_DEFAULT"] == "true" and env["PREFECT_RESULTS_DEFAULT_SERIALIZER"] == "json"
    assert not (tmp_path / "prefect").exists()  # env= builds a subprocess environment only

    # A profile the user keeps in ~/.prefect stays in force (its keys count as explicit).
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("PREFECT_PROFILE", raising=False)
    profiles = tmp_path / ".prefect" / "profiles.toml"
    profiles.parent.mkdir()
    profiles.write_text('active = "mine"\n[profiles.mine]\nPREFECT_API_URL = "http://h:1/api"\n'
                        'PREFECT_RESULTS_PERSIST_BY_DEFAULT = "false"\n')
    env = {}
    prefect_env.configure(tmp_path / "h", env=env)
    assert env["PREFECT_PROFILES_PATH"] == str(profiles) and "PREFECT_RESULTS_PERSIST_BY_DEFAULT" not in env
    env = {}
    prefect_env.configure(tmp_path / "h", env=env, user_profiles=False)
    assert "PREFECT_PROFILES_PATH" not in env and env["PREFECT_RESULTS_PERSIST_BY_DEFAULT"] == "true"


# ---------------------------------------------------------------------------------------------
# Real Prefect runs
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def prefect_session(tmp_path_factory):
    """configure() a temporary home, start one local API server, export its URL."""
    from selfprune.tasks import prefect_env

    home = tmp_path_factory.mktemp("prefect_infra")
    with environ(**(dict.fromkeys(_MANAGED) | {"PREFECT_LOGGING_LEVEL": "WARNING"})):
        prefect_env.configure(home, user_profiles=False)
        t0 = time.monotonic()
        url = prefect_env.ensure_api_server(timeout=120)
        print(f"\nlocal Prefect API at {url} in {time.monotonic() - t0:.1f} s")
        yield {"home": home, "url": url}
        stop_api_server()
    prefect_env.refresh()


@pytest.fixture(scope="session")
def helper(prefect_session):
    spec = importlib.util.spec_from_file_location("prefect_resume_flow", HELPER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_cached_task_runs_once_across_flow_runs(prefect_session, tmp_path):
    from prefect import flow

    from selfprune.tasks.caching import cached_task
    from selfprune.tasks.prefect_env import results_dir

    counter = tmp_path / "counter"

    @cached_task(key_fn=lambda cfg, **_: cfg, namespace="infra_toy_score", version="1")
    def toy_score(cfg: dict, model=None) -> dict:
        with open(counter, "a") as fh:
            fh.write(f"{cfg['x']}\n")
        return {"x": cfg["x"], "score": cfg["x"] * 0.5, "pair": (cfg["x"], 1)}

    @flow
    def score_all(xs: list[int], salt: str) -> list[dict]:
        model = torch.nn.Linear(2, 2)  # a live object that must never reach the key
        return [toy_score({"x": x, "salt": salt}, model=model) for x in xs]

    salt = tmp_path.name
    first = score_all([1, 2], salt)
    assert first == [{"x": 1, "score": 0.5, "pair": [1, 1]}, {"x": 2, "score": 1.0, "pair": [2, 1]}]
    assert _lines(counter) == ["1", "2"]
    second = score_all([1, 2], salt)  # a different flow run, same inputs: all cache hits
    assert second == first and _lines(counter) == ["1", "2"]
    score_all([2, 3], salt)  # one new input executes, the old one does not
    assert _lines(counter) == ["1", "2", "3"]
    score_all([1], salt + "-other")  # different inputs: executes again
    assert _lines(counter) == ["1", "2", "3", "1"]

    files = sorted(results_dir().glob("infra_toy_score-*"))
    assert len(files) == 4
    record = json.loads(files[0].read_text())
    assert record["metadata"]["serializer"]["type"] == "json"
    assert record["metadata"]["serializer"]["object_decoder"] is None  # plain JSON, no hooks


def test_cached_task_rejects_tensor_keys_and_non_json_results(prefect_session):
    from prefect import flow

    from selfprune.tasks.caching import cached_task

    @cached_task(namespace="infra_bad_key", version="1")
    def takes_tensor(t) -> int:
        return 1

    @cached_task(namespace="infra_bad_result", version="1")
    def returns_tensor(x: int):
        return torch.ones(x)

    @flow
    def bad_key():
        return takes_tensor(torch.ones(2))

    @flow
    def bad_result():
        return returns_tensor(2)

    with pytest.raises(TypeError, match="cache key"):
        bad_key()
    with pytest.raises(TypeError, match="not plain JSON"):
        bad_result()


def _run_env(prefect_session, tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(SELFPRUNE_HOME=str(tmp_path / "home"), PREFECT_API_URL=prefect_session["url"],
               PREFECT_LOCAL_STORAGE_PATH=str(tmp_path / "results"), PREFECT_LOGGING_LEVEL="WARNING")
    return env


@pytest.mark.slow
def test_resume_after_sigkill_repeats_only_the_in_flight_task(prefect_session, helper, tmp_path):
    n, sleep = 12, 0.3
    counter, out = tmp_path / "counter", tmp_path / "out.json"
    cmd = [sys.executable, str(HELPER), "--n", str(n), "--sleep", str(sleep), "--salt", tmp_path.name,
           "--counter", str(counter), "--out", str(out)]
    env = _run_env(prefect_session, tmp_path)

    with open(tmp_path / "run1.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while len(_lines(counter)) < 2 * 5 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    started = [int(x) for x in _lines(counter)[::2]]  # normally 0..4, 4 in flight
    assert len(started) >= 5 and started == list(range(len(started))), (tmp_path / "run1.log").read_text()[-3000:]
    assert not out.exists()

    # The rerun is a new flow run in a new process; a hang (stale lock) fails here.
    rerun = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=90)
    assert rerun.returncode == 0, rerun.stdout[-3000:]

    counts = Counter(int(x) for x in _lines(counter)[::2])
    assert set(counts) == set(range(n))
    repeated = {x for x, c in counts.items() if c > 1}
    assert max(counts.values()) <= 2 and repeated <= {started[-1]}, counts  # only the in-flight one

    uninterrupted = helper.resume_flow(n, tmp_path.name + "-clean", 0.0, str(tmp_path / "counter-clean"))
    assert json.loads(out.read_text()) == uninterrupted == [helper.toy_value(x, "") for x in range(n)]


@pytest.mark.slow
def test_failed_flow_run_retry_reexecutes_only_unfinished_work(prefect_session, helper, tmp_path):
    """`prefect flow-run retry <id> --entrypoint file.py:flow` (the no-deployment path)."""
    from prefect.client.orchestration import get_client

    counter, marker = tmp_path / "counter", tmp_path / "marker"
    state = helper.toy_search(3, 3, tmp_path.name, str(counter), str(marker), return_state=True)
    assert state.is_failed()
    run_id = str(state.state_details.flow_run_id)
    assert _lines(counter)[::2] == ["0", "1", "2", "100", "101"]

    retry = subprocess.run(
        [sys.executable, "-m", "prefect", "flow-run", "retry", run_id, "--entrypoint", f"{HELPER}:toy_search"],
        env=dict(os.environ, PREFECT_API_URL=prefect_session["url"]),  # same results dir: same cache
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120,
    )
    assert retry.returncode == 0, retry.stdout[-3000:]
    assert "completed successfully" in retry.stdout
    assert _lines(counter)[::2] == ["0", "1", "2", "100", "101", "102", "200", "201", "202"]
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
    assert run.state.is_completed() and run.run_count == 2
