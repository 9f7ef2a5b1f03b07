"""The docs' library example against the README's quick start and the code: its search has the quick
start command's sizes (parsed from README.md and docs/usage.md), and each function returns what the docs
say it does (checked on the tiny workspace model, never at the demo's size)."""

from __future__ import annotations

import ast
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

import selfprune
from selfprune.config import SearchConfig, cli_flag
from selfprune.evolve.runner import RateSummary

README = Path(__file__).resolve().parents[1] / "README.md"
USAGE = README.parent / "docs" / "usage.md"  # "### The library API"
PREFECT = README.parent / "docs" / "prefect.md"  # "## Deployments"

# What the docs' library section says each call returns (each phrase must be in it), checked below.
RETURNS = {
    "search": "returns a `RateSummary`",
    "prune": "returns a `PruneResult`",
    "perplexity": '`{"ppl", "nll", "tokens", "seqlen", "windows", "data", "split"}`',
    "report": "returns a `Report`",
    "load_pruned": "returns a `LoadedModel`",
    "recover": "returns a `Recovery`",
}


def section(title: str, page: Path = README) -> str:
    """The text of ``page`` under the heading ``title``, up to the next heading (code blocks skipped)."""
    lines, inside, fenced = [], False, False
    for line in page.read_text().splitlines():
        fenced ^= line.startswith("```")
        if not fenced and re.match(r"#{1,4} ", line):
            if inside:
                break
            inside = line.strip() == title
        elif inside:
            lines.append(line)
    assert lines, f"{page.relative_to(README.parent)} has no section {title!r}"
    return "\n".join(lines)


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def quick_start_search() -> dict:
    """The options of the quick start's ``selfprune search`` command, as SearchConfig fields."""
    command = code_blocks(section("## Quick start"), "bash")[0]
    (search,) = [part for part in command.split("&&") if part.strip().startswith("selfprune search")]
    words = shlex.split(search)[2:]
    fields = {cli_flag(SearchConfig, name): name for name in SearchConfig.model_fields}
    assert all(w.startswith("--") for w in words[::2]), words
    return {fields[flag]: value for flag, value in zip(words[::2], words[1::2])}


def library_snippet() -> ast.Module:
    """The section's Python blocks as one module, as a notebook runs them cell after cell."""
    return ast.parse("\n".join(code_blocks(section("### The library API", USAGE), "python")))


def keywords(call: ast.Call) -> dict:
    """A call's keyword arguments; ``ast.literal_eval`` reads literals only (no code runs)."""
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords}


def calls(tree: ast.Module, name: str) -> list[ast.Call]:
    """Every call of ``selfprune.<name>`` or of a bare ``<name>`` in the snippet."""
    def called(f: ast.expr) -> str | None:
        return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and called(n.func) == name]


def library_search(tree: ast.Module) -> tuple[dict, ast.Call]:
    """The snippet's search settings: a ``SearchConfig(...)`` it builds, else ``selfprune.search``'s keywords."""
    (call,) = calls(tree, "SearchConfig") or [c for c in calls(tree, "search") if c.keywords]
    return keywords(call), call


def test_the_library_search_has_the_quick_start_sizes():
    tree = library_snippet()
    library, config_call = library_search(tree)
    assert SearchConfig(**library).model_dump(exclude={"out"}) == SearchConfig(**quick_start_search()).model_dump(exclude={"out"})
    # that one config is what both the library search and the flow alternative run
    (assign,) = [n for n in ast.walk(tree) if isinstance(n, ast.Assign) and n.value is config_call]
    searches = calls(tree, "search")
    assert len(searches) == 2  # selfprune.search (in this process) and the cached flow
    assert all([a.id for a in s.args if isinstance(a, ast.Name)] == [assign.targets[0].id] and not s.keywords
               for s in searches)


def test_the_flow_alternative_is_the_flow_the_cli_and_the_deployments_run():
    import yaml

    tree = library_snippet()
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert any(n.module == "selfprune.flows.search" and [a.name for a in n.names] == ["search"] for n in imports)
    deployments = yaml.safe_load((README.parent / "prefect.yaml").read_text())["deployments"]
    assert "selfprune.flows.search.search" in {d["entrypoint"] for d in deployments}


@pytest.mark.parametrize("name", list(RETURNS))
def test_the_readme_says_what_each_call_returns(name):
    text = " ".join(section("### The library API", USAGE).split())
    assert RETURNS[name] in text, f"docs/usage.md's library section does not say {RETURNS[name]!r}"


