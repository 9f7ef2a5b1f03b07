"""Atomic writes: a reader sees the old complete file or the new one, never a half."""

from __future__ import annotations

import pytest

from selfprune.storage.fileio import atomic_path, atomic_write_bytes, atomic_write_text, staged_dir


def test_atomic_writes_create_parents_and_replace_whole(tmp_path):
    path = tmp_path / "a" / "b" / "f.json"
    assert atomic_write_text(path, "{}\n") == path and path.read_text() == "{}\n"
    atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert [p.name for p in path.parent.iterdir()] == ["f.json"]


def test_a_failed_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "f.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half")
            raise OSError("disk full")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.safetensors"]


def test_staged_dir_moves_every_file_in_or_none(tmp_path):
    out = tmp_path / "export"
    with staged_dir(out) as staging:
        (staging / "config.json").write_text("{}")
        (staging / "model.safetensors").write_bytes(b"w")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]

    with pytest.raises(RuntimeError):
        with staged_dir(out) as staging:
            (staging / "config.json").write_text('{"new": 1}')
            raise RuntimeError("killed")
    assert (out / "config.json").read_text() == "{}"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
