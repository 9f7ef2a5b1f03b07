"""Every complete ``selfprune`` command in README.md and docs/*.md parses with today's CLI: a
renamed or removed option fails here, not in a newcomer's shell. Synopses (``[--x]``, ``A|B``,
``MODEL``) and elided commands (``...``) are not commands to run, so they are skipped."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.main import get_command

from selfprune.app.cli import app

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def commands(text: str) -> list[list[str]]:
    """The argument lists of the runnable ``selfprune`` commands in ``text``'s bash blocks."""
    found = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split(" #")[0].split("&&"):
                words = shlex.split(part.strip()) if part.strip().startswith("selfprune ") else []
                if words and not any(w == "..." or w.startswith("[") or "|" in w or w.isupper() for w in words):
                    found.append(words[1:])
    return found


def refusal(words: list[str]) -> str | None:
    """Why the CLI would refuse these arguments before running anything, or None."""
    group = get_command(app)
    command = group.get_command(None, words[0])  # type: ignore[attr-defined]
    if command is None:
        return f"no command {words[0]!r}"
    try:
        command.make_context(words[0], words[1:])
    except SystemExit as e:
        return None if not e.code else f"exit {e.code}"
    except Exception as e:  # click's usage errors
        return str(e)
    return None


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_documented_command_parses(page):
    found = commands(page.read_text())
    bad = {" ".join(w): why for w in found if (why := refusal(w))}
    assert not bad, bad


def test_the_check_finds_a_wrong_option_and_skips_synopses():
    text = ("```bash\nselfprune search --model demo --ratoi 0.5\nselfprune prune --model M --ratio B\n"
            "selfprune ppl --model demo --windows 4  # a comment\n```\n")
    assert commands(text) == [["search", "--model", "demo", "--ratoi", "0.5"], ["ppl", "--model", "demo", "--windows", "4"]]
    assert "--ratoi" in refusal(["search", "--model", "demo", "--ratoi", "0.5"])
    assert refusal(["ppl", "--model", "demo", "--windows", "4"]) is None
    assert sum(len(commands(p.read_text())) for p in PAGES) >= 30
