"""Text corpora, their calibration / fitness / test splits, and fixed-length token windows.

A data spec (the CLI's ``--data``) is one of

* ``"demo"``: the Shakespeare corpus that ships with selfprune (see :mod:`selfprune.data.demo`);
* ``"wikitext2"``: WikiText-2 raw v1 from the Hugging Face hub at a pinned revision (needs the hub
  once; ``datasets`` caches it);
* a local file: ``.txt`` / ``.md`` (plain UTF-8 text), ``.jsonl`` / ``.json`` (rows with a
  ``"text"`` field) or ``.parquet`` (a ``"text"`` column). Rows are joined with a blank line
  (``"\\n\\n"``), as the WikiText perplexity convention joins its rows.

Three disjoint splits serve three purposes: ``calibration`` feeds the activation statistics,
``fitness`` scores candidates during the search, ``test`` is only for the numbers reported (searching
on the reported split would be tuning on the test set). See :func:`split_text` for how a single
corpus is cut.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import UserError
from ..storage.hashing import content_hash
from ..storage.memo import open_memo
from .demo import demo_corpus_path

SPLITS = ("calibration", "fitness", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)

DEMO = "demo"
WIKITEXT2 = "wikitext2"
# The hub's canonical id of the ``wikitext`` dataset (the bare name redirects to it), pinned to the
# revision that many public evaluation scripts pin (the parquet-converted repository).
WIKITEXT_REPO = "Salesforce/wikitext"
WIKITEXT_CONFIG = "wikitext-2-raw-v1"
WIKITEXT_REVISION = "b08601e04326c79dfdd32d625aee71d232d685c3"
WIKITEXT_SPLITS = {"calibration": "train", "fitness": "validation", "test": "test"}

TEXT_SUFFIXES = (".txt", ".md")
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
ROW_SEPARATOR = "\n\n"

ACCEPTED = (
    f"'{DEMO}' (the bundled Shakespeare corpus), '{WIKITEXT2}' (WikiText-2 raw, needs the Hugging Face "
    f"hub once), or a path to a .txt/.md text file, a .jsonl/.json file with a \"text\" field, or a "
    f".parquet file with a \"text\" column"
)

# Bump when tokenization or the memo file layout changes (part of the memo key).
TOKENS_VERSION = "tokens-2"
_ID_DTYPE = np.dtype("<i4")
CHUNK_CHARS = 64_000
READ_CHARS = 1 << 16  # a text corpus is read and split this many characters at a time


# --------------------------------------------------------------------------------------------
# corpora and splits


def load_split(data: str, split: str) -> str:
    """The text of one split (``"calibration"``, ``"fitness"`` or ``"test"``) of a data spec.

    WikiText-2 has its own splits: calibration = train, fitness = validation, test = test, each
    the split's rows joined with ``"\\n\\n"``. Any other corpus is one text cut by :func:`split_text`.
    """
    _check_split(split)
    key = _data_key(data)
    text = _load_split_cached(key, split)
    if not text.strip():
        raise UserError(
            f"split {split!r} of data {data!r} is empty: the text has too few paragraphs (blocks "
            f"separated by blank lines) to give each of {', '.join(SPLITS)} at least one. "
            f"Fix: give more text, or separate it into more paragraphs."
        )
    return text


def data_fingerprint(data: str, split: str) -> str:
    """sha256 (hex) of the split's text: what cache keys use to name the data (memoized)."""
    _check_split(split)
    return _fingerprint_cached(_data_key(data), split)


def paragraphs(text: str) -> list[str]:
    """The paragraphs of ``text``: blocks separated by one or more blank (whitespace-only) lines,
    without their trailing whitespace or leading newlines; whitespace-only blocks are dropped."""
    return [p for run in _paragraph_runs([_normalized(text)]) for p in run]


