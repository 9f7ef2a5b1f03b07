"""Shared fixtures and hooks only; the helpers tests import live in helpers.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import REAL_HOME, TINY, build_tiny, byte_tokenizer, environ, stop_api_server, write_corpus


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


@pytest.fixture(params=list(TINY))
def tiny_dir(request, tmp_path) -> Path:
    """A tiny random model of each family, saved as a local Hugging Face directory."""
    model = build_tiny(request.param)
    model.save_pretrained(tmp_path / request.param)
    byte_tokenizer().save_pretrained(tmp_path / request.param)
    return tmp_path / request.param


@pytest.fixture(scope="session")
def prefect_api(_isolated_home) -> Iterator[str]:
    """One local Prefect API server for the session, in the isolated home (10-20 s once).

    Subprocesses inherit ``PREFECT_API_URL`` and reuse it instead of starting their own.
    """
    from selfprune.tasks import prefect_env

    prefect_env.configure(user_profiles=False, log_level="WARNING")
    yield prefect_env.ensure_api_server()
    stop_api_server()


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
