"""Data specs, the split rule, file loaders and token windows (offline, small, fast)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from selfprune.core.errors import UserError
from selfprune.data import corpora as data

WORDS = "the a of and to in is was he she it that his her with for as on at by thou thee".split()


def make_paragraphs(n: int = 200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    paras = []
    for _ in range(n):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(rng.randint(1, 4))]
        paras.append("\n".join(lines))
    return paras


def word_tokenizer():
    """A real fast tokenizer (word level, whitespace split) over WORDS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(sorted(set(WORDS)))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture
def paras():
    return make_paragraphs()


@pytest.fixture
def txt_file(tmp_path, paras):
    path = tmp_path / "corpus.txt"
    # Irregular blank lines and trailing spaces: the split rule normalizes them.
    seps = ["\n\n", "\n\n\n", "\n  \n", "\n\n \n\n"]
    body = "".join(p + seps[i % len(seps)] for i, p in enumerate(paras))
    path.write_text("\n" + body)
    return path


def test_split_rule_contiguous_disjoint_proportions(txt_file, paras):
    spec = str(txt_file)
    parts = {s: data.load_split(spec, s) for s in data.SPLITS}
    normalized = "\n\n".join(paras)
    # Contiguous, in order, disjoint: rejoining them gives the normalized text back exactly.
    assert "\n\n".join(parts[s] for s in data.SPLITS) == normalized
    split_paras = {s: parts[s].split("\n\n") for s in data.SPLITS}
    assert sum(len(v) for v in split_paras.values()) == len(paras)
    assert split_paras["calibration"] + split_paras["fitness"] + split_paras["test"] == paras
    # Proportions: within one paragraph of 80/10/10.
    n = len(normalized)
    longest = max(len(p) for p in paras) + 2
    starts = {"calibration": 0, "fitness": len(parts["calibration"]) + 2,
              "test": len(parts["calibration"]) + len(parts["fitness"]) + 4}
    assert abs(starts["fitness"] - 0.8 * n) <= longest
    assert abs(starts["test"] - 0.9 * n) <= longest
    assert all(parts[s] for s in data.SPLITS)


def test_split_rule_first_char_decides():
    # Paragraph starts at 0, 10, 20, ... with 8 chars each (+2 separator): N = 98.
    paras = [f"p{i:02d}xxxxx" for i in range(10)]
    parts = data.split_text("\n\n".join(paras))
    # 0.8 N = 78.4: starts 0..70 -> calibration; 0.9 N = 88.2: start 80 -> fitness; 90 -> test.
    assert parts["calibration"].split("\n\n") == paras[:8]
    assert parts["fitness"] == paras[8]
    assert parts["test"] == paras[9]


def test_json_jsonl_parquet_match_txt(tmp_path, txt_file, paras):
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"text": p, "id": i}) + "\n" for i, p in enumerate(paras)))
    js = tmp_path / "corpus.json"
    js.write_text(json.dumps([{"text": p} for p in paras]))
    pq = tmp_path / "corpus.parquet"
    import pyarrow as pa
    import pyarrow.parquet as papq

    papq.write_table(pa.table({"text": paras, "n": list(range(len(paras)))}), pq)
    for s in data.SPLITS:
        want = data.load_split(str(txt_file), s)
        for path in (jsonl, js, pq):
            assert data.load_split(str(path), s) == want, (path.suffix, s)
        assert data.data_fingerprint(str(pq), s) == data.data_fingerprint(str(txt_file), s)


def test_fingerprint_is_sha256_of_split(txt_file):
    import hashlib

    for s in data.SPLITS:
        text = data.load_split(str(txt_file), s)
        assert data.data_fingerprint(str(txt_file), s) == hashlib.sha256(text.encode()).hexdigest()
    assert len({data.data_fingerprint(str(txt_file), s) for s in data.SPLITS}) == 3


def test_edited_file_is_reread(tmp_path, paras):
    path = tmp_path / "c.md"
    path.write_text("\n\n".join(paras))
    before = data.data_fingerprint(str(path), "test")
    path.write_text("\n\n".join(paras + ["one more paragraph at the end"]))
    assert data.data_fingerprint(str(path), "test") != before
    assert data.load_split(str(path), "test").endswith("one more paragraph at the end")


def test_bad_split_name(txt_file):
    with pytest.raises(UserError, match="calibration, fitness, test"):
        data.load_split(str(txt_file), "validation")
    with pytest.raises(UserError, match="unknown split"):
        data.data_fingerprint(str(txt_file), "train")