def _normalized(text: str) -> str:
    """``text`` with ``"\\r\\n"`` and ``"\\r"`` line ends made ``"\\n"`` (what reading a file as text does)."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


_SEPARATOR = re.compile(r"\n(?:[^\S\n]*\n)+")


def _paragraph_runs(chunks: Iterable[str]) -> Iterator[list[str]]:
    """The paragraphs (as :func:`paragraphs`) of the normalized text that ``chunks`` make up, a list
    per chunk: those that end in it. Each chunk but the last ends at a line's end. Only a chunk, its
    paragraphs and the one still being read are held, so a corpus of any size streams through (all
    its paragraphs as a list take many times the text when they are short).

    Each chunk after the first is cut behind a ``"\\n"`` standing for the previous chunk's last
    character, so a separator that starts at that line end is found as in the whole text."""
    pending: list[str] = []  # the parts of the paragraph still being read
    head = ""
    for chunk in chunks:
        blocks = _SEPARATOR.split(head + chunk)
        blocks[0] = blocks[0][len(head) :]
        if len(blocks) > 1:  # the paragraph being read ends in this chunk
            blocks[0] = "".join([*pending, blocks[0]])
            pending = []
        pending.append(blocks.pop())
        yield _cleaned(blocks)
        head = "\n"
    yield _cleaned(["".join(pending)])


def _cleaned(blocks: list[str]) -> list[str]:
    """The blocks without their leading newlines and trailing whitespace, whitespace-only ones dropped."""
    return [p for p in (b.lstrip("\n").rstrip() for b in blocks) if p]


def split_text(text: str) -> dict[str, str]:
    """THE SPLIT RULE for a single corpus (the demo corpus and local files).

    1. Cut the text into paragraphs at blank lines (:func:`paragraphs`) and rejoin them with
       exactly one blank line (``"\\n\\n"``): the normalized text, of N characters.
    2. Walk the paragraphs in order. A paragraph belongs to the split in which its first character
       falls: ``calibration`` if it starts before 0.8 N, ``fitness`` if before 0.9 N, else ``test``.
    3. Each split is its paragraphs joined with ``"\\n\\n"``.

    So the splits are contiguous and disjoint, in the order calibration, fitness, test, and
    ``"\\n\\n".join(those three)`` is the normalized text; each holds about 80% / 10% / 10% of the
    characters (more or less by at most one paragraph). No randomness: the same file always gives
    the same splits. A split can come out empty only when the text has very few paragraphs.
    """
    return _split_chunks(lambda: [_normalized(text)])


def _split_chunks(read: Callable[[], Iterable[str]]) -> dict[str, str]:
    """:func:`split_text` of the text that ``read()`` yields in chunks (see :func:`_paragraphs`), read
    twice: once to measure N, once to write each paragraph into its split. Memory is the splits
    and one chunk, never the paragraphs as a list."""
    count = total = 0
    for run in _paragraph_runs(read()):
        count, total = count + len(run), total + sum(map(len, run))
    total += len(ROW_SEPARATOR) * max(count - 1, 0)
    bounds = (SPLIT_FRACTIONS[0] * total, (SPLIT_FRACTIONS[0] + SPLIT_FRACTIONS[1]) * total)
    parts = {s: io.StringIO() for s in SPLITS}
    started: set[str] = set()

    def add(name: str, text: str) -> None:
        if name in started:
            parts[name].write(ROW_SEPARATOR)
        started.add(name)
        parts[name].write(text)

    offset = 0
    for run in _paragraph_runs(read()):
        size = sum(map(len, run)) + len(ROW_SEPARATOR) * len(run)
        if run and _split_at(offset, bounds) == _split_at(offset + size - len(run[-1]) - len(ROW_SEPARATOR), bounds):
            add(_split_at(offset, bounds), ROW_SEPARATOR.join(run))  # the whole run starts in one split
            offset += size
            continue
        for p in run:
            add(_split_at(offset, bounds), p)
            offset += len(p) + len(ROW_SEPARATOR)
    return {s: parts.pop(s).getvalue() for s in SPLITS}


def _split_at(offset: int, bounds: tuple[float, float]) -> str:
    """The split of a paragraph that starts at ``offset`` of the normalized text."""
    return SPLITS[0] if offset < bounds[0] else SPLITS[1] if offset < bounds[1] else SPLITS[2]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}.")


def check_data(data: str) -> str:
    """The data spec, stripped: a known name (``demo``, ``wikitext2``) or a readable kind of file
    that exists; else a UserError. Nothing is read or fetched: a check before a run starts."""
    if not isinstance(data, (str, os.PathLike)) or not str(data).strip():
        raise UserError(f"no data given: use {ACCEPTED}.")
    spec = str(data).strip()
    if spec == DEMO or spec.lower() in (WIKITEXT2, "wikitext-2", "wikitext"):
        return spec
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"data file not found: {spec}. --data takes {ACCEPTED}.")
    if not path.is_file():
        raise UserError(f"data path is not a file: {spec}. --data takes {ACCEPTED}.")
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES:
        raise UserError(f"cannot read data file {spec}: unknown extension {path.suffix!r}. "
                        f"--data takes {ACCEPTED}.")
    return spec


def _data_key(data: str) -> tuple:
    """A hashable identity of the data spec; for files it includes size and mtime, so an edited
    file is re-read."""
    spec = check_data(data)
    if spec == DEMO:
        path = demo_corpus_path()
        st = path.stat()
        return (DEMO, str(path), st.st_mtime_ns, st.st_size)
    if spec.lower() in (WIKITEXT2, "wikitext-2", "wikitext"):
        return (WIKITEXT2, WIKITEXT_REVISION)
    path = Path(spec).expanduser().resolve()
    st = path.stat()
    return ("file", str(path), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=16)
def _load_split_cached(key: tuple, split: str) -> str:
    if key[0] == WIKITEXT2:
        return _load_wikitext(WIKITEXT_SPLITS[split])
    return _split_corpus_cached(key)[split]


@lru_cache(maxsize=4)
def _split_corpus_cached(key: tuple) -> dict[str, str]:
    return _split_chunks(_corpus_chunks(Path(key[1])))


@lru_cache(maxsize=64)
def _fingerprint_cached(key: tuple, split: str) -> str:
    return hashlib.sha256(_load_split_cached(key, split).encode("utf-8")).hexdigest()


def _corpus_chunks(path: Path) -> Callable[[], Iterator[str]]:
    """A reader of a local corpus in chunks, for :func:`_split_chunks` (which reads it twice). Text
    files are read as they are (UTF-8), about ``READ_CHARS`` characters at a time; JSON lines, JSON
    and parquet go through ``datasets``' builders (an on-disk table) and their rows' ``text`` are
    read a batch at a time, joined with ``"\\n\\n"``."""
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return lambda: _text_chunks(path)
    builder = "parquet" if suffix in PARQUET_SUFFIXES else "json"
    import datasets

    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001 - any parse failure is the file's problem
        raise UserError(f"could not read data file {path} as {builder}: {type(e).__name__}: {e}. "
                        f"Fix: give JSON lines / parquet rows with a \"text\" field.") from e
    if "text" not in ds.column_names:
        raise UserError(f"data file {path} has no \"text\" field (it has: {', '.join(ds.column_names)}). "
                        f"Fix: name the column holding the text \"text\".")
    return lambda: _row_chunks(batch["text"] for batch in ds.select_columns("text").iter(batch_size=1024))


def _text_chunks(path: Path) -> Iterator[str]:
    """A text file in chunks that end at line ends, with its line ends made ``"\\n"``."""
    with open(path, encoding="utf-8", newline=None) as f:
        try:
            while chunk := f.read(READ_CHARS):
                yield chunk + f.readline()
        except UnicodeDecodeError as e:
            raise UserError(f"data file {path} is not UTF-8 text ({e}). Fix: convert it to UTF-8.") from e


def _row_chunks(batches: Iterable[list]) -> Iterator[str]:
    """Rows' texts joined with ``"\\n\\n"`` (a row that is not a string counts as empty), a batch a chunk."""
    for i, rows in enumerate(batches):
        text = ROW_SEPARATOR.join(t if isinstance(t, str) else "" for t in rows)
        yield ("\n" if i else "") + _normalized(text) + "\n"


