"""Faults a multi-day search meets, injected for real: a Prefect server stopped, reset, or gone for
good; a small filesystem that is full before or during the run; a read-only home or output; a
Prefect database another process holds locked. Each either rides through or ends the CLI with one
line and exit 3 (no traceback), and the same command run again resumes from the cache.

The disk tests mount small tmpfs filesystems, which needs root (CAP_SYS_ADMIN); without it they are
skipped and say so.
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

import pytest
from helpers import PrefectServer

# slow: real Prefect servers stopped, restarted and reset under running searches (about 5 minutes)
pytestmark = pytest.mark.slow

TINY = dict(ratio=0.5, population=6, mutations=2, crossovers=2, generations=6, samples=4, calib_seqlen=64, seqlen=64,
            fitness_windows=4, test_windows=4, device="cpu", baselines="none")
EVALUATIONS = 6 + 6 * (2 + 2)


def search_cmd(ws: Path, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "selfprune.app.cli", "search", "--model", str(ws / "model"),
           "--data", str(ws / "corpus.txt"), "--out", str(out)]
    for k, v in TINY.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    return cmd


def user_env(home: Path, api_url: str | None = None, **extra: str) -> dict[str, str]:
    """What a user's shell has: PATH, HOME, SELFPRUNE_HOME, and PREFECT_API_URL when they use a server."""
    env = {"PATH": os.environ["PATH"], "HOME": str(home.parent), "SELFPRUNE_HOME": str(home),
           "OMP_NUM_THREADS": "1", **extra}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def ledger(out: Path) -> list[dict]:
    path = out / "evaluations.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def best(out: Path) -> tuple:
    b = json.loads((out / "best.json").read_text())
    return b["rates"], b["fitness"], b["test_ppl"]


