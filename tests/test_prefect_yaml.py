"""prefect.yaml points at real flows with parameters those flows accept."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SPEC = yaml.safe_load((ROOT / "prefect.yaml").read_text())


@pytest.mark.parametrize("deployment", SPEC["deployments"], ids=lambda d: d["name"])
def test_deployment_entrypoint_and_parameters(deployment, monkeypatch):
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(ROOT)
    path, _, name = deployment["entrypoint"].partition(":")
    assert (ROOT / path).is_file()
    flow = load_flow_from_entrypoint(deployment["entrypoint"])
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


def test_pull_step_sets_the_repo_as_working_directory():
    (step,) = SPEC["pull"]
    assert step["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ $SELFPRUNE_REPO }}"