def _load_wikitext(hub_split: str) -> str:
    import datasets

    try:
        ds = datasets.load_dataset(WIKITEXT_REPO, WIKITEXT_CONFIG, revision=WIKITEXT_REVISION, split=hub_split)
    except Exception as e:  # noqa: BLE001 - offline, hub down, revision gone: all the same fix
        raise UserError(
            f"could not load WikiText-2 ({WIKITEXT_REPO}, {WIKITEXT_CONFIG}, revision {WIKITEXT_REVISION}, "
            f"split {hub_split}): {type(e).__name__}: {e}. It needs the Hugging Face hub once (then "
            f"datasets caches it). Fix: allow hub access once, or use --data demo, or export the split "
            f"to a local .jsonl/.parquet/.txt file and pass its path."
        ) from e
    return ROW_SEPARATOR.join(ds["text"])


# --------------------------------------------------------------------------------------------
# tokens


def token_windows(tokenizer, text: str, seqlen: int, n_windows: int | None = None, *,
                  label: str | None = None) -> torch.LongTensor:
    """``[n, seqlen]`` token ids: the text as one stream, cut into non-overlapping windows.

    No special tokens are added (no BOS per window, no EOS): the windows are plain slices of the
    text's token stream, as in the usual WikiText perplexity convention. The first ``n_windows``
    full windows are returned (all of them for ``None``); the tail shorter than ``seqlen`` is dropped.
    Too little text raises :class:`UserError`. Token ids are memoized on disk (see :func:`token_ids`).
    ``label`` names the text in that error (e.g. ``"corpus demo split test"``).
    """
    if seqlen < 1 or (n_windows is not None and n_windows < 1):
        raise UserError(f"seqlen ({seqlen}) and the number of windows ({n_windows}) must be at least 1.")
    ids = token_ids(tokenizer, text)
    available = ids.numel() // seqlen
    want = available if n_windows is None else n_windows
    if want < 1 or want > available:
        what = label or "the text"
        need = max(want, 1)
        raise UserError(
            f"{what} has only {ids.numel()} tokens: {need} windows of seqlen {seqlen} need "
            f"{need * seqlen}. Fix: lower --samples/--seqlen or give more text."
        )
    return ids[: want * seqlen].reshape(want, seqlen).clone()


