"""Shared fixtures: tiny random models of each supported family, built in the test."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

# The user's real selfprune home, read before the session fixture below isolates the tests.
REAL_HOME = Path(os.environ.get("SELFPRUNE_HOME") or Path.home() / ".cache" / "selfprune")


@pytest.fixture
def real_home(monkeypatch) -> Path:
    """For tests marked ``demo``: the real cache holding the demo model and corpus."""
    monkeypatch.setenv("SELFPRUNE_HOME", str(REAL_HOME))
    return REAL_HOME


@pytest.fixture(autouse=True, scope="session")
def _library_loggers_on_the_session_stderr():
    """transformers makes its stderr handler on first use, bound to the ``sys.stderr`` of that
    moment: made inside a ``capsys`` test it would write to a stream closed after that test."""
    from transformers.utils import logging as hf_logging

    hf_logging.get_verbosity()


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine two OpenMP
    threads waiting on each other make small ops ~50x slower (measured: LoRA 1 s vs 65 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _console_follows_stderr() -> None:
    """Point Prefect's console handler at whatever ``sys.stderr`` is when it writes (rich's console
    does that with no file of its own). Prefect binds it to ``sys.stderr`` when it sets logging up:
    at import, that is pytest's session-wide capture, and after an in-process flow command, a test's
    capture stream that closes with the test. Either way a test's ``capsys`` would miss its lines."""
    import logging
    import sys

    for handler in logging.getLogger().handlers:
        if hasattr(handler, "console") and isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.__stderr__)  # flush() only
            handler.console.file, handler.console.stderr = None, True


def run_cli(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    """Run ``selfprune ARGS`` in-process through the real entry point: (exit code, stdout, stderr)."""
    import sys

    from selfprune.app import cli

    monkeypatch.setattr(sys, "argv", ["selfprune", *args])
    _console_follows_stderr()
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code or 0
    _console_follows_stderr()
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True, scope="session")
def _isolated_home(tmp_path_factory):
    """Tests never touch the user's cache, except the real demo files, which they share."""
    os.environ["SELFPRUNE_HOME"] = str(tmp_path_factory.mktemp("selfprune_home"))
    yield


@pytest.fixture(autouse=True, scope="module")
def module_home(_isolated_home, tmp_path_factory, request) -> Path:
    """Each test module gets its own ``SELFPRUNE_HOME`` and Prefect results directory (the task
    cache), so what a test computes or finds cached never depends on which other modules ran."""
    from selfprune.tasks import prefect_env

    home = tmp_path_factory.mktemp(f"home-{request.module.__name__.rsplit('.', 1)[-1]}")
    (home / "results").mkdir(mode=0o700)
    with environ(SELFPRUNE_HOME=str(home), PREFECT_LOCAL_STORAGE_PATH=str(home / "results")):
        prefect_env.refresh()
        yield home
    prefect_env.refresh()


@contextmanager
def environ(**values: str | None):
    """Set (a string) or unset (None) environment variables for the block, then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        _set_environ(values)
        yield
    finally:
        _set_environ(saved)


def _set_environ(values: dict[str, str | None]) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def byte_tokenizer():
    """A real fast tokenizer with one token per byte (vocab 256), no hub needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=sorted(alphabet)[0])


def demo_uniform_and_searched(ratio: float, tmp_path: Path, capsys, monkeypatch) -> tuple[Path, Path]:
    """The demo model pruned at ``ratio`` uniformly and by a one-generation GA search (real home,
    16 calibration windows): the two exports the serving tests (vLLM, llama.cpp) check."""
    common = ["--ratio", str(ratio), "--samples", "16", "--device", "cpu"]
    code, _, err = run_cli(capsys, monkeypatch, "prune", *common, "--out", str(tmp_path / "uniform"))
    assert code == 0, err[-2000:]
    search = ["search", *common, "--population", "4", "--mutations", "2", "--crossovers", "2", "--generations", "1",
              "--fitness-windows", "2", "--test-windows", "2", "--out", str(tmp_path / "search")]
    code, _, err = run_cli(capsys, monkeypatch, *search)
    assert code == 0, err[-2000:]
    code, _, err = run_cli(capsys, monkeypatch, "prune", *common, "--allocation", str(tmp_path / "search" / "best.json"),
                           "--out", str(tmp_path / "searched"))
    assert code == 0, err[-2000:]
    return tmp_path / "uniform", tmp_path / "searched"