def start_and_wait(cmd: list[str], env: dict, out: Path, lines: int = 9, timeout: float = 180) -> subprocess.Popen:
    """Start the CLI and return once ``lines`` evaluations are in its ledger (it is mid-search)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while len(ledger(out)) < lines and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"the search ended before the fault: {proc.communicate()[1][-3000:]}"
    return proc


def one_line_failure(proc: subprocess.Popen, timeout: float = 300) -> str:
    """The CLI ended with exit 3 and one ``error:`` message, no traceback; return stderr."""
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 3, err[-4000:]
    assert "Traceback" not in err and err.count("error:") == 1, err[-4000:]
    return err


def rerun(cmd: list[str], env: dict, out: Path) -> dict:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "best.json").read_text())


def no_repeats(out: Path, allowed: int = 1) -> None:
    """No candidate was evaluated twice, but those in flight when the fault hit."""
    counts = Counter((json.dumps(e["structure"]), e["split"]) for e in ledger(out))
    assert sum(n > 1 for n in counts.values()) <= allowed, counts


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = PrefectServer(tmp_path_factory.mktemp("faults-server")).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def reference(server, tiny_workspace, tmp_path_factory) -> tuple:
    """The uninterrupted search's best (rates, fitness, test ppl)."""
    root = tmp_path_factory.mktemp("reference")
    out = root / "run"
    done = subprocess.run(search_cmd(tiny_workspace, out), env=user_env(root / "home", server.url),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return best(out)


# --------------------------------------------------------------------------------------------
# the Prefect API server


def test_a_minute_long_server_outage_is_ridden_through(server, reference, tiny_workspace, tmp_path):
    """Stopped for 60 s mid-search and started again on the same database: the run waits (Prefect's
    client retries, SELFPRUNE_API_OUTAGE_S) and finishes with the uninterrupted run's best."""
    out, env = tmp_path / "run", user_env(tmp_path / "home", server.url)
    proc = start_and_wait(search_cmd(tiny_workspace, out), env, out)
    server.stop()
    time.sleep(60)
    server.start()
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    assert best(out) == reference
    no_repeats(out)


def test_a_reset_server_ends_the_run_with_one_line_and_the_rerun_resumes(server, reference, tiny_workspace, tmp_path):
    """The server comes back on a fresh database (a pod without its volume): it has forgotten the
    run. One line says so with the rerun command; the rerun resumes from the cache."""
    out, env = tmp_path / "run", user_env(tmp_path / "home", server.url)
    cmd = search_cmd(tiny_workspace, out)
    proc = start_and_wait(cmd, env, out)
    server.stop()
    server.start(database=f"fresh-{time.monotonic_ns()}")
    err = one_line_failure(proc)
    assert "no longer knows this run" in err and "; rerun to resume: selfprune search" in err
    done_before = len(ledger(out))
    resumed = rerun(cmd, env, out)
    assert (resumed["rates"], resumed["fitness"], resumed["test_ppl"]) == reference
    assert resumed["cache_hits"] >= done_before - 1 and resumed["evaluations"] + resumed["cache_hits"] == EVALUATIONS
    no_repeats(out)


def test_an_outage_past_the_allowance_ends_the_run_with_one_line(server, reference, tiny_workspace, tmp_path):
    """SELFPRUNE_API_OUTAGE_S=5 and a server that stays away: one line names the server and the
    setting; once the server is back, the rerun resumes."""
    out, env = tmp_path / "run", user_env(tmp_path / "home", server.url, SELFPRUNE_API_OUTAGE_S="5")
    cmd = search_cmd(tiny_workspace, out)
    proc = start_and_wait(cmd, env, out)
    server.stop()
    try:
        err = one_line_failure(proc, timeout=120)
    finally:
        server.start()
    assert f"{server.url} did not answer" in err and "SELFPRUNE_API_OUTAGE_S=5 s" in err
    assert rerun(cmd, env, out)["rates"] == reference[0]


# --------------------------------------------------------------------------------------------
# the disk


@pytest.fixture
def small_fs(tmp_path):
    """Mount a tmpfs of the given size (MiB) and options; unmount at the end."""
    mounted: list[Path] = []

    def mount(size_mib: int, options: str = "") -> Path:
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        opts = f"size={size_mib}m" + (f",{options}" if options else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_is_named_before_any_work(small_fs, tiny_workspace, tmp_path):
    """SELFPRUNE_HOME on a 4 MiB filesystem, no Prefect server configured (its database would live
    there): exit 3 at once, naming the path, the free space and the estimate; no server started."""
    fs = small_fs(4)
    done = subprocess.run(search_cmd(tiny_workspace, tmp_path / "run"), env=user_env(fs / "home"),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr[-3000:]
    assert f"not enough space for this run on the device holding {fs / 'home'}" in done.stderr
    assert "Prefect's local database" in done.stderr and "Traceback" not in done.stderr
    assert not (fs / "home" / "prefect" / "prefect.db").exists()  # no temporary Prefect server was started
    assert not any((tmp_path / "run").iterdir())  # the probe leaves nothing behind


def test_a_disk_filled_mid_run_ends_it_with_one_line_and_the_rerun_resumes(server, reference, small_fs, tiny_workspace):
    """The home and the run directory on a 96 MiB filesystem that another writer fills mid-search
    (ENOSPC in the cache and the ledger): exit 3 naming the device, at the latest when the generation
    in flight ends (its results could not be kept); after space is freed, the rerun resumes from what
    was kept and finds the uninterrupted run's best. The ledger holds whole lines only."""
    fs = small_fs(96)
    out, env = fs / "run", user_env(fs / "home", server.url)
    cmd = search_cmd(tiny_workspace, out)
    proc = start_and_wait(cmd, env, out)
    filler = fs / "filler"
    with open(filler, "wb") as fh:  # what another job writing to the same disk does
        try:
            while True:
                fh.write(b"\0" * (1 << 20))
                fh.flush()
        except OSError:
            pass
    err = one_line_failure(proc)
    assert "no space left on the device holding" in err and str(fs) in err
    filler.unlink()
    done_before = len(ledger(out))
    resumed = rerun(cmd, env, out)
    assert (resumed["rates"], resumed["fitness"], resumed["test_ppl"]) == reference
    assert done_before - resumed["cache_hits"] <= 2 + 2  # at most the generation in flight when the disk filled


@pytest.mark.parametrize("where", ["home", "out"])
def test_a_read_only_home_or_output_is_named_before_any_work(small_fs, tiny_workspace, tmp_path, where):
    fs = small_fs(1, "ro")
    home = fs / "home" if where == "home" else tmp_path / "home"
    out = fs / "run" if where == "out" else tmp_path / "run"
    done = subprocess.run(search_cmd(tiny_workspace, out), env=user_env(home), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 3, done.stderr[-3000:]
    assert "cannot write" in done.stderr and "Read-only file system" in done.stderr
    assert str(home if where == "home" else out) in done.stderr and "Traceback" not in done.stderr


def test_a_prefect_database_that_cannot_be_locked_is_named_before_any_work(tiny_workspace, tmp_path):
    """Another process holds the local Prefect database's write lock (what a filesystem without
    working locks looks like to SQLite too): exit 3 after the lock wait, naming the file and fixes."""
    home = tmp_path / "home"
    db = home / "prefect" / "prefect.db"
    db.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
        "c.execute('BEGIN EXCLUSIVE'); c.execute('CREATE TABLE held (x)'); print('held', flush=True); time.sleep(120)"),
        str(db)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        done = subprocess.run(search_cmd(tiny_workspace, tmp_path / "run"), env=user_env(home), capture_output=True,
                              text=True, timeout=120)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert done.returncode == 3, done.stderr[-3000:]
    assert f"cannot lock the Prefect database {db}" in done.stderr and "Traceback" not in done.stderr


# --------------------------------------------------------------------------------------------
# the outage allowance


@pytest.mark.parametrize("seconds", [5, 60, 300, 3600])
def test_the_outage_allowance_becomes_prefects_client_retries(seconds):
    """Prefect's client waits 2, 4, 8, ... s between retries: the retries cover the allowance, and
    at most about twice it."""
    from selfprune.tasks.faults import retries_for_outage
    from selfprune.tasks.prefect_env import configure

    n = retries_for_outage(seconds)
    assert seconds <= sum(2 ** k for k in range(1, n + 1)) <= 2 * seconds + 2
    env = {"SELFPRUNE_API_OUTAGE_S": str(seconds)}
    configure("/nonexistent", env=env, user_profiles=False)
    assert env["PREFECT_CLIENT_MAX_RETRIES"] == str(n)
    mine = {"SELFPRUNE_API_OUTAGE_S": str(seconds), "PREFECT_CLIENT_MAX_RETRIES": "2"}
    configure("/nonexistent", env=mine, user_profiles=False)
    assert mine["PREFECT_CLIENT_MAX_RETRIES"] == "2"  # the user's own setting wins


def test_a_bad_outage_allowance_is_bad_input(tiny_workspace, tmp_path):
    done = subprocess.run(search_cmd(tiny_workspace, tmp_path / "run"),
                          env=user_env(tmp_path / "home", SELFPRUNE_API_OUTAGE_S="five minutes"),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "SELFPRUNE_API_OUTAGE_S='five minutes' is not a positive number of seconds" in done.stderr


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == pid:
                    found.append((int(entry.name), (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()))
            except (OSError, IndexError, ValueError):
                continue
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_sigkilled_cli_leaves_no_temporary_prefect_server_behind(tiny_workspace, tmp_path):
    """The OOM killer or a preempted job ends the CLI with SIGKILL, which skips the exit hooks that
    stop the temporary Prefect server it started; its watchdog ends it instead."""
    out = tmp_path / "run"
    proc = start_and_wait(search_cmd(tiny_workspace, out), user_env(tmp_path / "home"), out, lines=2)
    servers = [pid for pid, cmd in _children(proc.pid) if "uvicorn" in cmd and "prefect.server" in cmd]
    assert len(servers) == 1, _children(proc.pid)
    # the server writes to its log for its whole life, never to the terminal of the run
    log = tmp_path / "home" / "prefect" / "temporary-server.log"
    assert [os.readlink(f"/proc/{servers[0]}/fd/{fd}") for fd in (1, 2)] == [str(log)] * 2
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 20
    while _alive(servers[0]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(servers[0]), "the temporary Prefect server outlived the CLI that started it"


def test_a_sigterm_while_the_temporary_server_starts_leaves_none_behind(tiny_workspace, tmp_path):
    """A preempted job gets SIGTERM, perhaps before the temporary Prefect server has answered (its
    watchdog starts once it has): the CLI exits 143 through its exit hooks, which stop the server."""
    proc = subprocess.Popen(search_cmd(tiny_workspace, tmp_path / "run"), env=user_env(tmp_path / "home"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, servers = time.monotonic() + 180, []
    while not servers and proc.poll() is None and time.monotonic() < deadline:
        servers = [pid for pid, cmd in _children(proc.pid) if "uvicorn" in cmd and "prefect.server" in cmd]
        time.sleep(0.02)
    assert servers, f"no temporary server started: {proc.communicate()[1][-3000:]}"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    deadline = time.monotonic() + 20
    while _alive(servers[0]) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _alive(servers[0])
    if left:
        os.kill(servers[0], signal.SIGKILL)  # this test's CLI started it
    assert not left, "the temporary Prefect server outlived the CLI that a SIGTERM ended"
    assert proc.returncode == 143, err[-3000:]


def test_a_temporary_server_that_does_not_answer_in_time_is_one_line_and_leaves_none_behind(tiny_workspace, tmp_path):
    """A busy machine (or a first start creating the database) can keep the temporary Prefect server
    from answering in time: exit 3 with what to do, not Prefect's traceback, and no server left."""
    home = tmp_path / "home"
    done = subprocess.run(search_cmd(tiny_workspace, tmp_path / "run"), capture_output=True, text=True, timeout=300,
                          env=user_env(home, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1"))
    assert done.returncode == 3, done.stderr[-3000:]
    assert "did not answer within 1 s" in done.stderr and "PREFECT_API_URL=" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    mine = f"SELFPRUNE_HOME={home}\0".encode()
    left = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _alive(int(p.name))
            and _environ_has(p, mine) and b"uvicorn" in _read(p / "cmdline")]
    for pid in left:
        os.kill(pid, signal.SIGKILL)  # started by this test's CLI
    assert not left, "the temporary server outlived the CLI"


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _environ_has(proc: Path, entry: bytes) -> bool:
    return entry in _read(proc / "environ")
