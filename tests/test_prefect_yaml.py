"""prefect.yaml points at real flows with parameters those flows accept, and is usable by a team:
code from the installed package, no paths of the deploying machine, one run at a time per
deployment, heartbeats for the zombie automation, secrets read at run time."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "prefect.yaml").read_text()
SPEC = yaml.safe_load(TEXT)


@pytest.mark.parametrize("deployment", SPEC["deployments"], ids=lambda d: d["name"])
def test_deployment_entrypoint_and_parameters(deployment):
    from prefect.flows import load_flow_from_entrypoint

    entrypoint = deployment["entrypoint"]
    assert ":" not in entrypoint and entrypoint.startswith("selfprune.flows.")  # the installed package
    flow = load_flow_from_entrypoint(entrypoint)
    name = entrypoint.rsplit(".", 1)[1]
    assert flow.fn.__name__ == name
    accepted = inspect.signature(flow.fn).parameters
    unknown = set(deployment["parameters"]) - set(accepted)
    assert not unknown, f"{deployment['name']}: parameters {unknown} are not arguments of {name}"
    validated = flow.validate_parameters(deployment["parameters"])
    for k, given in deployment["parameters"].items():
        value = validated[k]
        assert (value.model_dump(exclude_unset=True) if hasattr(value, "model_dump") else value) == given
    assert deployment["work_pool"]["name"] == "selfprune-process"
    for schedule in deployment.get("schedules", []):
        assert schedule["active"] is False  # scheduled deployments are opt-in


@pytest.mark.parametrize("deployment", SPEC["deployments"], ids=lambda d: d["name"])
def test_deployment_operations(deployment):
    assert deployment["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    env = deployment["work_pool"]["job_variables"]["env"]
    assert env["SELFPRUNE_HOME"] == "~/.cache/selfprune"
    assert int(env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]) >= 30  # Prefect's minimum
    assert env["HF_HUB_DISABLE_PROGRESS_BARS"] == "1" and env["TQDM_DISABLE"] == "1"
    assert not any("KEY" in k or "TOKEN" in k or "SECRET" in k for k in env)  # deploy would store them in plain text
    for step in deployment.get("pull", SPEC["pull"]):
        (fqn,) = step
        module, _, fn = fqn.rpartition(".")
        assert module == "selfprune.ops" and callable(getattr(importlib.import_module(module), fn))
    params = deployment["parameters"].get("config", deployment["parameters"])
    if params.get("device") == "cuda":
        assert env["CUDA_VISIBLE_DEVICES"] == "0"
    if str(params.get("oracle", "")).startswith("openai:"):
        assert {"selfprune.ops.env_from_secrets": {"OPENAI_API_KEY": "openai-api-key"}} in deployment["pull"]


def test_nothing_of_the_deploying_machine():
    """No checkout path, no `{{ $ENV }}` resolved at deploy time, no absolute path."""
    assert not re.search(r"\{\{\s*\$", TEXT)
    assert not re.search(r"^\s*[^#\n]*:\s*[\"']?/", TEXT, re.M)
    assert SPEC["pull"] == [{"selfprune.ops.run_directory": {}}]


def test_zombie_automation_file_is_a_valid_automation():
    from prefect.events.schemas.automations import AutomationCore

    spec = yaml.safe_load((ROOT / "automations" / "zombies.yaml").read_text())
    automation = AutomationCore.model_validate(spec)
    trigger = automation.trigger
    assert trigger.posture == "Proactive" and trigger.after == {"prefect.flow-run.heartbeat"}
    assert "prefect.flow-run.heartbeat" in trigger.expect and trigger.within.total_seconds() >= 3 * 30
    assert automation.actions[0].type == "change-flow-run-state" and automation.actions[0].state.value == "CRASHED"


def test_run_directory_pull_step(tmp_path, monkeypatch):
    from selfprune import ops

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SELFPRUNE_HOME", str(tmp_path / "home"))
    assert ops.run_directory() == {"directory": str((tmp_path / "home").resolve())}
    assert Path.cwd() == (tmp_path / "home").resolve()
