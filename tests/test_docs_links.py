"""Every relative link of README.md and docs/*.md leads somewhere: the file exists, and an ``#anchor``
(in the page or in another one) is the slug of one of the target's headings under GitHub's rules.
Offline and fast: http(s) links are skipped."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"(`+).*?\1")


def prose(text: str) -> list[str]:
    """The lines outside fenced code blocks (``` or ~~~, indented or not)."""
    lines, fence = [], None
    for line in text.splitlines():
        marker = re.match(r"\s*(```|~~~)", line)
        if marker and (fence is None or marker.group(1) == fence):
            fence = None if fence else marker.group(1)
        elif fence is None:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup and punctuation dropped (but '-' and '_'), lowercased,
    spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays
    text = re.sub(r"<[^>]+>", "", text)
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor in ``page``; a repeated one gets GitHub's ``-1``, ``-2``, ..."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose(page.read_text()):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    """The relative link targets of ``page`` (markdown links and images), code left out."""
    targets = []
    for line in prose(page.read_text()):
        for target in LINK.findall(CODE_SPAN.sub("", line)):
            if not re.match(r"[a-z][a-z0-9+.-]*:", target, flags=re.I):  # http:, https:, mailto: ...
                targets.append(target)
    return targets


def broken(page: Path) -> list[str]:
    """What is wrong with each relative link of ``page``, one line each."""
    problems = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / unquote(path)).resolve() if path else page
        if not dest.exists():
            problems.append(f"{page.name}: {target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and (dest.suffix != ".md" or unquote(anchor).lower() not in anchors(dest)):
            problems.append(f"{page.name}: {target}: no heading with anchor #{anchor} in {dest.name}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert broken(page) == []


def test_the_readme_links_every_docs_page():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(ROOT / "README.md") if t.partition("#")[0]}
    assert [p.name for p in PAGES[1:] if p.resolve() not in linked] == []


def test_the_quick_start_keeps_its_two_commands():
    """The front door's two commands: set up and run the demo search, then the test command CI runs
    (the fast tier, then the slow one)."""
    text = (ROOT / "README.md").read_text()
    quick = text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```bash\n(.*?)^```", quick, flags=re.S | re.M)
    assert len(blocks) == 2 and "selfprune search" in blocks[0], blocks
    tests = 'python -m pytest -q -m "not slow" && python -m pytest -q -m slow'
    assert blocks[1].strip() == ". .venv/bin/activate && " + tests
    assert (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1] == tests


def test_the_checker_finds_a_broken_file_and_a_broken_anchor(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Models larger than one GPU: `--device map`\n")
    page = tmp_path / "README.md"
    page.write_text(
        "# Top\n\n"
        "[ok](docs/a.md#models-larger-than-one-gpu---device-map) [ok](#top) [web](https://example.com/x#y)\n"
        "`[in code](missing.md)`\n```\n[in a fence](missing.md)\n```\n"
        "[gone](docs/missing.md) ![gone](docs/missing.png) [bad anchor](docs/a.md#no-such-heading) [bad](#nowhere)\n")
    assert [p.split(": ", 2)[1] for p in broken(page)] == [
        "docs/missing.md", "docs/missing.png", "docs/a.md#no-such-heading", "#nowhere"]


@pytest.mark.parametrize(("heading", "anchor"), [
    ("Pruning metrics, unstructured, N:M and SDSA", "pruning-metrics-unstructured-nm-and-sdsa"),
    ("Reconstruction beside llm-compressor's SparseGPT on the demo model",
     "reconstruction-beside-llm-compressors-sparsegpt-on-the-demo-model"),
    ("Models larger than one GPU: `--device map`", "models-larger-than-one-gpu---device-map"),
    ("Evaluation, reports and speed", "evaluation-reports-and-speed"),
])
def test_slugs_follow_github(heading, anchor):
    assert slug(heading) == anchor