def test_each_call_returns_what_the_readme_says(tiny_workspace, tmp_path):
    model, data = str(tiny_workspace / "model"), str(tiny_workspace / "corpus.txt")
    small = dict(samples=4, calib_seqlen=64, seqlen=64, device="cpu")
    summary = selfprune.search(selfprune.SearchConfig(
        model=model, data=data, ratio=0.5, population=4, mutations=1, crossovers=1, generations=1, fitness_windows=2,
        test_windows=2, baselines="none", out=str(tmp_path / "nb"), **small))
    assert isinstance(summary, RateSummary) and summary.to_json() == json.loads((tmp_path / "nb" / "best.json").read_text())

    pruned = selfprune.prune(model, 0.5, allocation=str(tmp_path / "nb" / "best.json"), out=tmp_path / "nb-model")
    assert isinstance(pruned, selfprune.PruneResult) and isinstance(pruned.model, torch.nn.Module)
    assert pruned.rates == summary.rates and pruned.out == tmp_path / "nb-model" and pruned.settings_note

    ppl = selfprune.perplexity(pruned, data=data, split="test", seqlen=64, windows=2)
    assert set(ppl) == {"ppl", "nll", "tokens", "seqlen", "windows", "data", "split"} and ppl["windows"] == 2

    from selfprune.model.checkpoint import LoadedModel

    loaded = selfprune.load_pruned(tmp_path / "nb-model", device="cpu")
    assert isinstance(loaded, LoadedModel) and isinstance(loaded.model, torch.nn.Module)

    report = selfprune.report(model=model, data=data, ratios=[0.5], allocations=["uniform"], limit=2, cloze_items=8,
                              seqlen=64, test_windows=2, max_length=256, out=str(tmp_path / "report"), **{
                                  k: v for k, v in small.items() if k != "seqlen"})
    from selfprune.evaluate.report import Report

    assert isinstance(report, Report) and [r.method for r in report.rows] == ["dense", "uniform"]
    assert report.to_json() == json.loads((tmp_path / "report" / "report.json").read_text())


def test_the_flow_from_python_finds_what_the_cli_computed(prefect_api, tiny_workspace, tmp_path, capsys, monkeypatch):
    """The docs' cached path: the flow called from Python after ``selfprune search`` with the same
    settings (another ``out``) evaluates nothing and finds the same best."""
    from helpers import run_cli

    from selfprune.flows.search import search

    sizes = dict(population=4, mutations=1, crossovers=1, generations=1, samples=4, calib_seqlen=64, seqlen=64,
                 fitness_windows=2, test_windows=2, device="cpu", baselines="none")
    values = dict(model=str(tiny_workspace / "model"), data=str(tiny_workspace / "corpus.txt"), ratio=0.5,
                  out=str(tmp_path / "cli"), **sizes)
    args = [a for name, value in values.items() for a in (cli_flag(SearchConfig, name), str(value))]
    code, _, err = run_cli(capsys, monkeypatch, "search", *args)
    assert code == 0, err
    cli = json.loads((tmp_path / "cli" / "best.json").read_text())
    summary = search(SearchConfig(**(values | {"out": str(tmp_path / "nb")})))
    assert summary["evaluations"] == 0 and summary["cache_hits"] == cli["evaluations"] + cli["cache_hits"] > 0
    assert (summary["rates"], summary["test_ppl"]) == (cli["rates"], cli["test_ppl"])


def readme_deployments() -> set[tuple[str, str]]:
    """(flow name, deployment name) of each row of the Deployments section's table."""
    rows = re.findall(r"^\| `([\w-]+)/([\w-]+)` \|", section("## Deployments", PREFECT), flags=re.M)
    return set(rows)


def test_the_readme_lists_every_deployment_prefect_deploy_all_creates():
    from importlib import import_module

    import yaml

    def flow_name(entrypoint: str) -> str:
        module, _, attr = entrypoint.rpartition(".")
        return getattr(import_module(module), attr).name

    deployments = yaml.safe_load((README.parent / "prefect.yaml").read_text())["deployments"]
    assert readme_deployments() == {(flow_name(d["entrypoint"]), d["name"]) for d in deployments}


def test_the_deployments_section_shows_another_port():
    text = section("## Deployments", PREFECT)
    assert "prefect server start --port 4300" in text and "PREFECT_API_URL=http://127.0.0.1:4300/api" in text
