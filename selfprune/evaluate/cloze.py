"""Offline zero-shot tasks built from a local corpus (the demo corpus by default).

Two lm-eval tasks that need no dataset hub:

* ``selfprune_cloze`` (``multiple_choice``): the context is a few consecutive lines of the corpus'
  test split; the choices are the true next line and distractor lines drawn from the same split,
  in a seeded shuffled order. Metrics ``acc`` and ``acc_norm``.
* ``selfprune_lastword`` (``loglikelihood``): the context is a line (with the lines before it)
  minus its last word; the target is that word. Metric ``acc`` (the word is the greedy
  continuation), the LAMBADA recipe on a local text.

Each builder writes a JSON-lines file of items and a task YAML into ``out_dir`` and returns
``out_dir``, to be passed as ``include_path`` to :func:`~selfprune.evaluate.zeroshot.
evaluate_zero_shot`. Files are deterministic: the same corpus, parameters and ``out_dir`` give
byte-identical files (the YAML holds the absolute path of the JSON-lines file).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from ..core.errors import UserError
from ..data.corpora import load_split
from ..storage.fileio import atomic_write_text

CLOZE_TASK = "selfprune_cloze"
LASTWORD_TASK = "selfprune_lastword"
MIN_WORDS = 4  # a line shorter than this is a speaker name, a heading or a stage cue


def _lines(text: str) -> list[str]:
    """Non-empty lines, whitespace-normalized."""
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


def _content(line: str) -> bool:
    """A line of running text: enough words, not a bracketed stage direction."""
    return len(line.split()) >= MIN_WORDS and not line.startswith("[")


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def _yaml(config: dict) -> str:
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper, s: str):  # "\n" as a double-quoted escape, not a folded block
        return dumper.represent_scalar("tag:yaml.org,2002:str", s, style='"' if "\n" in s else None)

    Dumper.add_representer(str, text)
    return yaml.dump(config, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=1000)


def _write_task(out_dir: Path, name: str, rows: list[dict], spec: dict) -> Path:
    """Write ``name.jsonl`` (the items) and ``name.yaml`` (the lm-eval task) into ``out_dir``."""
    out_dir = Path(out_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / f"{name}.jsonl"
    atomic_write_text(jsonl, _jsonl(rows))
    atomic_write_text(out_dir / f"{name}.yaml", _yaml({"task": name, **_dataset_block(jsonl, out_dir), **spec}))
    return out_dir


def _dataset_block(jsonl: Path, out_dir: Path) -> dict:
    return {
        "dataset_path": "json",
        "dataset_name": None,
        # The datasets cache of the built json dataset stays beside the task, not in ~/.cache.
        "dataset_kwargs": {"data_files": {"test": str(jsonl)}, "cache_dir": str(out_dir / ".hf_cache")},
        "test_split": "test",
    }


def build_cloze_task(data: str, out_dir: Path, n_items: int = 200, n_choices: int = 4, seed: int = 0,
                     *, context_lines: int = 3, split: str = "test") -> Path:
    """Write the ``selfprune_cloze`` task for the corpus ``data`` (a :mod:`selfprune.data.corpora` spec).

    An item: ``context`` = ``context_lines`` consecutive non-empty lines of the split joined with
    newlines; ``choices`` = the line that follows them plus ``n_choices - 1`` distinct distractor
    lines of the same split (lines of at least ``MIN_WORDS`` words that are not stage directions),
    shuffled; ``label`` = the index of the true line. Items are drawn without replacement at
    seeded random positions and written in corpus order. The choice is scored after a newline
    (``target_delimiter: "\\n"``), as a next line would be.
    """
    if n_choices < 2 or n_items < 1 or context_lines < 1:
        raise UserError(f"cloze task needs n_items >= 1, n_choices >= 2, context_lines >= 1 "
                        f"(got {n_items}, {n_choices}, {context_lines})")
    lines = _lines(load_split(data, split))
    pool = sorted({line for line in lines if _content(line)})
    positions = [i for i in range(context_lines, len(lines)) if _content(lines[i])]
    if len(positions) < n_items or len(pool) < n_choices * 4:
        raise UserError(
            f"split {split!r} of {data!r} has {len(positions)} usable lines (of {MIN_WORDS}+ words); "
            f"{n_items} cloze items need at least that many. Fix: lower n_items or give more text."
        )
    rng = random.Random(f"selfprune-cloze|{seed}")
    rows = []
    for idx, pos in enumerate(sorted(rng.sample(positions, n_items))):
        true = lines[pos]
        distractors: list[str] = []
        while len(distractors) < n_choices - 1:
            cand = pool[rng.randrange(len(pool))]
            if cand != true and cand not in distractors:
                distractors.append(cand)
        choices = [true, *distractors]
        rng.shuffle(choices)
        rows.append({"id": idx, "context": "\n".join(lines[pos - context_lines:pos]),
                     "choices": choices, "label": choices.index(true)})
    return _write_task(out_dir, CLOZE_TASK, rows, {
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": "\n",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0, "source": str(data), "split": split, "n_items": n_items,
                     "n_choices": n_choices, "context_lines": context_lines, "seed": seed},
    })


_WORD = re.compile(r"^(.*\S)\s+([A-Za-z][A-Za-z']{2,})[^A-Za-z']*$")


def build_lastword_task(data: str, out_dir: Path, n_items: int = 200, seed: int = 0,
                        *, context_lines: int = 2, split: str = "test") -> Path:
    """Write the ``selfprune_lastword`` task (``output_type: loglikelihood``) for ``data``.

    An item: ``context`` = up to ``context_lines`` preceding lines plus the current line without its
    last word (and the punctuation after it); ``target`` = that word (3+ letters), scored as the
    continuation ``" " + target``. ``acc`` is 1 when every token of it is the model's greedy choice.
    """
    if n_items < 1 or context_lines < 0:
        raise UserError(f"lastword task needs n_items >= 1 and context_lines >= 0 (got {n_items}, {context_lines})")
    lines = _lines(load_split(data, split))
    candidates = []
    for i, line in enumerate(lines):
        m = _WORD.match(line)
        if i >= context_lines and _content(line) and m:
            candidates.append((i, m.group(1), m.group(2)))
    if len(candidates) < n_items:
        raise UserError(f"split {split!r} of {data!r} has {len(candidates)} usable lines; {n_items} "
                        f"last-word items need that many. Fix: lower n_items or give more text.")
    rng = random.Random(f"selfprune-lastword|{seed}")
    picked = sorted(rng.sample(range(len(candidates)), n_items))
    rows = []
    for idx, k in enumerate(picked):
        i, head, word = candidates[k]
        context = "\n".join([*lines[i - context_lines:i], head])
        rows.append({"id": idx, "context": context, "target": word})
    return _write_task(out_dir, LASTWORD_TASK, rows, {
        "output_type": "loglikelihood",
        "doc_to_text": "{{context}}",
        # lm-eval adds no target_delimiter to loglikelihood requests: the space is part of the target
        "doc_to_target": "{{' ' + target}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0, "source": str(data), "split": split, "n_items": n_items,
                     "context_lines": context_lines, "seed": seed},
    })