def test_missing_file_and_bad_forms(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(UserError) as e:
        data.load_split(str(missing), "test")
    assert str(missing) in str(e.value) and "wikitext2" in str(e.value) and ".parquet" in str(e.value)
    odd = tmp_path / "corpus.csv"
    odd.write_text("text\nhello\n")
    with pytest.raises(UserError, match="unknown extension"):
        data.load_split(str(odd), "test")
    with pytest.raises(UserError, match="not a file"):
        data.load_split(str(tmp_path), "test")
    nofield = tmp_path / "x.jsonl"
    nofield.write_text('{"body": "hi"}\n')
    with pytest.raises(UserError, match='no "text" field'):
        data.load_split(str(nofield), "test")


def test_too_few_paragraphs_gives_empty_split_error(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("just one paragraph\nwith two lines\n")
    assert data.load_split(str(path), "calibration").startswith("just one")
    with pytest.raises(UserError, match="empty"):
        data.load_split(str(path), "test")


def test_wikitext_maps_splits(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, revision=None, split=None, **kw):
        calls.append((path, name, revision, split))
        return {"text": [f"{split} row 1\n", "", f"{split} row 2\n"]}

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data._load_split_cached.cache_clear()
    data._fingerprint_cached.cache_clear()
    try:
        assert data.load_split("wikitext2", "fitness") == "validation row 1\n\n\n\n\nvalidation row 2\n"
        assert data.load_split("wikitext2", "calibration").startswith("train row 1")
        assert data.load_split("wikitext2", "test").startswith("test row 1")
        assert {c[3] for c in calls} == {"train", "validation", "test"}
        assert all(c[:3] == (data.WIKITEXT_REPO, data.WIKITEXT_CONFIG, data.WIKITEXT_REVISION) for c in calls)
    finally:
        data._load_split_cached.cache_clear()
        data._fingerprint_cached.cache_clear()


def test_wikitext_offline_is_user_error(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    data._load_split_cached.cache_clear()
    try:
        with pytest.raises(UserError, match="Hugging Face hub once"):
            data.load_split("wikitext2", "test")
    finally:
        data._load_split_cached.cache_clear()


def test_token_windows_shapes_and_memo(txt_file, monkeypatch):
    tok = word_tokenizer()
    text = data.load_split(str(txt_file), "calibration")
    n_tokens = len(text.split())
    ids = data.token_ids(tok, text)
    assert ids.dtype == torch.long and ids.numel() == n_tokens
    assert (ids > 0).all()  # every word known: no [UNK], and no special tokens added
    w = data.token_windows(tok, text, 16)
    assert w.shape == (n_tokens // 16, 16) and w.dtype == torch.long
    assert torch.equal(w.flatten(), ids[: w.numel()])
    w3 = data.token_windows(tok, text, 16, 3)
    assert torch.equal(w3, w[:3])
    # A second call reads the memo back identically, without tokenizing.
    tokenize = data._tokenize_chunked
    monkeypatch.setattr(data, "_tokenize_chunked", lambda *a: pytest.fail("tokenized again"))
    assert torch.equal(data.token_ids(tok, text), ids)
    # The memo holds raw int32 bytes (nothing pickled); a damaged entry is recomputed.
    from selfprune.storage.memo import open_memo

    with open_memo("tokens") as memo:
        [key] = [k for k in memo if memo[k] == ids.to(torch.int32).numpy().tobytes()]
        memo[key] = b"\x01\x02\x03"
    monkeypatch.setattr(data, "_tokenize_chunked", tokenize)
    assert torch.equal(data.token_ids(tok, text), ids)


def test_token_windows_too_short(txt_file):
    tok = word_tokenizer()
    text = data.load_split(str(txt_file), "test")
    n_tokens = len(text.split())
    with pytest.raises(UserError) as e:
        data.split_windows(tok, str(txt_file), "test", 64, n_tokens)
    msg = str(e.value)
    assert f"only {n_tokens} tokens" in msg and "lower --samples/--seqlen" in msg and "split test" in msg
    with pytest.raises(UserError, match="only"):
        data.token_windows(tok, "the a of", 16)  # zero full windows


def test_chunked_tokenization_equals_whole(monkeypatch, paras):
    from helpers import byte_tokenizer

    tok = byte_tokenizer()
    text = "\n\n".join(paras) + "\n\n  indented. tail\n\n\n\nend."
    monkeypatch.setattr(data, "CHUNK_CHARS", 200)
    chunks = data.text_chunks(text, 200)
    assert len(chunks) > 10 and "".join(chunks) == text
    ids = data._tokenize_chunked(tok, text)
    whole = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.tolist() == whole