TINY = {
    "llama_mha": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=4),
    "llama_gqa": dict(model_type="llama", num_attention_heads=8, num_key_value_heads=2),
    "qwen2": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(model_type="mistral", num_attention_heads=4, num_key_value_heads=2),
}


def build_tiny(kind: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(TINY[kind])
    config = AutoConfig.for_model(
        spec.pop("model_type"),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        head_dim=8 if spec["num_attention_heads"] == 8 else 16,
        vocab_size=256,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        **spec,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)


@pytest.fixture(params=list(TINY))
def tiny_dir(request, tmp_path) -> Path:
    """A tiny random model of each family, saved as a local Hugging Face directory."""
    model = build_tiny(request.param)
    model.save_pretrained(tmp_path / request.param)
    byte_tokenizer().save_pretrained(tmp_path / request.param)
    return tmp_path / request.param


def random_windows(n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, seqlen), generator=g)


@pytest.fixture(scope="session")
def prefect_api(_isolated_home) -> Iterator[str]:
    """One local Prefect API server for the session, in the isolated home (10-20 s once).

    Subprocesses inherit ``PREFECT_API_URL`` and reuse it instead of starting their own.
    """
    from selfprune.tasks import prefect_env

    prefect_env.configure(user_profiles=False, log_level="WARNING")
    yield prefect_env.ensure_api_server()
    stop_api_server()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, server: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll ``url`` until it answers 200; fail with the server's log if it dies or takes too long."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)


class PrefectServer:
    """A real ``prefect server start`` on a fixed port, in a session of its own, that a test can
    stop and start again (on the same database, or on a fresh one: a reset)."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root, self.port = root, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, database: str = "server", timeout: float = 90) -> PrefectServer:
        import sys

        env = {"PATH": os.environ["PATH"], "HOME": str(self.root / "user"), "PREFECT_HOME": str(self.root / database),
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false"}
        (self.root / "user").mkdir(parents=True, exist_ok=True)
        self.log = self.root / f"server-{self.starts}.log"
        self.starts += 1
        with open(self.log, "w") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until_up(f"{self.url}/health", self.proc, self.log, timeout=timeout)
        return self

    def stop(self) -> None:
        """SIGTERM to the server's own session (it and its children), SIGKILL if it lingers."""
        import signal

        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def stop_api_server() -> None:
    """Stop this process's local Prefect server after its logs have reached it, while pytest's
    streams are still open (left to exit, it logs to a closed stream and to a stopped server)."""
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer

    APILogWorker.drain_all(timeout=5)
    SubprocessASGIServer().stop()


def write_corpus(path: Path, paragraphs: int = 200, seed: int = 0) -> Path:
    """An English-like corpus of function words: enough tokens for tiny calibration and scoring."""
    import random

    rng = random.Random(seed)
    words = "the of and to in is was for on that with as by at from his her it be are".split()
    path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(60)) for _ in range(paragraphs)))
    return path


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory) -> Path:
    """A saved tiny GQA Llama (``model/``) and a corpus (``corpus.txt``), shared by the session."""
    root = tmp_path_factory.mktemp("workspace")
    build_tiny("llama_gqa").save_pretrained(root / "model")
    byte_tokenizer().save_pretrained(root / "model")
    write_corpus(root / "corpus.txt")
    return root


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped on machines without a CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def tiny_prune_args(ws: Path, out: Path, *extra: str) -> list[str]:
    """``selfprune prune`` arguments for the tiny workspace (4 calibration windows of 64 tokens)."""
    return ["prune", "--model", str(ws / "model"), "--data", str(ws / "corpus.txt"), "--samples", "4",
            "--calib-seqlen", "64", "--device", "cpu", "--out", str(out), *extra]


def tiny_export(ws: Path, out: Path, *extra: str) -> Path:
    """Prune the tiny workspace model through the real CLI into ``out`` (for module-scoped fixtures)."""
    import sys

    from selfprune.app import cli

    argv, sys.argv = sys.argv, ["selfprune", *tiny_prune_args(ws, out, *extra)]
    try:
        cli.main()
    except SystemExit as e:
        assert not e.code
    finally:
        sys.argv = argv
    return out
