"""Helpers the tests import (``from helpers import run_cli``): tiny random models and corpora, the
in-process CLI, environment and port utilities, and real Prefect servers. Fixtures and hooks stay in
conftest.py; pytest puts tests/ on ``sys.path``, so this module imports by its bare name."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import torch

# The user's real selfprune home, read at import (conftest.py imports this module) before the
# session fixture there isolates the tests.
REAL_HOME = Path(os.environ.get("SELFPRUNE_HOME") or Path.home() / ".cache" / "selfprune")


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


def random_windows(n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, seqlen), generator=g)


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