def split_windows(tokenizer, data: str, split: str, seqlen: int, n_windows: int | None = None) -> torch.LongTensor:
    """:func:`token_windows` of :func:`load_split`, with the data and split named in its errors."""
    return token_windows(tokenizer, load_split(data, split), seqlen, n_windows,
                         label=f"corpus {data} split {split}")


def token_ids(tokenizer, text: str) -> torch.LongTensor:
    """The 1-D token ids of ``text`` (no special tokens), memoized in the memo ``home()/tokens``.

    The key hashes the text (sha256) and the tokenizer's identity: for a fast tokenizer its class,
    vocabulary size and the sha256 of its full ``tokenizer.json`` serialization (which fixes the
    tokenization, wherever the tokenizer was loaded from); otherwise its ``name_or_path`` and size.
    The value is the ids as little-endian int32 bytes (raw, never pickled); ids beyond int32 are
    not memoized.

    Long texts are tokenized in chunks of about ``CHUNK_CHARS`` characters in one batch call (the
    fast tokenizer spreads a batch over the cores). Chunks are cut just before a whitespace run that
    holds a blank line and follows a non-space character, so concatenating them gives the text back
    exactly. For byte-level BPE with GPT-2-style pre-tokenization (SmolLM2, GPT-2) no pre-token
    crosses such a cut, so the ids equal those of tokenizing the whole text in one call (checked by
    the tests on the demo corpus). Tokenizers whose pre-tokens glue punctuation to following
    newlines, or that add a prefix space per input, may differ by about one token per cut (one per
    ~15k tokens): the stream is still the same text.
    """
    text_sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    key = content_hash(TOKENS_VERSION, CHUNK_CHARS, text_sha, tokenizer_identity(tokenizer))
    with open_memo("tokens") as memo:
        raw = memo.get(key)
    if isinstance(raw, bytes) and len(raw) % _ID_DTYPE.itemsize == 0:  # else: damaged, recompute
        return torch.from_numpy(np.frombuffer(raw, dtype=_ID_DTYPE).astype(np.int64))
    ids = _tokenize_chunked(tokenizer, text)
    if ids.numel() == 0 or int(ids.max()) <= np.iinfo(_ID_DTYPE).max:
        with open_memo("tokens") as memo:
            memo.set(key, ids.numpy().astype(_ID_DTYPE).tobytes())
    return ids


def tokenizer_identity(tokenizer) -> dict[str, Any]:
    """What determines a tokenizer's output, for cache keys."""
    ident: dict[str, Any] = {"class": type(tokenizer).__name__, "vocab": len(tokenizer)}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        try:
            ident["json_sha256"] = hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()
            return ident
        except Exception:  # noqa: BLE001
            pass
    ident["name_or_path"] = str(getattr(tokenizer, "name_or_path", ""))
    return ident


_CUT = re.compile(r"(?<=\S)[^\S\n]*\n[^\S\n]*\n\s*(?=\S)")


def text_chunks(text: str, chunk_chars: int = CHUNK_CHARS) -> list[str]:
    """``text`` cut into pieces of about ``chunk_chars`` characters; ``"".join`` gives it back."""
    chunks, start = [], 0
    while len(text) - start > chunk_chars:
        m = _CUT.search(text, start + chunk_chars)
        if m is None:
            break
        chunks.append(text[start : m.start()])
        start = m.start()
    chunks.append(text[start:])
    return chunks


def _tokenize_chunked(tokenizer, text: str) -> torch.LongTensor:
    chunks = text_chunks(text, CHUNK_CHARS)
    kwargs = {"add_special_tokens": False}
    try:
        out = tokenizer(chunks, verbose=False, **kwargs)["input_ids"]
    except TypeError:  # a tokenizer without the verbose switch
        out = tokenizer(chunks, **kwargs)["input_ids"]
    flat = [i for ids in out for i in ids]
    return torch.tensor(flat, dtype=torch.long)

